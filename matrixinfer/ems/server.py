"""The EMS server process: a TCP front end (one thread per connection) over :class:`EmsService`.

Values go straight from the socket into a reserved arena block and from a pinned arena block into
the socket. Same-host clients continue on an abstract unix socket named in the ``Hello`` reply
(its round trips are cheaper than loopback TCP's); there a client of the server's own OS user
receives the arena's descriptor with its ``Hello`` reply (SCM_RIGHTS) and maps it. Run it with
``matrixinfer ems-server`` or ``python -m matrixinfer.ems.server``; it prints ``EMS server
listening on HOST:PORT`` once it accepts connections.

With a deployment secret every connection, on either socket, opens with :mod:`matrixinfer.auth`'s
handshake before its first request; one that does not complete it within ``auth.HANDSHAKE_TIMEOUT``
is closed. Namespace tokens still separate the namespaces of authenticated clients.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import struct
import sys
import threading

from matrixinfer import auth, netio
from matrixinfer.ems import protocol as p
from matrixinfer.ems.config import EmsServerConfig, add_server_args, server_config
from matrixinfer.ems.protocol import ErrorCode
from matrixinfer.ems.service import EmsService, NamespaceRefused, Session
from matrixinfer.ems.store import EmsStoreError

log = logging.getLogger(__name__)


class EmsServer:
    """Accepts connections and serves EMS requests for one :class:`EmsService`.

    At most ``max_connections`` connections are served at once (more are closed as they arrive);
    a connection that sends nothing, or stalls mid-frame, for ``idle_timeout`` seconds is closed,
    so no client holds a thread forever (the SDK reconnects a connection the server closed).
    """

    def __init__(self, service: EmsService, host: str = netio.LOOPBACK, port: int = 0,
                 max_connections: int = 1024, idle_timeout: float = 300.0, secret: bytes | None = None) -> None:
        self.service = service
        self.secret = secret
        self.listener = netio.listen(host, port)
        self.address = netio.format_addr(host, self.listener.getsockname()[1])
        self.local_listener, self.local_address = self._listen_local() if service.arena else (None, "")
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        self._stop = threading.Event()

    def _listen_local(self) -> tuple[socket.socket | None, str]:
        """An abstract unix socket (Linux; scoped to this network namespace, gone with the process)."""
        name = f"\0matrixinfer-ems-{os.getpid()}-{self.service.server_id}"
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(name)
            sock.listen(128)
        except OSError:
            return None, ""  # no abstract namespace here: same-host clients stay on TCP
        return sock, name

    def serve_forever(self) -> None:
        """Accept until :meth:`stop`; also sweeps expired leases once a second."""
        threading.Thread(target=self._sweep, daemon=True, name="ems-lease-sweeper").start()
        if self.local_listener is not None:
            threading.Thread(target=self._accept, args=(self.local_listener,), daemon=True, name="ems-local").start()
        self._accept(self.listener)

    def _accept(self, listener: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                break
            if not self._slots.acquire(blocking=False):
                log.warning("EMS server %s: %d connections already open; closing a new one", self.address,
                            self.max_connections)
                conn.close()
                continue
            try:
                p.tune_socket(conn)
                netio.set_timeouts(conn, min(self.idle_timeout, auth.HANDSHAKE_TIMEOUT) if self.secret
                                   else self.idle_timeout)
                threading.Thread(target=self._serve_conn, args=(conn,), daemon=True, name="ems-conn").start()
            except BaseException:
                conn.close()
                self._slots.release()
                raise

    def stop(self) -> None:
        """Stop accepting and release the arena."""
        self._stop.set()
        self.listener.close()
        if self.local_listener is not None:
            self.local_listener.close()
        self.service.shutdown()

    def _sweep(self) -> None:
        while not self._stop.wait(1.0):
            self.service.expire_leases()

    def _serve_conn(self, conn: socket.socket) -> None:
        session = Session()
        try:
            with conn:
                if self.secret is not None:
                    try:
                        auth.server_handshake(conn, self.secret, "ems", "EMS client")
                    except auth.AuthError as exc:
                        if exc.first == p.FRAMING.magic:  # an EMS client without the secret: tell it why
                            p.refuse_unauthenticated(conn)
                        raise
                    netio.set_timeouts(conn, self.idle_timeout)
                while True:
                    req = p.recv_request(conn)
                    if not session.namespace and not isinstance(req, p.Hello):
                        p.send_frame(conn, p.Reply(code=ErrorCode.NO_SESSION, error="send Hello(namespace) first"))
                        continue
                    self._dispatch(conn, session, req)
        except OSError:  # includes ConnectionError, netio.WireError and timeouts: the client went away,
            pass  # went quiet or spoke nonsense
        except Exception:  # a bug must cost this connection only, never the server
            log.exception("EMS server %s: connection failed", self.address)
        finally:
            self.service.close(session)
            self._slots.release()

    def _dispatch(self, conn: socket.socket, session: Session, req: p.Request) -> None:
        svc = self.service
        if isinstance(req, p.Get):
            if req.release:
                svc.release(session, req.release)
            entries = svc.lookup(session, req.keys)
            sizes = [p.MISS if e is None else len(e) if isinstance(e, bytearray) else e.size for e in entries]
            if req.lease:  # same host: offsets into the arena, bytes only for values not in it
                lease = svc.lease(session, entries)
                offsets = [p.INLINE if isinstance(e, bytearray) else e.offset if e else -1 for e in entries]
                p.send_frame(conn, p.Reply(sizes=sizes, offsets=offsets, lease=lease),
                             [e for e in entries if isinstance(e, bytearray)])
                return
            try:
                p.send_frame(conn, p.Reply(sizes=sizes), [e if isinstance(e, bytearray) else
                                                          svc.view[e.offset:e.offset + e.size] for e in entries if e])
            finally:
                svc.unpin(entries)
        elif isinstance(req, p.Put):
            self._put(conn, session, req)
        elif isinstance(req, p.Release):
            svc.release(session, req.lease)  # no reply: the client does not wait for it
        elif isinstance(req, p.IndexHits):
            svc.count_index_hits(session, req.count)  # no reply either
        elif isinstance(req, p.Exists):
            p.send_frame(conn, p.Reply(found=svc.exists(session, req.keys)))
        elif isinstance(req, p.Delete):
            p.send_frame(conn, p.Reply(found=svc.delete(session, req.keys)))
        elif isinstance(req, p.Reserve):
            if len(req.keys) != len(req.sizes) or any(len(k) > p.MAX_KEY for k in req.keys):
                p.send_frame(conn, p.Reply(code=ErrorCode.BAD_REQUEST,
                                           error=f"Reserve needs one size per key of <= {p.MAX_KEY} bytes"))
                return
            rid, offsets, codes = svc.reserve_many(session, req.keys, req.sizes)
            p.send_frame(conn, p.Reply(offsets=offsets, codes=codes, lease=rid))
        elif isinstance(req, p.Commit):
            svc.commit_many(session, req.reservation, req.abort)
            p.send_frame(conn, p.Reply())
        elif isinstance(req, p.Hello):
            try:
                svc.open(session, req.namespace, req.token)
            except NamespaceRefused as exc:
                p.send_frame(conn, p.Reply(code=ErrorCode.REFUSED, error=str(exc)))
                return
            arena = svc.arena
            if arena is None:
                p.send_frame(conn, p.Reply(server_id=svc.server_id, host_id=svc.host_id))
                return
            reply = p.Reply(server_id=svc.server_id, host_id=svc.host_id, arena_size=arena.size,
                            index_offset=arena.extra_offset, index_slots=svc.index_slots,
                            index_salt=svc.salt_of(session.namespace), local_addr=self.local_address)
            if conn.family == socket.AF_UNIX and _peer_is_this_user(conn):  # may map the whole arena
                reply.arena_fd = session.maps_arena = True
                p.send_reply_with_fd(conn, reply, arena.fd)
            else:
                p.send_frame(conn, reply)
        elif isinstance(req, p.Stats):
            p.send_frame(conn, p.Reply(stats=svc.stats(viewer=session.namespace)))
        else:
            p.send_frame(conn, p.Reply(code=ErrorCode.UNSUPPORTED,
                                       error=f"an EMS server does not serve {type(req).__name__}"))

    def _put(self, conn: socket.socket, session: Session, req: p.Put) -> None:
        if len(req.keys) != len(req.sizes) or min(req.sizes, default=0) < 0:
            raise netio.WireError(f"Put with {len(req.keys)} keys and sizes {req.sizes[:8]}...: cannot frame payloads")
        codes: list[ErrorCode] = []
        for key, size in zip(req.keys, req.sizes):
            if len(key) > p.MAX_KEY:
                netio.discard(conn, size)
                codes.append(ErrorCode.KEY_TOO_LONG)
                continue
            try:
                offset = self.service.reserve(session, size)
            except EmsStoreError as exc:
                netio.discard(conn, size)
                codes.append(exc.code)
                continue
            try:
                netio.recv_exact_into(conn, self.service.view[offset:offset + size])
            except BaseException:
                self.service.abort(session, offset)
                raise
            self.service.commit(session, key, offset, size)
            codes.append(ErrorCode.OK)
        p.send_frame(conn, p.Reply(codes=codes))


def _peer_is_this_user(conn: socket.socket) -> bool:
    """Whether the process at the other end of a unix socket runs as this server's user (the trust
    boundary of the same-host fast path)."""
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return False
    _, uid, _ = struct.unpack("3i", creds)
    return uid == os.geteuid()


def run_server(cfg: EmsServerConfig) -> int:
    """Serve ``cfg`` until SIGTERM/SIGINT (after printing ``EMS server listening on ADDR``)."""
    host, port = netio.parse_addr(cfg.listen)  # a bad address fails before the arena is created
    secret = auth.load_secret(cfg.secret_file)  # and so does an unusable secret
    service = EmsService.from_config(cfg)
    try:
        server = EmsServer(service, host, port, cfg.max_connections, cfg.idle_timeout, secret)
    except BaseException:  # e.g. the port is taken: do not leave the shared segment behind
        service.shutdown()
        raise
    advertise = cfg.advertise or server.address
    registrar = None
    if cfg.controller or cfg.etcd:
        from matrixinfer.ems.membership import Registrar, membership_from

        registrar = Registrar(membership_from(controller=cfg.controller, etcd=cfg.etcd, cluster=cfg.cluster,
                                              secret=secret),
                              advertise, cfg.lease_ttl)
        registrar.start()

    def _stop(signum: int, frame: object) -> None:
        if registrar:
            registrar.stop()
        server.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(f"EMS server listening on {advertise}", flush=True)
    try:
        server.serve_forever()
    finally:
        service.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m matrixinfer.ems.server``."""
    parser = argparse.ArgumentParser(prog="matrixinfer ems-server", description="Run one EMS memory-pool server.")
    add_server_args(parser)
    return run_server(server_config(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
