"""Commands to a single-threaded engine loop, and the inbox that carries them across threads.

The colocated :class:`~matrixinfer.engine.async_engine.AsyncEngine` and the PDC workers share this
inbox: asyncio handlers or socket reader threads put typed commands (these structs, or the router's
messages in :mod:`matrixinfer.serve.messages`), and the loop that owns the engine drains them
between steps, so the engine itself is never touched from two threads.
"""

from __future__ import annotations

import queue
import threading
from typing import Generic, TypeVar

import msgspec

from matrixinfer.engine.sampling_params import SamplingParams

T = TypeVar("T")


class AddRequest(msgspec.Struct, tag=True):
    """Queue a request on the engine."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


class Abort(msgspec.Struct, tag=True):
    """Drop a request and free everything it holds (also a router -> worker message)."""

    request_id: str


class Inbox(Generic[T]):
    """Commands put from any thread, drained by the engine loop's thread."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[T] = queue.SimpleQueue()
        self._wake = threading.Event()

    def put(self, command: T) -> None:
        self._queue.put(command)
        self._wake.set()

    def wake(self) -> None:
        """Wake the loop without a command (shutdown, a deadline to check)."""
        self._wake.set()

    def drain(self) -> list[T]:
        """Every command queued so far, oldest first."""
        out = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    def wait(self, timeout: float) -> None:
        """Sleep until a command arrives or ``timeout`` seconds pass."""
        self._wake.wait(timeout)
        self._wake.clear()
