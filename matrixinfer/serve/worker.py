"""Prefill and decode instances of the PDC deployment (``matrixinfer worker --role ...``).

A worker joins the router (:class:`~matrixinfer.serve.router_link.RouterLink`) and obeys it. Its
engine runs on the main thread, which also drains the worker's command inbox between steps; socket
threads only put commands there (or, on a decode instance, write received KV through the engine's
locked reservation methods).

- :class:`PrefillWorker` computes prompts (reusing and filling the EMS context cache through
  :class:`~matrixinfer.serve.pool.EmsConnector`), samples the first token and hands the request
  to the decode instance the router chose (:class:`~matrixinfer.serve.kv_transfer.KVSender`).
- :class:`DecodeWorker` holds blocks for incoming KV (reclaimed after a deadline), receives it
  (:class:`~matrixinfer.serve.kv_transfer.KVReceiver`) and continues each sequence in its
  continuous batch, streaming tokens to the router.

Every connection a worker opens or accepts (router, KV peers, EMS servers and controller) is
authenticated with the deployment ``secret`` (:mod:`matrixinfer.auth`).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from matrixinfer import envs
from matrixinfer.config import EngineConfig
from matrixinfer.engine.commands import Abort, Inbox
from matrixinfer.engine.cpu_affinity import bind_engine_thread, release
from matrixinfer.engine.errors import RequestError
from matrixinfer.engine.kv_connector import KVConnector, MultiConnector
from matrixinfer.engine.llm_engine import LLMEngine
from matrixinfer.engine.outputs import RequestOutput
from matrixinfer.serve import messages as m
from matrixinfer.serve.kv_transfer import KVReceiver, KVSender
from matrixinfer.serve.router_link import RouterLink

log = logging.getLogger(__name__)
STATS_INTERVAL = 0.05  # seconds between stats snapshots (reports go out every 0.2 s)


def quiet_gc() -> None:
    """Freeze start-up objects (model, libraries) out of the collector's view and collect the
    young generations less often: full collections over them were stalling decode steps by tens
    of milliseconds whenever request traffic allocated many small objects."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def build_engine(cfg: EngineConfig, ems: Any, instance_id: str, connector: KVConnector | None,
                 rank_connector: Any = None, secret: bytes | None = None) -> LLMEngine:
    """The instance's engine; with an EMS pool, weights come from its model cache when present
    (and are published there after a cold load, for the next instance). With ``--ep N`` it is rank 0
    of an expert-parallel instance: the routed experts are spread over the N ranks, and so are the
    requests (DP attention; the KV handoff passes through rank 0, see
    :mod:`matrixinfer.parallel.dp_engine`); ``rank_connector``: the EMS connector the other ranks
    build for themselves (with ``secret``, passed in their environment)."""
    from matrixinfer.model.default_model import default_model_path
    from matrixinfer.model.device import resolve_device, resolve_dtype
    from matrixinfer.model.loader import load_model

    path = Path(cfg.model) if cfg.model else default_model_path()
    cfg = dataclasses.replace(cfg, model=str(path))
    model = None
    if ems is not None:
        from matrixinfer.serve.pool import load_model_via_pool, publish_tensors

        model_id = cfg.served_model_name or path.name
        t0 = time.perf_counter()
        dev = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, dev)
        model, version = load_model_via_pool(ems, path, model_id, dtype, dev)
        if model is not None:
            log.info("%s: weights loaded from the EMS model cache in %.2f s", instance_id, time.perf_counter() - t0)
        else:
            model = load_model(path, dtype=dtype, device=dev)
            written = publish_tensors(ems, path, model_id, version)
            log.info("%s: weights loaded from %s; %d bytes published to the EMS model cache",
                     instance_id, path, written)
    from matrixinfer.parallel.launch import make_engine

    # --ep N: rank 0 of N rank processes (they end with this one)
    return make_engine(cfg, model, connector, rank_connector, secret)[0]


class Worker:
    """What both instance kinds share: the router link, the inbox and the engine loop."""

    role = ""

    def __init__(self, router: str, cfg: EngineConfig, ems_servers: list[str] | None = None,
                 instance_id: str | None = None, secret: bytes | None = None) -> None:
        self.instance_id = instance_id or f"{self.role}-{uuid.uuid4().hex[:8]}"
        self.secret = secret
        self.inbox: Inbox[Any] = Inbox()
        self.stopped = threading.Event()
        self.link = RouterLink(router, self.role, self.instance_id, self.inbox, self.stopped, secret)
        welcome = self.link.welcome
        if cfg.model is None and welcome.model_path and Path(welcome.model_path).is_dir():
            cfg = dataclasses.replace(cfg, model=welcome.model_path)
        if cfg.served_model_name is None:
            cfg = dataclasses.replace(cfg, served_model_name=welcome.model_id)
        self.ems = None
        self.ems_servers, self.ems_controller = list(ems_servers or []), welcome.ems_controller
        if ems_servers or welcome.ems_controller:
            from matrixinfer.serve.pool import ems_client

            self.ems = ems_client(ems_servers, welcome.ems_controller, secret)
        self.cfg = cfg
        self._stats_at = 0.0

    def _ems_connector(self, store: str) -> KVConnector | None:
        if self.ems is None:
            return None
        from matrixinfer.serve.pool import EmsConnector

        return EmsConnector(self.ems, self.cfg.block_size, self._ems_namespace(), read=store == "prompt", store=store)

    def _ems_namespace(self) -> str:
        # INT8 cache blocks are another byte layout: keep them apart from other instances' blocks
        return (self.cfg.served_model_name or "") + ("/kv-int8" if self.cfg.kv_cache_dtype == "int8" else "")

    def _rank_connector(self, store: str) -> Any:
        """What the other ranks of an EP instance build their own EMS connector from (None: no pool)."""
        if self.ems is None or self.cfg.ep == 1:
            return None
        from matrixinfer.parallel.messages import RankConnector

        return RankConnector(self.ems_servers, self.ems_controller, self._ems_namespace(), store, self.cfg.block_size)

    def register(self, engine: LLMEngine, kv_addr: str = "") -> None:
        self.engine = engine
        self.link.register(m.Register(self.role, self.instance_id, engine.model_id, kv_addr, engine.max_model_len,
                                      engine.max_seq_len, engine.model.config.vocab_size, engine.runner.num_blocks,
                                      engine.cfg.block_size))
        log.info("%s registered with router %s", self.instance_id, self.link.router)

    def run(self) -> None:
        quiet_gc()
        pinned = bind_engine_thread(self.engine.cfg.cpu_bind, torch.get_num_threads()) \
            if self.engine.runner.device.type == "cpu" else None
        try:
            self._run()
        finally:
            release(pinned)

    def _run(self) -> None:
        while not self.stopped.is_set():
            for msg in self.inbox.drain():
                try:
                    self.handle(msg)
                except Exception as exc:  # one bad command fails its request, never the worker
                    self.refuse(msg, exc)
            self.tick()
            if self.engine.has_work():
                for out in self.engine.step():
                    self.emit(out)
            else:
                self.inbox.wait(0.05)
            self._snapshot()
        self.close()

    def _snapshot(self) -> None:
        now = time.monotonic()
        if now - self._stats_at >= STATS_INTERVAL:
            self._stats_at = now
            self.link.stats = self.engine.stats()

    def handle(self, msg: Any) -> None:
        """Apply one command from the inbox."""
        if isinstance(msg, Abort):
            self.engine.abort(msg.request_id)

    def refuse(self, msg: Any, exc: Exception) -> None:
        """A command whose handling raised: its request fails (500) and frees what it holds."""
        rid = getattr(msg, "request_id", None)
        log.error("%s: %s for %s failed: %r", self.instance_id, type(msg).__name__, rid, exc, exc_info=exc)
        if isinstance(rid, str):
            try:
                self.engine.abort(rid)
            except Exception:  # noqa: BLE001 - the request is answered regardless
                log.exception("%s: aborting %s", self.instance_id, rid)
            self.link.send(m.Failed(rid, f"the {type(msg).__name__} message failed: {exc!r}", 500))

    def tick(self) -> None:
        """Deadlines and retries checked once per loop."""

    def emit(self, out: RequestOutput) -> None:
        self.link.send(out)

    def close(self) -> None:
        """Release what the instance holds when it stops."""


class PrefillWorker(Worker):
    """Computes prompts and hands each request to a decode instance after its first token."""

    role = "prefill"

    def __init__(self, router: str, cfg: EngineConfig, ems_servers: list[str] | None = None,
                 instance_id: str | None = None, secret: bytes | None = None) -> None:
        super().__init__(router, cfg, ems_servers, instance_id, secret)
        self.sender = KVSender(lambda rid, err: self.link.send(m.Failed(rid, err, 503)), secret)
        ems = self._ems_connector("prompt")
        connector = MultiConnector([ems, self.sender]) if ems is not None else self.sender
        engine = build_engine(self.cfg, self.ems, self.instance_id, connector, self._rank_connector("prompt"),
                              self.secret)
        from matrixinfer.parallel.dp_engine import DPEngine

        if isinstance(engine, DPEngine):  # --ep N: every rank prefills (with its own EMS connector), rank 0 sends
            engine.hand_off_from_ranks(self.sender.send_handoff)
        self.register(engine)

    def handle(self, msg: Any) -> None:
        if isinstance(msg, m.Prefill):
            self.sender.destinations[msg.request_id] = msg.decode_addr
            try:
                self.engine.add_request(msg.request_id, msg.prompt_ids, msg.params)
            except RequestError as exc:
                self.sender.destinations.pop(msg.request_id, None)
                self.link.send(m.Failed(msg.request_id, str(exc), 400, exc.param))
        else:
            if isinstance(msg, Abort):  # a request on another EP rank: its destination is dropped here
                self.sender.destinations.pop(msg.request_id, None)
            super().handle(msg)

    def emit(self, out: RequestOutput) -> None:
        if out.finished:  # the first token ended the request: the router frees the reservation
            self.sender.destinations.pop(out.request_id, None)
            self.link.send(out)
        else:  # the first token reaches the client from the decode instance once it holds the KV
            self.link.send(RequestOutput(request_id=out.request_id, handed_off=True))

    def close(self) -> None:
        self.sender.close()


class DecodeWorker(Worker):
    """Reserves blocks for incoming KV, receives it and continues the sequences."""

    role = "decode"

    def __init__(self, router: str, cfg: EngineConfig, ems_servers: list[str] | None = None,
                 instance_id: str | None = None, kv_host: str = "127.0.0.1", secret: bytes | None = None) -> None:
        # decode KV arrives from prefill instances; there is no prompt to match locally
        super().__init__(router, dataclasses.replace(cfg, enable_prefix_caching=False), ems_servers, instance_id,
                         secret)
        connector = self._ems_connector("generated") if self.cfg.store_generated_kv else None
        engine = build_engine(self.cfg, self.ems, self.instance_id, connector,
                              self._rank_connector("generated") if connector is not None else None, self.secret)
        self.pending: list[tuple[m.Reserve, float]] = []  # reservations waiting for free blocks
        self.reserved: dict[str, m.Reserve] = {}
        self.receiver = KVReceiver(engine, kv_host, self.inbox.put, self.stopped, secret)
        self.register(engine, self.receiver.addr)

    def handle(self, msg: Any) -> None:
        if isinstance(msg, m.Reserve):
            self.pending.append((msg, time.monotonic() + msg.timeout))
        elif isinstance(msg, m.KVDone):
            self._attach(msg)
        elif isinstance(msg, Abort):
            self.pending = [(r, d) for r, d in self.pending if r.request_id != msg.request_id]
            self.reserved.pop(msg.request_id, None)
            self.engine.abort(msg.request_id)

    def tick(self) -> None:
        for rid in self.engine.reap_reservations():
            self.reserved.pop(rid, None)
            self.link.send(m.Failed(rid, "KV transfer from the prefill instance timed out", 504))
        still = []
        for msg, deadline in self.pending:
            try:
                blocks = self.engine.reserve(msg.request_id, len(msg.prompt_ids), msg.timeout)
            except RequestError as exc:
                self.link.send(m.Reserved(msg.request_id, False, str(exc)))
                continue
            except Exception as exc:  # noqa: BLE001 - a failed reservation must not end the worker
                log.exception("%s: reserving KV blocks for %s failed", self.instance_id, msg.request_id)
                self.link.send(m.Reserved(msg.request_id, False, f"reserving KV blocks failed: {exc!r}"))
                continue
            if blocks is not None:
                self.reserved[msg.request_id] = msg
                self.link.send(m.Reserved(msg.request_id, True))
            elif time.monotonic() > deadline:
                self.link.send(m.Reserved(msg.request_id, False, "no KV blocks freed up before the deadline"))
            else:
                still.append((msg, deadline))
        self.pending = still

    def _attach(self, done: m.KVDone) -> None:
        req = self.reserved.pop(done.request_id, None)
        if req is None or not self.engine.has_reservation(done.request_id):
            return
        self.engine.sampler.import_state(done.request_id, done.sampler_state, self.engine.runner.device)
        try:
            out = self.engine.attach(done.request_id, req.prompt_ids, done.first_token, done.first_logprob,
                                     req.params, done.num_cached, done.hidden)
        except RequestError as exc:  # e.g. a prefill instance running another model
            self.engine.release_reservation(done.request_id)
            self.link.send(m.Failed(done.request_id, str(exc), 500))
            return
        if req.params.top_logprobs and done.first_top_logprobs:  # the first token was sampled on the prefill side
            out.top_logprobs = [list(done.first_top_logprobs)]
        self.link.send(out)


def run_worker(role: str, router: str, cfg: EngineConfig, kv_host: str, ems: list[str] | None,
               secret: bytes | None) -> int:
    logging.basicConfig(level=envs.log_level(), format=f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s")
    worker: Worker
    if role == "prefill":
        worker = PrefillWorker(router, cfg, ems, secret=secret)
    elif role == "decode":
        worker = DecodeWorker(router, cfg, ems, kv_host=kv_host, secret=secret)
    else:
        raise ValueError(f"worker role must be prefill or decode, got {role!r}")
    # SIGTERM (the launcher stopping) and Ctrl-C (the terminal's whole process group) end the loop quietly
    def stop(signum: int, frame: object) -> None:
        worker.stopped.set()
        worker.inbox.wake()

    signal.signal(signal.SIGTERM, stop)
    try:
        worker.run()
    except KeyboardInterrupt:
        log.info("%s: interrupted; stopping", worker.instance_id)
    return 0
