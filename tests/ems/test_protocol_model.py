"""A model check of the EMS protocol (issue 19's bar): random sequences of hello, put, reserve, commit,
get, exists and delete from clients of several namespaces, malformed sizes included, against a real
server. No get ever returns bytes its namespace did not put (a value is its namespace's last one or
a miss: eviction may drop anything), and the server's memory stays within its arena and quotas.

Reserve is the same-host put: the test plays the client that copies into the granted blocks
through shared memory, or commits without copying (the server must then publish zeros).
"""

from __future__ import annotations

import threading

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from matrixinfer import netio
from matrixinfer.ems import protocol as p
from matrixinfer.ems.config import NamespaceConfig
from matrixinfer.ems.protocol import ErrorCode
from matrixinfer.ems.server import EmsServer
from matrixinfer.ems.service import EmsService

CAPACITY = 64 << 10
NAMESPACES = {"vault": ("s3cret", 24 << 10), "team": ("", 16 << 10)}  # declared: token, quota
ALL = ["vault", "team", "open-a", "open-b"]
KEYS = [b"k0", b"k1", b"k2", b"shared"]
sizes = st.integers(0, 12 << 10)
bad_sizes = st.sampled_from([-1, -64, -(1 << 40), CAPACITY + 1, 1 << 62, (1 << 64) - 1])


def _value(ns: str, key: bytes, size: int, salt: int) -> bytes:
    """Bytes unique to (namespace, key, put), so a value served to the wrong reader is recognizable."""
    stem = f"{ns}/{key.decode()}/{salt}|".encode()
    return (stem * (size // len(stem) + 1))[:size]


class EmsProtocol(RuleBasedStateMachine):
    """One server, one raw connection per namespace, and the model of what each namespace put."""

    @initialize()
    def start(self) -> None:
        self.svc = EmsService(CAPACITY, namespaces={n: NamespaceConfig(q, t) for n, (t, q) in NAMESPACES.items()})
        self.server = EmsServer(self.svc)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.conns: dict[str, object] = {}
        self.model: dict[str, dict[bytes, bytes]] = {ns: {} for ns in ALL}
        self.salt = 0

    def teardown(self) -> None:
        if hasattr(self, "server"):
            for conn in self.conns.values():
                conn.close()  # type: ignore[attr-defined]
            self.server.stop()

    def _conn(self, ns: str):
        conn = self.conns.get(ns)
        if conn is None:
            conn = netio.connect(self.server.address, timeout=5)
            token = NAMESPACES.get(ns, ("", 0))[0]
            p.send_frame(conn, p.Hello(namespace=ns, token=token))
            assert not p.recv_reply(conn).code
            self.conns[ns] = conn
        return conn

    def _call(self, ns: str, req: p.Request, payloads: list[bytes] | None = None) -> p.Reply:
        conn = self._conn(ns)
        p.send_frame(conn, req, payloads or [])
        return p.recv_reply(conn)

    # -- rules -------------------------------------------------------------------------------------
    @rule(ns=st.sampled_from(ALL), key=st.sampled_from(KEYS), size=sizes)
    def put(self, ns: str, key: bytes, size: int) -> None:
        self.salt += 1
        value = _value(ns, key, size, self.salt)
        code = self._call(ns, p.Put(keys=[key], sizes=[size]), [value]).codes[0]
        if code == ErrorCode.OK:
            self.model[ns][key] = value
        else:
            assert code in (ErrorCode.QUOTA, ErrorCode.FULL, ErrorCode.TOO_LARGE), code

    @rule(ns=st.sampled_from(ALL), key=st.sampled_from(KEYS), size=st.integers(-(1 << 40), -1))
    def put_negative_size(self, ns: str, key: bytes, size: int) -> None:
        """A Put whose payload cannot be framed: that connection is dropped, nothing is stored."""
        conn = self._conn(ns)
        p.send_frame(conn, p.Put(keys=[key], sizes=[size]))
        try:
            assert conn.recv(1) == b""
        except ConnectionResetError:
            pass
        conn.close()
        del self.conns[ns]

    @rule(ns=st.sampled_from(ALL), batch=st.lists(st.tuples(st.sampled_from(KEYS), sizes | bad_sizes, st.booleans()),
                                                  min_size=1, max_size=4), abort=st.booleans())
    def reserve_commit(self, ns: str, batch: list[tuple[bytes, int, bool]], abort: bool) -> None:
        keys = [k for k, _, _ in batch]
        reply = self._call(ns, p.Reserve(keys=keys, sizes=[s for _, s, _ in batch]))
        assert len(reply.codes) == len(keys) and len(reply.offsets) == len(keys)
        granted: dict[bytes, bytes] = {}
        for (key, size, write), code, off in zip(batch, reply.codes, reply.offsets):
            if size < 0:  # refused (RETRY when an earlier key of the batch already failed)
                assert code in (ErrorCode.BAD_REQUEST, ErrorCode.RETRY) and off == -1
            if code != ErrorCode.OK:
                continue
            assert size >= 0 and off >= 0 and off + size <= CAPACITY
            assert bytes(self.svc.view[off:off + size]) == bytes(size)  # granted blocks hold nothing of anyone's
            self.salt += 1
            value = _value(ns, key, size, self.salt) if write else bytes(size)
            self.svc.view[off:off + size] = value  # the same-host client's copy (or none: zeros stay)
            granted[key] = value  # a key reserved twice in one batch: the later block is committed last
        assert not self._call(ns, p.Commit(reservation=reply.lease, abort=abort)).code
        if not abort:
            self.model[ns].update(granted)

    @rule(ns=st.sampled_from(ALL), keys=st.lists(st.sampled_from(KEYS), min_size=1, max_size=4))
    def get(self, ns: str, keys: list[bytes]) -> None:
        conn = self._conn(ns)
        p.send_frame(conn, p.Get(keys=keys))
        reply = p.recv_reply(conn)
        for key, size in zip(keys, reply.sizes, strict=True):
            if size == p.MISS:
                continue  # evicted or never put: always allowed
            buf = bytearray(size)
            netio.recv_exact_into(conn, memoryview(buf))
            assert key in self.model[ns], f"{ns} got {bytes(buf[:40])!r} for {key!r}, which it never put"
            assert bytes(buf) == self.model[ns][key], f"{ns} got bytes it did not put for {key!r}"

    @rule(ns=st.sampled_from(ALL), keys=st.lists(st.sampled_from(KEYS), min_size=1, max_size=4))
    def exists(self, ns: str, keys: list[bytes]) -> None:
        found = self._call(ns, p.Exists(keys=keys)).found
        for key, present in zip(keys, found, strict=True):
            assert not present or key in self.model[ns]

    @rule(ns=st.sampled_from(ALL), key=st.sampled_from(KEYS))
    def delete(self, ns: str, key: bytes) -> None:
        self._call(ns, p.Delete(keys=[key]))
        self.model[ns].pop(key, None)

    @precondition(lambda self: self.conns)
    @rule(data=st.data())
    def reconnect(self, data: st.DataObject) -> None:
        """A connection closes (its open reservations and leases are released) and comes back."""
        ns = data.draw(st.sampled_from(sorted(self.conns)))
        self.conns.pop(ns).close()  # type: ignore[attr-defined]

    # -- invariants ----------------------------------------------------------------------------------
    @invariant()
    def memory_is_bounded(self) -> None:
        if not hasattr(self, "svc"):
            return
        with self.svc.lock:
            store = self.svc.store
            assert 0 <= store.alloc.used_bytes <= store.alloc.capacity
            for ns, (_, quota) in NAMESPACES.items():
                assert store.ns_bytes.get(ns, 0) <= quota
            assert all(e.offset >= 0 and e.offset + e.size <= CAPACITY and e.size >= 0 for e in store.lru.values())


TestEmsProtocol = EmsProtocol.TestCase
TestEmsProtocol.settings = settings(max_examples=60, stateful_step_count=30, deadline=None,
                                    suppress_health_check=[HealthCheck.too_slow])
