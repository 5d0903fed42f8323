"""A prefill or decode instance of the PDC deployment (``matrixinfer worker --role ...``).

The worker connects to the router's control port, registers, and then obeys it. A prefill worker
computes prompts (reusing and filling the EMS context cache), samples the first token and sends
the prompt's KV to the decode worker the router chose, in chunks of a few layers, from a sender
thread so the transfer overlaps the next steps' compute. A decode worker holds blocks for incoming
KV (reclaimed after a deadline), writes the chunks straight into them, and continues the sequence
in its continuous batch, streaming tokens to the router.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec
import torch

from matrixinfer.config import EngineConfig
from matrixinfer.engine.llm_engine import LLMEngine, RequestError, RequestOutput
from matrixinfer.engine.sampling_params import SamplingParams
from matrixinfer.serve import messages as m
from matrixinfer.serve.wire import WireError, parse_addr, recv_exact_into, recv_msg, send_msg

log = logging.getLogger(__name__)
LAYER_GROUP = 4  # layers per KV chunk
_ROUTER_DEC = msgspec.msgpack.Decoder(m.RouterToWorker)
_KV_DEC = msgspec.msgpack.Decoder(m.KVMessage)
_ACK_DEC = msgspec.msgpack.Decoder(m.Reserved)


def quiet_gc() -> None:
    """Freeze start-up objects (model, libraries) out of the collector's view and collect the
    young generations less often: full collections over them were stalling decode steps by tens
    of milliseconds whenever request traffic allocated many small objects."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def to_params(s: m.Sampling) -> SamplingParams:
    return SamplingParams(**msgspec.structs.asdict(s))


def from_params(p: SamplingParams) -> m.Sampling:
    return m.Sampling(p.temperature, p.top_p, p.top_k, p.seed, p.max_tokens, p.min_tokens, list(p.stop),
                      list(p.stop_token_ids), p.ignore_eos, p.logprobs)


def _output(out: RequestOutput) -> m.Output:
    return m.Output(out.request_id, out.token_ids, out.logprobs, out.text, out.finished, out.finish_reason,
                    out.num_prompt_tokens, out.num_output_tokens, out.num_cached_tokens, out.handed_off)


class Worker:
    """One instance: an engine on the main thread, plus router, KV and reporting threads."""

    def __init__(self, role: str, router: str, cfg: EngineConfig, kv_host: str = "127.0.0.1",
                 ems_servers: list[str] | None = None, instance_id: str | None = None) -> None:
        if role not in ("prefill", "decode"):
            raise ValueError(f"worker role must be prefill or decode, got {role!r}")
        self.role = role
        self.router_addr = router
        self.instance_id = instance_id or f"{role}-{uuid.uuid4().hex[:8]}"
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.wake = threading.Event()
        self.stop = threading.Event()
        self.send_lock = threading.Lock()
        self.kv_lock = threading.Lock()  # held while writing into reserved blocks or releasing them
        welcome = self._join()
        if cfg.model is None and welcome.model_path and Path(welcome.model_path).is_dir():
            cfg.model = welcome.model_path
        cfg.served_model_name = cfg.served_model_name or welcome.model_id
        self.ems = None
        if ems_servers or welcome.ems_controller:
            from matrixinfer.ems.client import EmsClient
            from matrixinfer.ems.membership import ControllerMembership

            kw = dict(namespace="matrixinfer", timeout=2.0, connect_timeout=0.3)
            self.ems = (EmsClient(ems_servers, **kw) if ems_servers
                        else EmsClient(membership=ControllerMembership(welcome.ems_controller), **kw))
        if role == "decode":
            cfg.enable_prefix_caching = False  # decode KV arrives from prefill; nothing to match
        self.engine = self._build_engine(cfg)
        self.device = self.engine.runner.device
        self.pending_reserves: list[tuple[m.Reserve, float]] = []
        self.prompts: dict[str, tuple[list[int], SamplingParams]] = {}
        self.dest: dict[str, str] = {}
        self.counters = dict(sent=0, received=0, seconds=0.0, transfers=0)
        self.load = m.Load(0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        self._snapshot_at = 0.0
        self.sender = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kv-send")
        self._kv_socks: dict[str, socket.socket] = {}
        self._kv_sock_lock = threading.Lock()
        self.kv_addr = ""
        if role == "decode":
            self._kv_server = socket.create_server((kv_host, 0))
            self.kv_addr = f"{kv_host}:{self._kv_server.getsockname()[1]}"
            threading.Thread(target=self._kv_accept, daemon=True, name="kv-accept").start()
        else:
            self.engine.handoff = self._handoff
        # Prefill instances read and fill the context cache; decode instances only write to it, and
        # only when asked to keep generated KV (prompt blocks are the prefill side's to store).
        if self.ems is not None and (role == "prefill" or cfg.store_generated_kv):
            from matrixinfer.serve.pool import EmsPrefixCache

            self.engine.external = EmsPrefixCache(self.ems, cfg.block_size, self.engine.model_id)

    def _build_engine(self, cfg: EngineConfig) -> LLMEngine:
        from matrixinfer.model.default_model import default_model_path
        from matrixinfer.model.loader import load_model

        path = Path(cfg.model) if cfg.model else default_model_path()
        cfg.model = str(path)
        model = None
        if self.ems is not None:
            from matrixinfer.serve.pool import load_model_via_pool, publish_tensors

            model_id = cfg.served_model_name or path.name
            t0 = time.perf_counter()
            dev = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
            dtype = getattr(torch, cfg.dtype) if cfg.dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
            model, version = load_model_via_pool(self.ems, path, model_id, dtype, dev)
            if model is not None:
                log.info("%s: weights loaded from the EMS model cache in %.2f s", self.instance_id,
                         time.perf_counter() - t0)
            else:
                model = load_model(path, dtype=dtype, device=dev)
                written = publish_tensors(self.ems, path, model_id, version)
                log.info("%s: weights loaded from %s; %d bytes published to the EMS model cache",
                         self.instance_id, path, written)
        return LLMEngine(cfg, model=model)

    # -- router connection ------------------------------------------------------------------------
    def _send(self, msg) -> None:
        with self.send_lock:
            send_msg(self.router_sock, msg)

    def _router_reader(self) -> None:
        try:
            while not self.stop.is_set():
                self.inbox.put(recv_msg(self.router_sock, _ROUTER_DEC, "router"))
                self.wake.set()
        except (OSError, WireError) as exc:
            if not self.stop.is_set():
                log.error("%s: lost the router (%s); shutting down", self.instance_id, exc)
                self.stop.set()
                self.wake.set()

    def _reporter(self) -> None:
        while not self.stop.wait(0.2):
            try:
                self._send(self.load)
            except OSError:
                return

    def _join(self) -> m.Welcome:
        """Connect to the router and learn the model and the EMS controller's address."""
        host, port = parse_addr(self.router_addr)
        deadline = time.time() + 60
        while True:
            try:
                self.router_sock = socket.create_connection((host, port), timeout=30)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        # small frames (one per token batch) must not wait for Nagle's algorithm and a delayed ACK
        self.router_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        send_msg(self.router_sock, m.Join(self.role, self.instance_id))
        welcome = recv_msg(self.router_sock, _ROUTER_DEC, "router")
        if not isinstance(welcome, m.Welcome):
            raise WireError(f"router sent {type(welcome).__name__} instead of Welcome")
        self.router_sock.settimeout(None)
        return welcome

    def connect(self) -> None:
        """Register the ready engine and start the router and reporting threads."""
        e = self.engine
        self._send(m.Register(self.role, self.instance_id, e.model_id, self.kv_addr, e.max_model_len, e.max_seq_len,
                              e.model.config.vocab_size, e.runner.num_blocks, e.cfg.block_size))
        threading.Thread(target=self._router_reader, daemon=True, name="router-reader").start()
        threading.Thread(target=self._reporter, daemon=True, name="load-reporter").start()

    # -- main loop ----------------------------------------------------------------------------------
    def run(self) -> None:
        quiet_gc()
        self.connect()
        log.info("%s registered with router %s", self.instance_id, self.router_addr)
        while not self.stop.is_set():
            self._drain()
            self._retry_reserves()
            with self.kv_lock:
                expired = self.engine.reap_reservations()
            for rid in expired:
                self.prompts.pop(rid, None)
                self._send(m.Failed(rid, "KV transfer from the prefill instance timed out", 504))
            if self.engine.has_work():
                for out in self.engine.step():
                    self._emit(out)
            else:
                self.wake.wait(0.05)
                self.wake.clear()
            self._snapshot()
        self.sender.shutdown(wait=False)

    def _emit(self, out: RequestOutput) -> None:
        if self.role == "prefill":
            if out.finished:
                self.dest.pop(out.request_id, None)
            # the first token reaches the client from the decode instance once it holds the KV;
            # here the router only learns that this instance is done with the request
            self._send(_output(out) if out.finished else m.Output(out.request_id, [], [], "", False, None, 0, 0, 0,
                                                                  handed_off=True))
        else:
            if out.finished:
                self.prompts.pop(out.request_id, None)
            self._send(_output(out))

    def _snapshot(self) -> None:
        now = time.monotonic()
        if now - self._snapshot_at < 0.05:  # reports go out every 0.2 s; steps come far more often
            return
        self._snapshot_at = now
        e = self.engine
        queued = sum(s.num_tokens - s.num_computed for s in e.waiting) + \
            sum(s.num_tokens - s.num_computed for s in e.running)
        st = e.stats()
        c = self.counters
        ext = e.external
        self.load = m.Load(queued, st.running, st.waiting, st.kv_blocks_used, st.kv_blocks_total,
                           st.reserved_blocks, st.prompt_tokens, st.generation_tokens, st.prefix_hit_tokens,
                           st.external_hit_tokens, c["sent"], c["received"], c["seconds"], c["transfers"],
                           getattr(ext, "stored_blocks", 0), getattr(ext, "loaded_blocks", 0))

    def _drain(self) -> None:
        while True:
            try:
                msg = self.inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(msg, m.Welcome):
                continue
            if isinstance(msg, m.Prefill):
                self.dest[msg.request_id] = msg.decode_addr
                try:
                    self.engine.add_request(msg.request_id, msg.prompt_ids, to_params(msg.sampling))
                except RequestError as exc:
                    self.dest.pop(msg.request_id, None)
                    self._send(m.Failed(msg.request_id, str(exc), 400))
            elif isinstance(msg, m.Reserve):
                self.pending_reserves.append((msg, time.monotonic() + msg.timeout))
            elif isinstance(msg, m.Abort):
                self.pending_reserves = [(r, d) for r, d in self.pending_reserves if r.request_id != msg.request_id]
                self.prompts.pop(msg.request_id, None)
                self.dest.pop(msg.request_id, None)
                with self.kv_lock:
                    self.engine.abort(msg.request_id)
            elif isinstance(msg, m.KVDone):
                self._attach(msg)

    def _retry_reserves(self) -> None:
        still = []
        for msg, deadline in self.pending_reserves:
            try:
                blocks = self.engine.reserve(msg.request_id, len(msg.prompt_ids), msg.timeout)
            except RequestError as exc:
                self._send(m.Reserved(msg.request_id, False, str(exc)))
                continue
            if blocks is not None:
                self.prompts[msg.request_id] = (msg.prompt_ids, to_params(msg.sampling))
                self._send(m.Reserved(msg.request_id, True))
            elif time.monotonic() > deadline:
                self._send(m.Reserved(msg.request_id, False, "no KV blocks freed up before the deadline"))
            else:
                still.append((msg, deadline))
        self.pending_reserves = still

    # -- prefill: hand the KV to the decode instance ---------------------------------------------------
    def _handoff(self, seq, token: int, logprob: float | None) -> None:
        cache = self.engine.runner.kv_cache
        bs = cache.block_size
        n = len(seq.prompt_ids)
        pos = torch.arange(n)
        table = torch.tensor(seq.block_table)
        slots = (table[pos // bs] * bs + pos % bs).to(cache.data.device)
        kv = cache.data.index_select(1, slots).cpu()  # [layers, tokens, dim], a copy
        state = self.engine.sampler.export_state(seq.request_id)
        dest = self.dest.pop(seq.request_id)
        done = m.KVDone(seq.request_id, token, logprob, seq.num_cached_tokens, state)
        self.sender.submit(self._send_kv, dest, kv, done)

    def _kv_sock(self, addr: str) -> socket.socket:
        with self._kv_sock_lock:
            sock = self._kv_socks.get(addr)
            if sock is None:
                sock = socket.create_connection(parse_addr(addr), timeout=30)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._kv_socks[addr] = sock
            return sock

    def _send_kv(self, addr: str, kv: torch.Tensor, done: m.KVDone) -> None:
        rid = done.request_id
        t0 = time.perf_counter()
        try:
            sock = self._kv_sock(addr)
            layers, tokens, dim = kv.shape
            dtype = str(kv.dtype).removeprefix("torch.")
            raw = kv.view(torch.uint8) if kv.dtype != torch.uint8 else kv
            with self._kv_sock_lock:  # one transfer at a time per connection
                for a in range(0, layers, LAYER_GROUP):
                    b = min(layers, a + LAYER_GROUP)
                    chunk = raw[a:b].contiguous().numpy()
                    send_msg(sock, m.KVChunk(rid, a, b, tokens, dim, dtype, chunk.nbytes), memoryview(chunk).cast("B"))
                send_msg(sock, done)
                ack = recv_msg(sock, _ACK_DEC, addr)
            self.counters["sent"] += kv.numel() * kv.element_size()
            self.counters["seconds"] += time.perf_counter() - t0
            self.counters["transfers"] += 1
            if not ack.ok:
                self._send(m.Failed(rid, f"decode instance refused the KV: {ack.error}", 503))
        except (OSError, WireError) as exc:
            with self._kv_sock_lock:
                bad = self._kv_socks.pop(addr, None)
            if bad is not None:
                bad.close()
            log.warning("%s: KV transfer of %s to %s failed: %s", self.instance_id, rid, addr, exc)
            try:
                self._send(m.Failed(rid, f"KV transfer to the decode instance {addr} failed: {exc}", 503))
            except OSError:
                pass

    # -- decode: receive KV into reserved blocks --------------------------------------------------------
    def _kv_accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self._kv_server.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._kv_conn, args=(conn,), daemon=True, name="kv-recv").start()

    def _kv_conn(self, conn: socket.socket) -> None:
        cache = self.engine.runner.kv_cache
        bs = cache.block_size
        try:
            while True:
                msg = recv_msg(conn, _KV_DEC, "prefill peer")
                if isinstance(msg, m.KVChunk):
                    buf = bytearray(msg.nbytes)
                    recv_exact_into(conn, memoryview(buf))
                    t = torch.frombuffer(buf, dtype=getattr(torch, msg.dtype))
                    t = t.view(msg.layer_end - msg.layer_start, msg.num_tokens, msg.dim)
                    with self.kv_lock:
                        held = self.engine.reservations.get(msg.request_id)
                        if held is None:
                            continue  # aborted or expired: drop the bytes
                        table = torch.tensor(held[0].block_table)
                        pos = torch.arange(msg.num_tokens)
                        slots = (table[pos // bs] * bs + pos % bs).to(cache.data.device)
                        cache.data[msg.layer_start:msg.layer_end].index_copy_(
                            1, slots, t.to(cache.data.device, cache.data.dtype))
                    self.counters["received"] += msg.nbytes
                else:
                    ok = msg.request_id in self.engine.reservations
                    send_msg(conn, m.Reserved(msg.request_id, ok, "" if ok else "no reservation (aborted or expired)"))
                    if ok:
                        self.inbox.put(msg)
                        self.wake.set()
        except (OSError, WireError, ValueError) as exc:
            log.debug("KV connection closed: %s", exc)
        finally:
            conn.close()

    def _attach(self, done: m.KVDone) -> None:
        rid = done.request_id
        if rid not in self.engine.reservations or rid not in self.prompts:
            return
        prompt, params = self.prompts[rid]
        self.engine.sampler.import_state(rid, done.sampler_state, self.device)
        out = self.engine.attach(rid, prompt, done.first_token, done.first_logprob, params, done.num_cached)
        self._send(_output(out))


def run_worker(role: str, router: str, cfg: EngineConfig, kv_host: str, ems: list[str] | None) -> int:
    logging.basicConfig(level=os.environ.get("MATRIXINFER_LOG", "INFO"),
                        format=f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s")
    worker = Worker(role, router, cfg, kv_host, ems)
    worker.run()
    return 0
