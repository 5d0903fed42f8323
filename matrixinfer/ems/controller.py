"""The single-host EMS controller: the ring view, kept by server heartbeats and leases.

:class:`LeaseTable` is the policy (who is live at time t); :class:`Controller` serves it over the
EMS wire protocol, in a thread of the caller's process or as ``matrixinfer ems controller``.
Multi-host deployments use etcd instead (:class:`~matrixinfer.ems.membership.EtcdMembership`).

The controller decides which servers clients send values to, so it is guarded like a server: with a
deployment secret every connection authenticates first (:mod:`matrixinfer.auth`); connections, request
sizes, idle time and leases are capped, and a registration must name a sound address and lease time.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time

from matrixinfer import auth, netio
from matrixinfer.ems import protocol as p
from matrixinfer.ems.protocol import ErrorCode

MAX_LEASES = 1024  # servers in the ring at once
MAX_ADDR = 262  # characters of a server address ([IPv6 with zone]:port)
MAX_TTL = 3600.0  # seconds of one lease
FRAMING = netio.Framing(p.FRAMING.magic, 4096, "EMS controller")  # its requests are a few dozen bytes


class LeaseTableFull(Exception):
    """No lease can be added: the table holds ``MAX_LEASES``."""


class LeaseTable:
    """Server addresses with expiry times; an address leaves when its lease runs out."""

    def __init__(self, max_leases: int = MAX_LEASES) -> None:
        self.max_leases = max_leases
        self._leases: dict[int, tuple[str, float, float]] = {}  # id -> (addr, ttl, deadline)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def register(self, addr: str, ttl: float, now: float) -> int:
        """Add ``addr`` (replacing its older lease) for ``ttl`` seconds; returns the lease id.
        :class:`LeaseTableFull` when ``max_leases`` live leases are held (expired ones are dropped first)."""
        with self._lock:
            for lid in [lid for lid, (a, _, d) in self._leases.items() if a == addr or d < now]:
                del self._leases[lid]
            if len(self._leases) >= self.max_leases:
                raise LeaseTableFull(f"the controller already holds {self.max_leases} leases")
            lease = next(self._ids)
            self._leases[lease] = (addr, ttl, now + ttl)
            return lease

    def keepalive(self, lease: int, now: float) -> bool:
        """Extend ``lease``; False if it is unknown or already expired."""
        with self._lock:
            entry = self._leases.get(lease)
            if entry is None or entry[2] < now:
                self._leases.pop(lease, None)
                return False
            self._leases[lease] = (entry[0], entry[1], now + entry[1])
            return True

    def members(self, now: float) -> list[str]:
        """Addresses whose lease has not expired at ``now``."""
        with self._lock:
            return sorted(a for a, _, deadline in self._leases.values() if deadline >= now)


class Controller:
    """TCP front end of a :class:`LeaseTable` (Register, KeepAlive and Members requests): at most
    ``max_connections`` at once, each closed after ``idle_timeout`` seconds without a request."""

    def __init__(self, host: str = netio.LOOPBACK, port: int = 0, secret: bytes | None = None,
                 max_connections: int = 256, idle_timeout: float = 30.0, max_leases: int = MAX_LEASES) -> None:
        self.table = LeaseTable(max_leases)
        self.secret = secret
        self.idle_timeout = idle_timeout
        self.listener = netio.listen(host, port)
        self.address = netio.format_addr(host, self.listener.getsockname()[1])
        self._slots = threading.BoundedSemaphore(max_connections)
        self._thread: threading.Thread | None = None

    def start(self) -> Controller:
        """Serve in a daemon thread (for single-host use inside another process)."""
        self._thread = threading.Thread(target=self.serve_forever, daemon=True, name="ems-controller")
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Accept until the listener is closed."""
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                conn.close()  # at the connection cap
                continue
            threading.Thread(target=self._serve_conn, args=(conn,), daemon=True).start()

    def stop(self) -> None:
        """Close the listener."""
        self.listener.close()

    def _serve_conn(self, conn: socket.socket) -> None:
        try:
            with conn:
                netio.set_timeouts(conn, min(self.idle_timeout, auth.HANDSHAKE_TIMEOUT))
                if self.secret is not None:
                    try:
                        auth.server_handshake(conn, self.secret, "ems-controller", "EMS controller client")
                    except auth.AuthError as exc:
                        if exc.first == p.FRAMING.magic:  # an EMS peer without the secret: tell it why
                            p.refuse_unauthenticated(conn)
                        raise
                netio.set_timeouts(conn, self.idle_timeout)
                while True:
                    try:
                        req = FRAMING.recv(conn, p.request_decoder, "EMS controller client")
                    except netio.MessageError as exc:
                        p.send_frame(conn, p.Reply(code=ErrorCode.BAD_REQUEST, error=str(exc)))
                        continue
                    now = time.monotonic()
                    if isinstance(req, p.Register):
                        reply = self._register(req, now)
                    elif isinstance(req, p.KeepAlive):
                        ok = self.table.keepalive(req.lease, now)
                        reply = p.Reply() if ok else p.Reply(code=ErrorCode.UNKNOWN_LEASE,
                                                             error=f"lease {req.lease} expired")
                    elif isinstance(req, p.Members):
                        reply = p.Reply(members=self.table.members(now))
                    else:
                        reply = p.Reply(code=ErrorCode.UNSUPPORTED,
                                        error=f"the controller does not serve {type(req).__name__}")
                    p.send_frame(conn, reply)
        except OSError:  # includes ConnectionError, netio.WireError, auth.AuthError and timeouts
            pass
        finally:
            self._slots.release()

    def _register(self, req: p.Register, now: float) -> p.Reply:
        try:
            netio.parse_addr(req.addr)
            if len(req.addr) > MAX_ADDR or not 0 < req.ttl <= MAX_TTL:
                raise ValueError(f"an address of at most {MAX_ADDR} characters and a lease of (0, {MAX_TTL:.0f}] "
                                 f"seconds are needed, got {len(req.addr)} characters and {req.ttl} s")
            return p.Reply(lease=self.table.register(req.addr, req.ttl, now))
        except ValueError as exc:
            return p.Reply(code=ErrorCode.BAD_REQUEST, error=str(exc))
        except LeaseTableFull as exc:
            return p.Reply(code=ErrorCode.FULL, error=str(exc))
