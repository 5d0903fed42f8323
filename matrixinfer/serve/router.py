"""The PDC router: the API's backend when prefill and decode run as separate instances.

Stateless global scheduling: each request goes to the least-loaded decode instance (which first
reserves KV blocks for it) and the least-loaded prefill instance (which computes the prompt, pulls
cached prefix blocks from EMS, and pushes the KV to that decode instance). Tokens stream back from
the decode instance. Workers join over the control port (``matrixinfer worker --router``); a lost
prefill instance's unfinished requests are retried elsewhere, a lost decode instance's requests end
with an error while everything else keeps running. An instance that sends nothing (not even its
load report, due every 0.2 s) for ``frozen_after`` seconds is treated as lost but kept: nothing is
routed to it until it speaks again.

With a deployment secret (:mod:`matrixinfer.auth`) a worker must prove it holds the secret before it
may join; an instance id already registered cannot be taken by another connection; the limits a
worker reports are checked and clamped to the model's, and recomputed whenever an instance leaves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from matrixinfer import auth
from matrixinfer.config import ModelConfig
from matrixinfer.engine.commands import Abort
from matrixinfer.engine.errors import EngineDeadError, RequestError, RequestFailedError
from matrixinfer.engine.outputs import EngineStats, RequestOutput, drain, sum_stats
from matrixinfer.engine.sampling_params import SamplingParams
from matrixinfer.model.tokenizer import Tokenizer
from matrixinfer.netio import FRAMING, MessageError, WireError, format_addr, parse_addr
from matrixinfer.serve import messages as m
from matrixinfer.serve.metrics import COUNTER_FIELDS
from matrixinfer.serve.router_policy import InstanceLoad, pick_instance

log = logging.getLogger(__name__)
_DEC = msgspec.msgpack.Decoder(m.WorkerToRouter)
FROZEN_AFTER_S = 10.0  # an instance silent this long (it reports load every 0.2 s) is treated as frozen
WATCH_INTERVAL_S = 0.5
MAX_CONNECTIONS = 256  # control connections at once (workers and handshakes in progress)
MAX_INSTANCE_ID = 128  # characters of an instance id


def counters_only(stats: EngineStats) -> EngineStats:
    """``stats`` with its gauges zeroed (what stays counted after its instance is gone)."""
    return EngineStats(**{name: getattr(stats, name) for name in COUNTER_FIELDS})


@dataclass
class Instance:
    """A registered worker and what the router knows of it."""

    info: m.Register
    writer: asyncio.StreamWriter
    stats: EngineStats = field(default_factory=EngineStats)
    assigned_tokens: int = 0
    requests: set[str] = field(default_factory=set)
    last_heard: float = field(default_factory=time.monotonic)
    frozen: bool = False  # silent past the router's frozen_after: not routed to until it speaks again

    def send(self, msg: m.RouterToWorker) -> None:
        try:
            frame = FRAMING.encode(msg)
        except (OverflowError, UnicodeEncodeError, TypeError, ValueError) as exc:  # what msgspec cannot encode
            raise RequestError(f"the request cannot be sent to instance {self.info.instance_id}: {exc}") from None
        self.writer.write(frame)

    def view(self) -> InstanceLoad:
        s = self.stats
        return InstanceLoad(self.info.instance_id, s.queued_tokens, s.kv_used, max(s.kv_total, 1), self.assigned_tokens)


@dataclass
class Pending:
    """A request in flight."""

    prompt_ids: list[int]
    params: SamplingParams
    queue: asyncio.Queue
    prefill: str | None = None
    decode: str | None = None
    reserved: asyncio.Future | None = None
    got_first: bool = False
    tried: set[str] = field(default_factory=set)


class Router:
    """Implements the API server's backend interface over prefill and decode instances."""

    def __init__(self, model_path: Path, served_model_name: str | None = None, reserve_timeout: float = 30.0,
                 max_prefill_retries: int = 3, ems_controller: str = "", frozen_after: float = FROZEN_AFTER_S,
                 secret: bytes | None = None) -> None:
        cfg = ModelConfig.from_file(model_path)
        self.secret = secret  # None: workers join unauthenticated (in-process tests only; `serve` always has one)
        self.tokenizer = Tokenizer(model_path)
        self.model_path = model_path
        self.ems_controller = ems_controller
        self.model_id = served_model_name or model_path.name
        self.model_max_len = cfg.max_position_embeddings
        self.max_model_len = cfg.max_position_embeddings
        self.max_seq_len = cfg.max_position_embeddings
        self.vocab_size = cfg.vocab_size
        self.reserve_timeout = reserve_timeout
        self.max_prefill_retries = max_prefill_retries
        self.instances: dict[str, Instance] = {}
        self.pending: dict[str, Pending] = {}
        self.ctrl_addr = ""
        self.lost_instances = 0
        self.frozen_after = frozen_after
        self.frozen_instances = 0  # times an instance was found frozen
        self.retired = EngineStats()  # counters of instances that left: the deployment's counters never go back
        self.refused_workers = 0  # connections that failed authentication or registration
        self._connections = 0
        self._turn: dict[str, int] = {}

    # -- backend interface ------------------------------------------------------------------------
    def health(self) -> str | None:
        """A request needs a responsive prefill and decode instance."""
        missing = [role for role in ("prefill", "decode") if not self.role(role)]
        return f"no {' and no '.join(missing)} instance is registered and responding" if missing else None

    @property
    def stats(self) -> EngineStats:
        """The deployment's totals: every instance's last report, summed field by field, plus the
        counters of instances that are gone (so a restarted instance does not reset them)."""
        return sum_stats([*(i.stats for i in self.instances.values()), self.retired])

    def instance_metrics(self) -> list[tuple[str, str, EngineStats]]:
        return [(i.info.instance_id, i.info.role, i.stats) for i in self.instances.values()]

    def role(self, role: str) -> list[Instance]:
        """The registered, responsive instances of ``role`` (frozen ones are not routed to)."""
        return [i for i in self.instances.values() if i.info.role == role and not i.frozen]

    def _candidates(self, role: str) -> list[InstanceLoad]:
        """Views of one role's instances, rotated per call so equally loaded ones take turns."""
        views = [i.view() for i in self.role(role)]
        self._turn[role] = self._turn.get(role, 0) + 1
        k = self._turn[role] % len(views) if views else 0
        return views[k:] + views[:k]

    async def wait_for(self, prefill: int, decode: int, timeout: float) -> None:
        """Block until at least this many instances of each role registered."""
        deadline = time.monotonic() + timeout
        while len(self.role("prefill")) < prefill or len(self.role("decode")) < decode:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(self.role('prefill'))} prefill / {len(self.role('decode'))} "
                                   f"decode instance(s) registered within {timeout:.0f} s")
            await asyncio.sleep(0.1)

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams
                       ) -> AsyncIterator[RequestOutput]:
        if any(not 0 <= t < self.vocab_size for t in prompt_ids):
            raise RequestError(f"prompt token ids must be in [0, {self.vocab_size})")
        req = Pending(list(prompt_ids), params, asyncio.Queue())
        self.pending[request_id] = req
        finished = False
        try:
            await self._reserve(request_id, req)
            self._start_prefill(request_id, req)
            async for item in drain(req.queue):
                yield item
                finished = item.finished
        finally:
            self._forget(request_id, abort=not finished)

    # -- orchestration ------------------------------------------------------------------------------
    async def _reserve(self, rid: str, req: Pending) -> None:
        decode_id = pick_instance(self._candidates("decode"))
        if decode_id is None:
            raise EngineDeadError("no decode instance is available; start one with "
                                  "`matrixinfer worker --role decode --router ...`")
        inst = self.instances[decode_id]
        req.decode = decode_id
        req.reserved = asyncio.get_running_loop().create_future()
        inst.requests.add(rid)
        inst.send(m.Reserve(rid, req.prompt_ids, req.params, self.reserve_timeout))
        try:
            ok, error = await asyncio.wait_for(req.reserved, self.reserve_timeout + 5)
        except TimeoutError:
            raise EngineDeadError(f"decode instance {decode_id} did not answer "
                                  f"within {self.reserve_timeout} s") from None
        if not ok:
            raise EngineDeadError(f"decode instance {decode_id} could not take the request: {error}")

    def _start_prefill(self, rid: str, req: Pending) -> None:
        candidates = self._candidates("prefill")
        prefill_id = pick_instance(candidates, exclude=req.tried)
        log.debug("request %s -> prefill %s (candidates %s)", rid, prefill_id, candidates)
        if prefill_id is None:
            raise EngineDeadError("no prefill instance is available")
        inst = self.instances[prefill_id]
        req.prefill = prefill_id
        req.tried.add(prefill_id)
        inst.requests.add(rid)
        inst.assigned_tokens += len(req.prompt_ids)
        decode = self.instances.get(req.decode or "")
        if decode is None:
            raise EngineDeadError(f"decode instance {req.decode} is gone")
        inst.send(m.Prefill(rid, req.prompt_ids, req.params, decode.info.kv_addr))

    def _forget(self, rid: str, abort: bool) -> None:
        req = self.pending.pop(rid, None)
        if req is None:
            return
        for iid in (req.prefill, req.decode):
            inst = self.instances.get(iid) if iid else None
            if inst is not None:
                inst.requests.discard(rid)
                if abort:
                    inst.send(Abort(rid))

    def _fail(self, rid: str, exc: BaseException) -> None:
        req = self.pending.get(rid)
        if req is None:
            return
        if req.reserved is not None and not req.reserved.done():
            req.reserved.set_exception(exc)
        else:
            req.queue.put_nowait(exc)

    # -- control plane -------------------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        server = await asyncio.start_server(self._on_worker, host, port)
        self.ctrl_addr = format_addr(host, server.sockets[0].getsockname()[1])
        self._server = server
        self._watchdog = asyncio.create_task(self._watch())
        return self.ctrl_addr

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            self.check_frozen(time.monotonic())

    def check_frozen(self, now: float) -> None:
        """Stop routing to instances silent for ``frozen_after`` seconds (stopped, hung, cut off) and
        move their requests: a prefill's are retried elsewhere, a decode's end with an error. One
        that speaks again is routed to again (its failed requests are aborted on it)."""
        for inst in list(self.instances.values()):
            silent = now - inst.last_heard
            if inst.frozen or silent <= self.frozen_after:
                continue
            inst.frozen = True
            self.frozen_instances += 1
            log.warning("%s instance %s has sent nothing for %.1f s; not routing to it, %d request(s) affected",
                        inst.info.role, inst.info.instance_id, silent, len(inst.requests))
            self._move_requests(inst, f"stopped responding ({silent:.0f} s without a message)")

    async def _on_worker(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = str(writer.get_extra_info("peername"))
        if self._connections >= MAX_CONNECTIONS:
            log.warning("control port: %d connections already open; closing one from %s", MAX_CONNECTIONS, peer)
            writer.close()
            return
        self._connections += 1
        inst = None
        try:
            if self.secret is not None:
                await asyncio.wait_for(auth.server_handshake_async(reader, writer, self.secret, "control", peer),
                                       auth.HANDSHAKE_TIMEOUT)
            join = await asyncio.wait_for(FRAMING.read(reader, _DEC, peer), 30)
            if not isinstance(join, m.Join):
                raise WireError(f"{peer}: expected Join, got {type(join).__name__}")
            writer.write(FRAMING.encode(m.Welcome(self.model_id, str(self.model_path), self.ems_controller)))
            if join.role == "ems":  # an EMS server only needed the controller's address
                log.info("EMS server %s joined the pool", join.instance_id)
                return
            reg = await asyncio.wait_for(FRAMING.read(reader, _DEC, peer), 900)  # model loading takes a while
            if not isinstance(reg, m.Register):
                raise WireError(f"{peer}: expected Register, got {type(reg).__name__}")
            self._check_registration(join, reg, peer)
            inst = Instance(reg, writer)
            self.instances[reg.instance_id] = inst
            self._recompute_limits()
            log.info("%s instance %s joined (kv %s)", reg.role, reg.instance_id, reg.kv_addr or "-")
            while True:
                try:
                    msg = await FRAMING.read(reader, _DEC, peer)
                except MessageError as exc:  # one bad message: fail its request, keep the instance
                    self._undecodable(inst, exc)
                    continue
                inst.last_heard = time.monotonic()
                if inst.frozen:
                    inst.frozen = False
                    log.info("%s instance %s is responding again", reg.role, reg.instance_id)
                self._handle(inst, msg)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, WireError, OSError) as exc:
            if inst is None:
                self.refused_workers += 1
                log.warning("worker %s failed to register: %s", peer, exc or type(exc).__name__)
        except asyncio.CancelledError:  # the server is shutting down: not an error worth a traceback
            pass
        finally:
            self._connections -= 1
            writer.close()
            if inst is not None:
                self._lost(inst)

    def _check_registration(self, join: m.Join, reg: m.Register, peer: str) -> None:
        """WireError unless ``reg`` is a sound registration this router can take: the role and id it
        joined with, an id no live connection holds, this router's model and vocabulary, and limits
        that make sense (they are clamped to the model's when the router recomputes its own)."""
        iid = reg.instance_id
        if reg.role not in ("prefill", "decode") or reg.role != join.role or iid != join.instance_id:
            raise WireError(f"{peer}: registers as {reg.role} {iid!r} after joining as {join.role} "
                            f"{join.instance_id!r}")
        if not iid or len(iid) > MAX_INSTANCE_ID or not iid.isprintable():
            raise WireError(f"{peer}: an instance id must be 1 to {MAX_INSTANCE_ID} printable characters")
        if iid in self.instances:
            raise WireError(f"{peer}: instance id {iid!r} is already registered by another connection")
        if reg.model_id != self.model_id:
            raise WireError(f"{peer}: serves model {reg.model_id!r}, this router serves {self.model_id!r}")
        if reg.vocab_size != self.vocab_size:
            raise WireError(f"{peer}: vocabulary of {reg.vocab_size} tokens, the model has {self.vocab_size}")
        if min(reg.max_model_len, reg.max_seq_len, reg.num_blocks, reg.block_size) < 1:
            raise WireError(f"{peer}: limits must be positive (max_model_len {reg.max_model_len}, max_seq_len "
                            f"{reg.max_seq_len}, {reg.num_blocks} blocks of {reg.block_size})")
        if reg.role == "decode":
            try:
                parse_addr(reg.kv_addr)
            except ValueError as exc:
                raise WireError(f"{peer}: KV address: {exc}") from None

    def _recompute_limits(self) -> None:
        """The request limits: the smallest of the model's and every registered instance's (the
        model's alone when none is registered), so one that leaves no longer constrains them."""
        infos = [i.info for i in self.instances.values()]
        self.max_model_len = min([self.model_max_len, *(i.max_model_len for i in infos)])
        self.max_seq_len = min([self.model_max_len, *(i.max_seq_len for i in infos)])

    def _handle(self, inst: Instance, msg: m.WorkerToRouter) -> None:
        if isinstance(msg, EngineStats):
            inst.stats = msg
            inst.assigned_tokens = 0
        elif isinstance(msg, m.Reserved):
            req = self.pending.get(msg.request_id)
            if req is not None and req.reserved is not None and not req.reserved.done():
                req.reserved.set_result((msg.ok, msg.error))
        elif isinstance(msg, RequestOutput):
            req = self.pending.get(msg.request_id)
            if req is None:
                return
            if msg.handed_off:  # the prefill instance is done; the decode instance takes over
                inst.requests.discard(msg.request_id)
                return
            if inst.info.role == "prefill":  # the first token ended the request: free the reservation
                dec = self.instances.get(req.decode) if req.decode else None
                if dec is not None:
                    dec.send(Abort(msg.request_id))
                    dec.requests.discard(msg.request_id)
                req.decode = None
            req.got_first = True
            req.queue.put_nowait(msg)
        elif isinstance(msg, m.Failed):
            req = self.pending.get(msg.request_id)
            if req is None or req.got_first:
                return  # a late failure of a superseded attempt
            if msg.status == 400:
                self._fail(msg.request_id, RequestError(msg.error, param=msg.param))
            else:
                self._fail(msg.request_id, EngineDeadError(msg.error))

    def _undecodable(self, inst: Instance, exc: MessageError) -> None:
        rid = exc.field("request_id")
        log.warning("instance %s sent an undecodable message: %s", inst.info.instance_id, exc)
        if rid is not None:
            self._fail(rid, RequestFailedError(f"instance {inst.info.instance_id} sent an invalid message: {exc}"))

    def _lost(self, inst: Instance) -> None:
        iid = inst.info.instance_id
        if self.instances.get(iid) is not inst:
            return
        del self.instances[iid]
        self.retired = sum_stats([self.retired, counters_only(inst.stats)])
        self._recompute_limits()
        self.lost_instances += 1
        log.warning("%s instance %s is gone; %d request(s) affected", inst.info.role, iid, len(inst.requests))
        self._move_requests(inst, "died")

    def _move_requests(self, inst: Instance, what_happened: str) -> None:
        """The requests of an instance that died or froze: a prefill's are retried on another
        instance while no token was sent, a decode's end with an error."""
        iid = inst.info.instance_id
        for rid in list(inst.requests):
            req = self.pending.get(rid)
            if req is None:
                continue
            if inst.info.role == "decode":
                self._fail(rid, EngineDeadError(f"decode instance {iid} {what_happened}; the request was lost"))
                prefill = self.instances.get(req.prefill) if req.prefill else None
                if prefill is not None:
                    prefill.send(Abort(rid))
            elif not req.got_first and len(req.tried) <= self.max_prefill_retries:
                try:
                    self._start_prefill(rid, req)
                    log.info("request %s retried on prefill instance %s", rid, req.prefill)
                except EngineDeadError as exc:
                    self._fail(rid, exc)
            elif not req.got_first:
                self._fail(rid, EngineDeadError(f"prefill failed on {len(req.tried)} instances"))
            if inst.info.role == "prefill" and req.prefill != iid:
                inst.requests.discard(rid)  # moved: a late answer from this instance is not awaited
                if iid in self.instances:  # frozen, not gone: it drops the request when it resumes
                    inst.send(Abort(rid))
