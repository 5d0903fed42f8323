"""KV transfer from prefill to decode instances.

:class:`KVSender` is the prefill engine's connector for the handoff: after a request's first token
it copies the prompt's KV out of the cache and sends it to the decode instance the router chose, in
chunks of a few layers, from a sender thread, so the transfer overlaps the next steps' compute.
:class:`KVReceiver` is the decode side: it accepts prefill peers and writes each chunk straight
into the blocks the engine reserved for the request (through the engine's locked
:meth:`~matrixinfer.engine.llm_engine.LLMEngine.write_reserved`), then hands ``KVDone`` to the
worker's loop, which attaches the sequence. With a deployment secret each KV connection opens with
:mod:`matrixinfer.auth`'s handshake; the receiver serves at most ``MAX_PEERS`` connections at once and
closes one that does not authenticate within ``auth.HANDSHAKE_TIMEOUT``.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import msgspec
import torch

from matrixinfer import auth
from matrixinfer.engine.kv_connector import KVConnector
from matrixinfer.engine.llm_engine import LLMEngine
from matrixinfer.engine.sequence import Sequence
from matrixinfer.engine.speculative import last_hidden
from matrixinfer.netio import (
    FRAMING,
    PeerClosed,
    WireError,
    connect,
    format_addr,
    listen,
    recv_exact_into,
    set_timeouts,
)
from matrixinfer.parallel.messages import KVHandoff
from matrixinfer.serve import messages as m

log = logging.getLogger(__name__)
LAYER_GROUP = 4  # layers per KV chunk
MAX_PEERS = 64  # KV connections a decode instance serves at once (prefill instances keep one each)
_KV_DEC = msgspec.msgpack.Decoder(m.KVMessage)
_ACK_DEC = msgspec.msgpack.Decoder(m.Reserved)


class KVSender(KVConnector):
    """Prefill side: every request leaves after its first token, its KV sent to ``destinations``
    (request id -> the decode instance's KV address, filled by the worker from the router's
    Prefill message). ``report_failure(request_id, error)`` tells the router a transfer failed."""

    def __init__(self, report_failure: Callable[[str, str], None], secret: bytes | None = None) -> None:
        self.secret = secret
        self.destinations: dict[str, str] = {}
        self.report_failure = report_failure
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kv-send")
        self._socks: dict[str, socket.socket] = {}
        self._lock = threading.Lock()  # one transfer at a time per connection; guards the counters
        self.sent_bytes = 0
        self.seconds = 0.0
        self.transfers = 0

    def take_over(self, seq: Sequence, token: int, logprob: float | None) -> bool:
        dest = self.destinations.pop(seq.request_id, None)
        if dest is None:
            return False
        kv = self.cache.read_tokens(seq.block_table, len(seq.prompt_ids))  # a copy: the blocks are freed next
        done = m.KVDone(seq.request_id, token, logprob, seq.num_cached_tokens,
                        self.sampler.export_state(seq.request_id), last_hidden(seq),
                        first_top_logprobs=seq.top_logprobs[0] if seq.top_logprobs else [])
        self.pool.submit(self._send, dest, kv, done)
        return True

    def request_finished(self, seq: Sequence) -> None:
        self.destinations.pop(seq.request_id, None)

    def send_handoff(self, h: KVHandoff) -> None:
        """Send KV that another rank of this expert-parallel instance prefilled (it came back to
        rank 0 over the instance's control channel) like a request of this engine's own."""
        dest = self.destinations.pop(h.request_id, None)
        if dest is None:  # aborted meanwhile
            return
        kv = torch.frombuffer(bytearray(h.kv), dtype=getattr(torch, h.dtype)).view(*h.shape)
        done = m.KVDone(h.request_id, h.first_token, h.first_logprob, h.num_cached, h.sampler_state, h.hidden,
                        first_top_logprobs=h.first_top_logprobs)
        self.pool.submit(self._send, dest, kv, done)

    def stats(self) -> dict[str, int | float]:
        return {"kv_sent_bytes": self.sent_bytes, "kv_transfer_seconds": self.seconds,
                "kv_transfers": self.transfers}

    def close(self) -> None:
        self.pool.shutdown(wait=False)

    def _sock(self, addr: str) -> socket.socket:
        sock = self._socks.get(addr)
        if sock is None:
            sock = connect(addr, timeout=30)
            if self.secret is not None:
                try:
                    auth.client_handshake(sock, self.secret, "kv", f"decode instance {addr}")
                except BaseException:
                    sock.close()
                    raise
            self._socks[addr] = sock
        return sock

    def _send(self, addr: str, kv: torch.Tensor, done: m.KVDone) -> None:
        rid = done.request_id
        t0 = time.perf_counter()
        try:
            layers, tokens, dim = kv.shape
            dtype = str(kv.dtype).removeprefix("torch.")
            raw = kv.view(torch.uint8) if kv.dtype != torch.uint8 else kv
            with self._lock:
                sock = self._sock(addr)
                for a in range(0, layers, LAYER_GROUP):
                    b = min(layers, a + LAYER_GROUP)
                    chunk = raw[a:b].contiguous().numpy().data
                    FRAMING.send(sock, m.KVChunk(rid, a, b, tokens, dim, dtype, chunk.nbytes), [chunk])
                FRAMING.send(sock, done)
                ack = FRAMING.recv(sock, _ACK_DEC, addr)
                self.sent_bytes += kv.numel() * kv.element_size()
                self.seconds += time.perf_counter() - t0
                self.transfers += 1
            if not ack.ok:
                self.report_failure(rid, f"decode instance refused the KV: {ack.error}")
        except (OSError, WireError) as exc:
            with self._lock:
                bad = self._socks.pop(addr, None)
            if bad is not None:
                bad.close()
            log.warning("KV transfer of %s to %s failed: %s", rid, addr, exc)
            self.report_failure(rid, f"KV transfer to the decode instance {addr} failed: {exc}")


def check_chunk(msg: m.KVChunk, engine: LLMEngine) -> None:
    """WireError unless ``msg`` announces KV this engine's cache can hold: a torch dtype, the cache's
    latent width, layers inside the cache, at most a whole sequence of tokens, and ``nbytes`` equal
    to that shape (a header may not make the decode instance allocate more than one real chunk)."""
    cache = engine.runner.kv_cache
    dtype = getattr(torch, msg.dtype, None) if msg.dtype.isidentifier() else None
    shape = (msg.layer_end - msg.layer_start, msg.num_tokens, msg.dim)
    if (not isinstance(dtype, torch.dtype) or msg.dim != cache.dim
            or not 0 <= msg.layer_start < msg.layer_end <= cache.num_layers
            or not 0 < msg.num_tokens <= engine.max_seq_len
            or msg.nbytes != shape[0] * shape[1] * shape[2] * dtype.itemsize):
        raise WireError(f"prefill peer: KV chunk of {msg.nbytes} bytes ({msg.dtype} {list(shape)} at layer "
                        f"{msg.layer_start}) does not fit this cache ({cache.num_layers} layers x {cache.dim} values, "
                        f"at most {engine.max_seq_len} tokens)")


class KVReceiver:
    """Decode side: listens on ``host``, writes chunks into reserved blocks, passes each ``KVDone``
    whose reservation still exists to ``on_done`` (after acknowledging it to the sender)."""

    def __init__(self, engine: LLMEngine, host: str, on_done: Callable[[m.KVDone], None],
                 stopped: threading.Event, secret: bytes | None = None) -> None:
        self.engine = engine
        self.secret = secret
        self.refused = 0  # connections that failed authentication or sent an invalid frame
        self._slots = threading.BoundedSemaphore(MAX_PEERS)
        self.on_done = on_done
        self.stopped = stopped
        self._server = listen(host, 0)
        self.addr = format_addr(host, self._server.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True, name="kv-accept").start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                log.warning("KV port: %d connections already open; closing a new one", MAX_PEERS)
                conn.close()
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn,), daemon=True, name="kv-recv").start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self.secret is not None:
                set_timeouts(conn, auth.HANDSHAKE_TIMEOUT)
                auth.server_handshake(conn, self.secret, "kv", "KV peer")
                set_timeouts(conn, 0)  # authenticated: prefill instances keep their connection open while idle
            while True:
                msg = FRAMING.recv(conn, _KV_DEC, "prefill peer")
                if isinstance(msg, m.KVChunk):
                    check_chunk(msg, self.engine)  # before allocating the bytes the header announces
                    buf = bytearray(msg.nbytes)
                    recv_exact_into(conn, memoryview(buf), "prefill peer")
                    kv = torch.frombuffer(buf, dtype=getattr(torch, msg.dtype))
                    kv = kv.view(msg.layer_end - msg.layer_start, msg.num_tokens, msg.dim)
                    self.engine.write_reserved(msg.request_id, msg.layer_start, kv)  # False: aborted, dropped
                else:
                    ok = self.engine.has_reservation(msg.request_id)
                    error = "" if ok else "no reservation (aborted or expired)"
                    FRAMING.send(conn, m.Reserved(msg.request_id, ok, error))
                    if ok:
                        self.on_done(msg)
        except (OSError, WireError, ValueError, TypeError, AttributeError) as exc:
            if isinstance(exc, WireError) and not isinstance(exc, PeerClosed):
                self.refused += 1
                log.warning("KV connection refused: %s", exc)
            else:
                log.debug("KV connection closed: %s", exc)
        finally:
            conn.close()
            self._slots.release()
