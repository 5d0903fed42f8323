"""A P/D worker survives bad requests (issue 19, critical 2): a command it cannot decode fails that
request (``Failed``, 400) instead of reading as a lost router, and a request that makes the engine
raise fails alone inside ``LLMEngine.step`` (the workers' loops call it as the colocated engine does).
"""

from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace

import msgspec
import pytest

from matrixinfer.config import EngineConfig
from matrixinfer.engine.commands import Abort, Inbox
from matrixinfer.engine.llm_engine import LLMEngine
from matrixinfer.engine.outputs import EngineStats, FinishReason
from matrixinfer.engine.sampling_params import SamplingParams
from matrixinfer.model.default_model import write_byte_tokenizer
from matrixinfer.netio import FRAMING, MessageError, format_addr, listen
from matrixinfer.serve import messages as m
from matrixinfer.serve.router_link import RouterLink
from tests.checkpoints import make_checkpoint

_DEC = msgspec.msgpack.Decoder(m.WorkerToRouter)


class FakeRouter:
    """Accepts one worker, welcomes it and records what it sends (load reports aside)."""

    def __init__(self) -> None:
        self.listener = listen("127.0.0.1", 0)
        self.addr = format_addr("127.0.0.1", self.listener.getsockname()[1])
        self.received: list[object] = []
        self.conn: socket.socket | None = None
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        self.conn = conn
        FRAMING.recv(conn, _DEC)  # Join
        FRAMING.send(conn, m.Welcome("tiny", "", ""))
        try:
            while True:
                msg = FRAMING.recv(conn, _DEC)
                if not isinstance(msg, EngineStats):
                    self.received.append(msg)
        except OSError:
            pass

    def send_raw(self, obj: object) -> None:
        assert self.conn is not None
        self.conn.sendall(FRAMING.encode(obj))

    def wait_for(self, kind: type, timeout: float = 5.0) -> object:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [msg for msg in self.received if isinstance(msg, kind)]
            if found:
                return found[0]
            time.sleep(0.01)
        raise AssertionError(f"no {kind.__name__} from the worker; got {self.received}")


def _register(link: RouterLink) -> None:
    link.register(m.Register("decode", "d0", "tiny", "", 64, 64, 264, 8, 8))


@pytest.mark.parametrize("bad", [
    {"type": "Reserve", "request_id": "r1", "prompt_ids": [1, 2], "params": {"stop_token_ids": [True]},
     "timeout": 5.0},
    {"type": "Prefill", "request_id": "r1", "prompt_ids": [1], "params": {"top_k": 1 << 63}, "decode_addr": "x"},
    {"type": "Reserve", "request_id": "r1", "prompt_ids": "not a list", "params": {}, "timeout": 5.0},
    {"type": "NoSuchCommand", "request_id": "r1"},
])
def test_an_undecodable_command_fails_its_request_not_the_worker(bad):
    router = FakeRouter()
    inbox: Inbox[object] = Inbox()
    stopped = threading.Event()
    link = RouterLink(router.addr, "decode", "d0", inbox, stopped)
    _register(link)
    router.send_raw(bad)
    router.send_raw(Abort("r2"))  # a valid command after it is still read
    failed = router.wait_for(m.Failed)
    assert isinstance(failed, m.Failed) and failed.request_id == "r1" and failed.status == 400
    assert "invalid" in failed.error
    deadline = time.monotonic() + 5
    got: list[object] = []
    while not got and time.monotonic() < deadline:
        got = inbox.drain()
        time.sleep(0.01)
    assert got == [Abort("r2")]
    assert not stopped.is_set()


def test_a_closed_router_still_stops_the_worker():
    router = FakeRouter()
    stopped = threading.Event()
    link = RouterLink(router.addr, "decode", "d0", Inbox(), stopped)
    _register(link)
    router.wait_for(m.Register)
    assert router.conn is not None
    router.conn.close()
    assert stopped.wait(5)


def test_message_error_keeps_the_request_id():
    exc = MessageError("bad", msgspec.msgpack.encode({"type": "Prefill", "request_id": "abc"}))
    assert exc.field("request_id") == "abc" and exc.field("type") == "Prefill" and exc.field("nope") is None
    assert MessageError("bad", b"\xc1 not msgpack").field("request_id") is None


def test_a_poisoned_request_fails_alone_in_a_worker_engine(tmp_path):
    """What a prefill or decode worker's loop sees: step() returns a failed output for the bad request
    (sent to the router as such) and keeps serving its batch neighbour."""
    ck = make_checkpoint(tmp_path / "m", "v3", seed=3, vocab_size=264, bos_token_id=256, eos_token_id=257)
    write_byte_tokenizer(ck)
    eng = LLMEngine(EngineConfig(model=str(ck), device="cpu", dtype="float32", kv_cache_memory=2 << 20,
                                 block_size=8))
    good = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    bad = SamplingParams(max_tokens=4)
    bad.temperature = 1e-300  # as if validation had let it through
    eng.add_request("good", [5, 6, 7, 8], good)
    eng.add_request("bad", [5, 6, 7, 9], bad)
    outs = {o.request_id: o for o in eng.step()}
    assert outs["bad"].finished and outs["bad"].error and outs["bad"].finish_reason == FinishReason.ABORT
    assert not outs["good"].error and len(outs["good"].token_ids) == 1
    tokens = outs["good"].token_ids
    while eng.has_work():
        tokens += [t for o in eng.step() for t in o.token_ids]
    assert len(tokens) == 4 and eng.blocks.num_used == 0


def test_a_command_that_raises_fails_its_request_and_the_worker_goes_on(tmp_path, monkeypatch):
    """A decode instance handed a KVDone whose sampler state is garbage (a broken or hostile prefill
    peer): that request fails, its reservation is freed, and the worker's loop keeps running."""
    from matrixinfer.serve import worker as wk

    monkeypatch.setattr(wk, "quiet_gc", lambda: None)  # leave this process's collector alone
    ck = make_checkpoint(tmp_path / "m", "v3", seed=3, vocab_size=264, bos_token_id=256, eos_token_id=257)
    write_byte_tokenizer(ck)
    eng = LLMEngine(EngineConfig(model=str(ck), device="cpu", dtype="float32", kv_cache_memory=2 << 20,
                                 block_size=8))
    w = wk.DecodeWorker.__new__(wk.DecodeWorker)  # the loop and handlers, without a router or KV port
    sent: list[object] = []
    w.instance_id, w.inbox, w.stopped, w.engine = "d0", Inbox(), threading.Event(), eng
    w.link = SimpleNamespace(send=sent.append, stats=None)  # type: ignore[assignment]
    w.pending, w.reserved, w._stats_at = [], {}, 0.0
    assert eng.reserve("bad", 4, timeout=30) is not None
    w.reserved["bad"] = m.Reserve("bad", [5, 6, 7, 8], SamplingParams(max_tokens=4, seed=1), 30.0)
    w.inbox.put(m.KVDone("bad", 9, None, 0, sampler_state=b"not a generator state"))
    w.inbox.put(Abort("other"))
    stopper = threading.Timer(1.0, lambda: (w.stopped.set(), w.inbox.wake()))
    stopper.start()
    w.run()  # returns once stopped (it used to raise out of the loop, ending the process)
    failed = [x for x in sent if isinstance(x, m.Failed)]
    assert [(f.request_id, f.status) for f in failed] == [("bad", 500)]
    assert not eng.has_reservation("bad") and eng.blocks.num_used == 0


def test_a_reservation_that_raises_is_refused_and_the_worker_goes_on(tmp_path, monkeypatch):
    """``engine.reserve`` raising something other than a RequestError (a bug, a broken allocator):
    that reservation is refused, the next one is served, and tick returns (it used to raise out of
    the loop, ending the process)."""
    from matrixinfer.serve import worker as wk

    ck = make_checkpoint(tmp_path / "m", "v3", seed=3, vocab_size=264, bos_token_id=256, eos_token_id=257)
    write_byte_tokenizer(ck)
    eng = LLMEngine(EngineConfig(model=str(ck), device="cpu", dtype="float32", kv_cache_memory=2 << 20,
                                 block_size=8))
    w = wk.DecodeWorker.__new__(wk.DecodeWorker)  # the handlers, without a router or KV port
    sent: list[object] = []
    w.instance_id, w.engine = "d0", eng
    w.link = SimpleNamespace(send=sent.append, stats=None)  # type: ignore[assignment]
    w.pending, w.reserved = [], {}
    real = eng.reserve

    def flaky(rid, n, timeout):
        if rid == "bad":
            raise KeyError("broken allocator")
        return real(rid, n, timeout)

    monkeypatch.setattr(eng, "reserve", flaky)
    deadline = time.monotonic() + 30
    for rid in ("bad", "good"):
        w.pending.append((m.Reserve(rid, [5, 6, 7, 8], SamplingParams(max_tokens=4), 30.0), deadline))
    w.tick()
    replies = {x.request_id: x for x in sent if isinstance(x, m.Reserved)}
    assert not replies["bad"].ok and "broken allocator" in replies["bad"].error
    assert replies["good"].ok and "good" in w.reserved and w.pending == []
