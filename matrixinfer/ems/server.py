"""The EMS server process: a TCP front end (one thread per connection) over :class:`EmsService`.

Values go straight from the socket into a reserved arena block and from a pinned arena block into
the socket. Same-host clients continue on an abstract unix socket named in the ``Hello`` reply
(its round trips are cheaper than loopback TCP's). Run it with ``matrixinfer ems-server`` or
``python -m matrixinfer.ems.server``; it prints ``EMS server listening on HOST:PORT`` once it
accepts connections.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading

from matrixinfer.ems import protocol as p
from matrixinfer.ems.service import EmsService, NamespaceConfig, NamespaceRefused, Session
from matrixinfer.ems.store import EmsStoreError

SOCKET_BUFFER = int(os.environ.get("EMS_SOCKET_BUFFER", "0"))


def tune_socket(sock: socket.socket) -> None:
    """Low latency for small requests (buffers left to the kernel's autotuning unless set)."""
    if sock.family != socket.AF_UNIX:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if SOCKET_BUFFER:
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)


class EmsServer:
    """Accepts connections and serves EMS requests for one :class:`EmsService`."""

    def __init__(self, service: EmsService, host: str = "127.0.0.1", port: int = 0) -> None:
        self.service = service
        self.listener = socket.create_server((host, port), reuse_port=False, backlog=128)
        self.address = f"{host}:{self.listener.getsockname()[1]}"
        self.local_listener, self.local_address = self._listen_local() if service.arena else (None, "")
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
            tune_socket(conn)
            threading.Thread(target=self._serve_conn, args=(conn,), daemon=True, name="ems-conn").start()

    def stop(self) -> None:
        """Stop accepting and unlink the arena."""
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
                while True:
                    req = p.recv_request(conn)
                    if not session.namespace and not isinstance(req, (p.Hello, p.Stats)):
                        p.send_frame(conn, p.Reply(code="no_session", error="send Hello(namespace) first"))
                        continue
                    self._dispatch(conn, session, req)
        except (ConnectionError, OSError, p.ProtocolError):
            pass
        finally:
            self.service.close(session)

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
                p.send_frame(conn, p.Reply(code="bad_request", error=f"Reserve needs one size per key of <= {p.MAX_KEY} bytes"))
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
                p.send_frame(conn, p.Reply(code="refused", error=str(exc)))
                return
            arena = svc.arena
            if arena is None:
                p.send_frame(conn, p.Reply(server_id=svc.server_id, host_id=svc.host_id))
                return
            p.send_frame(conn, p.Reply(server_id=svc.server_id, host_id=svc.host_id, arena_path=arena.path,
                                       arena_size=arena.size, index_offset=arena.extra_offset,
                                       index_slots=svc.index_slots, index_salt=svc.salt_of(session.namespace),
                                       local_addr=self.local_address))
        elif isinstance(req, p.Stats):
            p.send_frame(conn, p.Reply(stats=svc.stats()))
        else:
            p.send_frame(conn, p.Reply(code="unsupported", error=f"an EMS server does not serve {type(req).__name__}"))

    def _put(self, conn: socket.socket, session: Session, req: p.Put) -> None:
        if len(req.keys) != len(req.sizes) or min(req.sizes, default=0) < 0:
            raise p.ProtocolError(f"Put with {len(req.keys)} keys and sizes {req.sizes[:8]}...: cannot frame payloads")
        codes = []
        for key, size in zip(req.keys, req.sizes):
            if len(key) > p.MAX_KEY:
                p.discard(conn, size)
                codes.append("key_too_long")
                continue
            try:
                offset = self.service.reserve(session, size)
            except EmsStoreError as exc:
                p.discard(conn, size)
                codes.append(exc.code)
                continue
            try:
                p.recv_exact(conn, self.service.view[offset:offset + size])
            except BaseException:
                self.service.abort(session, offset)
                raise
            self.service.commit(session, key, offset, size)
            codes.append("")
        p.send_frame(conn, p.Reply(codes=codes))


def parse_size(text: str) -> int:
    """``"512M"``, ``"4G"``, ``"1048576"`` -> bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except (ValueError, IndexError) as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 4096, 512M or 4G") from exc


def parse_namespace(text: str) -> tuple[str, NamespaceConfig]:
    """``NAME=QUOTA[:TOKEN]`` -> ``(NAME, NamespaceConfig)``."""
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"namespace {text!r} is not NAME=QUOTA[:TOKEN]")
    quota, _, token = rest.partition(":")
    return name, NamespaceConfig(parse_size(quota), token)


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """Options of ``matrixinfer ems-server``."""
    parser.add_argument("--capacity", type=parse_size, required=True, help="DRAM arena size, e.g. 4G")
    parser.add_argument("--ssd-dir", help="directory of the SSD tier (kept across restarts)")
    parser.add_argument("--ssd-capacity", type=parse_size, default=0, help="SSD tier size, e.g. 100G")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0 picks a free one)")
    parser.add_argument("--advertise", help="address clients should use (default: the listen address)")
    parser.add_argument("--namespace", action="append", type=parse_namespace, default=[],
                        metavar="NAME=QUOTA[:TOKEN]", help="declare a namespace with a DRAM quota and token")
    parser.add_argument("--closed", action="store_true", help="refuse namespaces that were not declared")
    parser.add_argument("--default-quota", type=parse_size, help="quota of undeclared namespaces")
    parser.add_argument("--controller", help="HOST:PORT of an EMS controller to join")
    parser.add_argument("--etcd", help="etcd endpoint URL(s), comma-separated, to join (multi-host)")
    parser.add_argument("--cluster", default="default", help="ring name in the controller or etcd")
    parser.add_argument("--lease-ttl", type=float, default=3.0, help="membership lease seconds")


def run_server(args: argparse.Namespace) -> int:
    """Start a server from parsed arguments and block until SIGTERM/SIGINT."""
    service = EmsService(args.capacity, args.ssd_dir, args.ssd_capacity, dict(args.namespace),
                         open_namespaces=not args.closed, default_quota=args.default_quota)
    host, port = p.parse_addr(args.listen)
    server = EmsServer(service, host, port)
    advertise = args.advertise or server.address
    registrar = None
    if args.controller or args.etcd:
        from matrixinfer.ems.membership import Registrar, membership_from

        registrar = Registrar(membership_from(controller=args.controller, etcd=args.etcd, cluster=args.cluster),
                              advertise, args.lease_ttl)
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
    return run_server(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
