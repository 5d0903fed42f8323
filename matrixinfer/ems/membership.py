"""Who is in the ring: membership views with leases, and the server-side heartbeat.

Three interchangeable views: a fixed list (:class:`StaticMembership`), the small single-host EMS
controller (:class:`ControllerMembership`, see :mod:`matrixinfer.ems.controller`) and etcd for
multi-host deployments (:class:`EtcdMembership`, through etcd's JSON gateway with httpx so no etcd
client library is needed). A server that stops heartbeating leaves the view when its lease expires.
"""

from __future__ import annotations

import abc
import base64
import threading

from matrixinfer import auth, netio
from matrixinfer.ems import protocol as p
from matrixinfer.ems.protocol import ErrorCode

CONTROLLER_TIMEOUT = 1.0


class Membership(abc.ABC):
    """A view of live server addresses that servers can join with a lease."""

    @abc.abstractmethod
    def members(self) -> list[str]:
        """Addresses of live servers."""

    def register(self, addr: str, ttl: float) -> int:
        """Join with a lease of ``ttl`` seconds; returns the lease id."""
        raise NotImplementedError(f"{type(self).__name__} does not accept registrations")

    def keepalive(self, lease: int) -> bool:
        """Extend a lease; False when it already expired (the caller re-registers)."""
        raise NotImplementedError(f"{type(self).__name__} does not accept registrations")

    def revoke(self, lease: int) -> None:  # noqa: B027 - optional: a view without leases has nothing to revoke
        """Leave now instead of waiting for the lease to expire."""


class StaticMembership(Membership):
    """A fixed list of servers (no leases; an unreachable one just misses)."""

    def __init__(self, addrs: list[str]) -> None:
        self.addrs = list(addrs)

    def members(self) -> list[str]:
        return list(self.addrs)


class ControllerMembership(Membership):
    """Client of an EMS controller over the EMS wire protocol (authenticated with ``secret`` if given)."""

    def __init__(self, addr: str, timeout: float = CONTROLLER_TIMEOUT, secret: bytes | None = None) -> None:
        self.addr = addr
        self.timeout = timeout
        self.secret = secret

    def _call(self, req: p.Request) -> p.Reply:
        with netio.connect(self.addr, timeout=self.timeout) as sock:
            if self.secret is not None:
                auth.client_handshake(sock, self.secret, "ems-controller", f"EMS controller {self.addr}")
            p.send_frame(sock, req)
            reply = p.recv_reply(sock, f"EMS controller {self.addr}")
        if reply.code == ErrorCode.REFUSED:
            raise ConnectionRefusedError(f"EMS controller {self.addr}: {reply.error}")
        return reply

    def members(self) -> list[str]:
        return self._call(p.Members()).members

    def register(self, addr: str, ttl: float) -> int:
        return self._call(p.Register(addr=addr, ttl=ttl)).lease

    def keepalive(self, lease: int) -> bool:
        return self._call(p.KeepAlive(lease=lease)).code == ErrorCode.OK


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _prefix_end(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])


class EtcdMembership(Membership):
    """Servers as keys ``/matrixinfer/ems/<cluster>/servers/<addr>`` attached to etcd leases."""

    def __init__(self, endpoints: str, cluster: str = "default", timeout: float = 2.0) -> None:
        import httpx

        self.endpoints = [e.strip().rstrip("/") for e in endpoints.split(",") if e.strip()]
        if not self.endpoints:
            raise ValueError(f"no etcd endpoint in {endpoints!r}")
        self.prefix = f"/matrixinfer/ems/{cluster}/servers/".encode()
        self.http = httpx.Client(timeout=timeout)

    def _post(self, path: str, body: dict) -> dict:
        last: Exception | None = None
        for endpoint in self.endpoints:  # first endpoint that answers
            try:
                resp = self.http.post(endpoint + path, json=body)
                resp.raise_for_status()
                return resp.json()
            except Exception as exc:  # noqa: BLE001 - try the next endpoint, report the last error
                last = exc
        raise ConnectionError(f"no etcd endpoint of {self.endpoints} answered {path}: {last}")

    def members(self) -> list[str]:
        out = self._post("/v3/kv/range", {"key": _b64(self.prefix), "range_end": _b64(_prefix_end(self.prefix))})
        return sorted(base64.b64decode(kv["value"]).decode() for kv in out.get("kvs", []))

    def register(self, addr: str, ttl: float) -> int:
        lease = int(self._post("/v3/lease/grant", {"TTL": max(1, round(ttl))})["ID"])
        self._post("/v3/kv/put", {"key": _b64(self.prefix + addr.encode()), "value": _b64(addr), "lease": str(lease)})
        return lease

    def keepalive(self, lease: int) -> bool:
        out = self._post("/v3/lease/keepalive", {"ID": str(lease)})
        return int(out.get("result", {}).get("TTL", 0)) > 0

    def revoke(self, lease: int) -> None:
        self._post("/v3/lease/revoke", {"ID": str(lease)})


def membership_from(servers: str | None = None, controller: str | None = None, etcd: str | None = None,
                    cluster: str = "default", secret: bytes | None = None) -> Membership:
    """The membership view named by command-line style options (exactly one must be given); ``secret``
    authenticates connections to a controller."""
    given = [x for x in (servers, controller, etcd) if x]
    if len(given) != 1:
        raise ValueError("give exactly one of --servers, --controller or --etcd")
    if servers:
        return StaticMembership([s.strip() for s in servers.split(",") if s.strip()])
    if controller:
        return ControllerMembership(controller, secret=secret)
    assert etcd is not None  # the one given
    return EtcdMembership(etcd, cluster)


class Registrar:
    """Server-side heartbeat: keeps ``addr`` registered, re-registering after a lost lease."""

    def __init__(self, membership: Membership, addr: str, ttl: float) -> None:
        self.membership = membership
        self.addr = addr
        self.ttl = ttl
        self.lease = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="ems-registrar")

    def start(self) -> None:
        """Register in the background and keep the lease alive every ``ttl / 3`` seconds."""
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.lease or not self.membership.keepalive(self.lease):
                    self.lease = self.membership.register(self.addr, self.ttl)
            except Exception:  # noqa: BLE001 - controller down: retry; clients see us leave meanwhile
                self.lease = 0
            self._stop.wait(self.ttl / 3)

    def stop(self) -> None:
        """Stop heartbeating and leave the ring now."""
        self._stop.set()
        if self.lease:
            try:
                self.membership.revoke(self.lease)
            except Exception:  # noqa: BLE001 - it will expire anyway
                pass
