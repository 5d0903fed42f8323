"""The engine on a background thread, driven from asyncio: requests stream their outputs through
per-request queues, and a cancelled consumer (client disconnect) aborts its request.

A failure while processing one request fails that request only (the engine's step isolates it,
and a command that raises is answered to its request); the loop stops, and every client is told,
only when the engine itself is broken (``LLMEngine.step`` raising after repeated failed steps).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator

import torch

from matrixinfer.engine.commands import Abort, AddRequest, Inbox
from matrixinfer.engine.cpu_affinity import bind_engine_thread, release
from matrixinfer.engine.errors import EngineDeadError, RequestFailedError
from matrixinfer.engine.llm_engine import LLMEngine
from matrixinfer.engine.outputs import EngineStats, RequestOutput, drain
from matrixinfer.engine.sampling_params import SamplingParams
from matrixinfer.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class AsyncEngine:
    """Owns an :class:`LLMEngine`; all engine calls happen on its thread. Implements the API
    server's :class:`~matrixinfer.serve.backend.Backend` for the colocated deployment."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._inbox: Inbox[AddRequest | Abort] = Inbox()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._stop = False
        self.error: BaseException | None = None
        self.stats: EngineStats = engine.stats()
        self._thread = threading.Thread(target=self._loop, name="matrixinfer-engine", daemon=True)
        self._thread.start()

    # -- what the API server reads --------------------------------------------------------------
    @property
    def model_id(self) -> str:
        return self.engine.model_id

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def max_seq_len(self) -> int:
        return self.engine.max_seq_len

    @property
    def vocab_size(self) -> int:
        return self.engine.model.config.vocab_size

    def health(self) -> str | None:
        return None if self.alive else f"engine is not running: {self.error!r}"

    def instance_metrics(self) -> list[tuple[str, str, EngineStats]]:
        """Per-instance stats: none here (one engine; its stats are the deployment's)."""
        return []

    def shutdown(self) -> None:
        self._stop = True
        self._inbox.wake()
        self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams
                       ) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its outputs until it finishes; aborts it if the consumer stops."""
        if not self.alive:
            raise EngineDeadError(f"engine is not running: {self.error!r}")
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._streams[request_id] = (loop, q)
        self._inbox.put(AddRequest(request_id, prompt_ids, params))
        finished = False
        try:
            async for item in drain(q):
                yield item
                finished = item.finished
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(Abort(request_id))

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        self._deliver_all([(request_id, item)])

    def _deliver_all(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """Hand ``(request id, output or error)`` pairs to their consumers, one callback per event
        loop (a step's outputs wake each loop once instead of once per request)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput | BaseException]]] = {}
        with self._lock:
            for request_id, item in items:
                target = self._streams.get(request_id)
                if target is not None:
                    by_loop.setdefault(target[0], []).append((target[1], item))
        for loop, pairs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, pairs)
            except RuntimeError:  # the consumers' loop is closed
                pass

    def _apply(self, command: AddRequest | Abort) -> None:
        """Apply one command; a command that fails fails its request only, never the loop."""
        rid = command.request_id
        try:
            if isinstance(command, AddRequest):
                self.engine.add_request(rid, command.prompt_ids, command.params)
            else:
                self.engine.abort(rid)
        except ValueError as exc:  # RequestError: a request the engine refuses (400)
            self._deliver(rid, exc)
        except Exception as exc:
            log.exception("request %s: %s failed", rid, type(command).__name__)
            self._deliver(rid, RequestFailedError(f"processing the request failed: {exc!r}"))

    def _pin(self) -> list[int] | None:
        """This thread's OpenMP team pinned per ``--cpu-bind`` (engine/cpu_affinity.py), on a CPU
        engine (stand-in engines without a runner are left alone)."""
        cfg, runner = getattr(self.engine, "cfg", None), getattr(self.engine, "runner", None)
        if cfg is None or runner is None or runner.device.type != "cpu":
            return None
        return bind_engine_thread(cfg.cpu_bind, torch.get_num_threads())

    def _loop(self) -> None:
        pinned = self._pin()
        try:
            while not self._stop:
                for command in self._inbox.drain():
                    self._apply(command)
                if not self.engine.has_work():
                    self.stats = self.engine.stats()
                    self._inbox.wait(0.5)
                    continue
                self._deliver_all([(out.request_id, out) for out in self.engine.step()])
                self.stats = self.engine.stats()
        except BaseException as exc:  # the engine itself is broken (step() isolates per-request failures):
            # report to every waiting client instead of hanging them
            log.exception("engine loop failed")
            self.error = exc
            with self._lock:
                ids = list(self._streams)
            for rid in ids:
                self._deliver(rid, EngineDeadError(f"engine failed: {exc!r}"))
        finally:
            release(pinned)


def _put_all(pairs: list[tuple[asyncio.Queue, RequestOutput | BaseException]]) -> None:
    for q, item in pairs:
        q.put_nowait(item)
