"""The single-host EMS controller: the ring view, kept by server heartbeats and leases.

:class:`LeaseTable` is the policy (who is live at time t); :class:`Controller` serves it over the
EMS wire protocol, in a thread of the caller's process or as ``matrixinfer ems controller``.
Multi-host deployments use etcd instead (:class:`~matrixinfer.ems.membership.EtcdMembership`).
"""

from __future__ import annotations

import itertools
import socket
import threading
import time

from matrixinfer import netio
from matrixinfer.ems import protocol as p
from matrixinfer.ems.protocol import ErrorCode


class LeaseTable:
    """Server addresses with expiry times; an address leaves when its lease runs out."""

    def __init__(self) -> None:
        self._leases: dict[int, tuple[str, float, float]] = {}  # id -> (addr, ttl, deadline)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def register(self, addr: str, ttl: float, now: float) -> int:
        """Add ``addr`` (replacing its older lease) for ``ttl`` seconds; returns the lease id."""
        with self._lock:
            for lid in [lid for lid, (a, _, _) in self._leases.items() if a == addr]:
                del self._leases[lid]
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
    """TCP front end of a :class:`LeaseTable` (Register, KeepAlive and Members requests)."""

    def __init__(self, host: str = netio.LOOPBACK, port: int = 0) -> None:
        self.table = LeaseTable()
        self.listener = netio.listen(host, port)
        self.address = netio.format_addr(host, self.listener.getsockname()[1])
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
            threading.Thread(target=self._serve_conn, args=(conn,), daemon=True).start()

    def stop(self) -> None:
        """Close the listener."""
        self.listener.close()

    def _serve_conn(self, conn: socket.socket) -> None:
        try:
            with conn:
                while True:
                    req = p.recv_request(conn)
                    now = time.monotonic()
                    if isinstance(req, p.Register):
                        reply = p.Reply(lease=self.table.register(req.addr, req.ttl, now))
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
        except OSError:  # includes ConnectionError and netio.WireError
            pass
