"""The HTTP server's connection limits: uvicorn's h11 protocol with a request-read deadline and a cap
on open connections.

uvicorn waits forever for a request's headers and body, so a client that sends them a byte at a time
("slowloris") holds a connection, a file descriptor and its buffers for as long as it likes, and
enough such clients stop the server from accepting anyone. :class:`GuardedH11Protocol` closes a
connection whose request (headers and body) has not fully arrived ``request_read_timeout`` seconds
after its first byte (or after the connection opened), and refuses connections beyond
``max_connections`` by closing them at once. Idle keep-alive connections are closed by uvicorn's own
``timeout_keep_alive``. Streaming responses are not limited: the deadline covers only reading the
request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from matrixinfer.config import ServeConfig

log = logging.getLogger(__name__)

_WARN_EVERY_S = 10.0


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on reading each request and a cap on connections
    (configured by :func:`uvicorn_config`)."""

    request_read_timeout: float = ServeConfig.request_read_timeout
    max_connections: int = ServeConfig.max_connections
    _last_warning = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            _warn(f"refused a connection: {self.max_connections} connections are open (--max-connections)")
            transport.close()
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._read_deadline is None and self._between_requests():
            self._arm()  # the first byte of the next request on a kept-alive connection
        super().data_received(data)
        if self._request_received():
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _request_received(self) -> bool:
        """The whole request (headers and body) has arrived and is being answered."""
        return self.cycle is not None and not self.cycle.more_body and not self.cycle.response_complete

    def _arm(self) -> None:
        self._disarm()
        self._read_deadline = self.loop.call_later(self.request_read_timeout, self._read_timed_out)

    def _disarm(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _read_timed_out(self) -> None:
        self._read_deadline = None
        if self._request_received():
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        _warn(f"closed the connection from {client}: its request did not arrive within "
              f"{self.request_read_timeout:g} s (--request-read-timeout)")
        self.transport.close()


def _warn(message: str) -> None:
    """Log at most one warning per ``_WARN_EVERY_S`` (a flood of bad connections must not flood the log)."""
    now = time.monotonic()
    if now - GuardedH11Protocol._last_warning >= _WARN_EVERY_S:
        GuardedH11Protocol._last_warning = now
        log.warning(message)


def uvicorn_config(app: Any, cfg: ServeConfig) -> Any:
    """A ``uvicorn.Config`` serving ``app`` on ``cfg``'s address through :class:`GuardedH11Protocol`
    with ``cfg``'s limits."""
    import uvicorn

    protocol = type("GuardedH11", (GuardedH11Protocol,), {"request_read_timeout": cfg.request_read_timeout,
                                                         "max_connections": cfg.max_connections})
    return uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, http=protocol)
