"""A worker's connection to the router: join, register, receive commands, report load.

Both instance kinds (:mod:`matrixinfer.serve.worker`) hold one. Commands from the router arrive
on a reader thread and go into the worker's :class:`~matrixinfer.engine.commands.Inbox`; a command
that cannot be decoded fails its request (``Failed``, 400) and the worker reads on, since only a
closed or broken connection means the router is gone. The latest
:class:`~matrixinfer.engine.outputs.EngineStats` snapshot goes back every 0.2 s from a reporter
thread (the router's only scheduling input). With a deployment secret, the connection opens with
:mod:`matrixinfer.auth`'s handshake (the router and the worker each prove they hold it).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

import msgspec

from matrixinfer import auth
from matrixinfer.engine.commands import Inbox
from matrixinfer.engine.outputs import EngineStats
from matrixinfer.netio import FRAMING, MessageError, WireError, connect
from matrixinfer.serve import messages as m

log = logging.getLogger(__name__)
_ROUTER_DEC = msgspec.msgpack.Decoder(m.RouterToWorker)
REPORT_INTERVAL = 0.2  # seconds between load reports


def join(router: str, role: str, instance_id: str, secret: bytes | None, timeout: float = 60.0
         ) -> tuple[socket.socket, m.Welcome]:
    """Connect to the router's control port (retrying while it starts), authenticate with ``secret``
    and introduce this process."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = connect(router, timeout=30)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    try:
        if secret is not None:
            auth.client_handshake(sock, secret, "control", f"router {router}")
        FRAMING.send(sock, m.Join(role, instance_id))
        welcome = FRAMING.recv(sock, _ROUTER_DEC, "router")
    except BaseException:
        sock.close()
        raise
    if not isinstance(welcome, m.Welcome):
        raise WireError(f"router sent {type(welcome).__name__} instead of Welcome")
    sock.settimeout(None)
    return sock, welcome


class RouterLink:
    """The control connection of one prefill or decode instance."""

    def __init__(self, router: str, role: str, instance_id: str, inbox: Inbox[Any], stopped: threading.Event,
                 secret: bytes | None = None) -> None:
        self.router = router
        self.instance_id = instance_id
        self.inbox = inbox
        self.stopped = stopped
        self.sock, self.welcome = join(router, role, instance_id, secret)
        self._send_lock = threading.Lock()
        self.stats = EngineStats()

    def send(self, msg: Any) -> None:
        with self._send_lock:
            FRAMING.send(self.sock, msg)

    def register(self, info: m.Register) -> None:
        """Announce the ready engine and start the reader and reporter threads."""
        self.send(info)
        threading.Thread(target=self._read, daemon=True, name="router-reader").start()
        threading.Thread(target=self._report, daemon=True, name="load-reporter").start()

    def _read(self) -> None:
        try:
            while not self.stopped.is_set():
                try:
                    msg = FRAMING.recv(self.sock, _ROUTER_DEC, "router")
                except MessageError as exc:  # one bad command, not a lost router: refuse it, read on
                    self._refuse(exc)
                    continue
                self.inbox.put(msg)
        except (OSError, WireError) as exc:
            if not self.stopped.is_set():
                log.error("%s: lost the router (%s); shutting down", self.instance_id, exc)
                self.stopped.set()
                self.inbox.wake()

    def _refuse(self, exc: MessageError) -> None:
        """Answer a command this worker cannot decode: its request fails (400), the worker goes on."""
        rid = exc.field("request_id")
        log.warning("%s: refused a command from the router: %s", self.instance_id, exc)
        if rid is not None:
            self.send(m.Failed(rid, f"the {exc.field('type') or 'request'} message is invalid: {exc}", 400))

    def _report(self) -> None:
        while not self.stopped.wait(REPORT_INTERVAL):
            try:
                self.send(self.stats)
            except OSError:
                return
