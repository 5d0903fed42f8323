"""The router stops routing to a frozen instance (issue 19, critical 2): a decode instance that sends
nothing (SIGSTOP, a hang, a cut link) past ``frozen_after`` ends its streams with a clean error instead
of holding them, /health says so, and the instance is routed to again once it speaks."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from matrixinfer.engine.commands import Abort
from matrixinfer.engine.errors import EngineDeadError
from matrixinfer.engine.outputs import EngineStats, RequestOutput
from matrixinfer.engine.sampling_params import SamplingParams
from matrixinfer.netio import FRAMING, parse_addr
from matrixinfer.serve import messages as m
from matrixinfer.serve.router import Router

_DEC = msgspec.msgpack.Decoder(m.RouterToWorker)


class FakeWorker:
    """A worker over the real control protocol that answers like a prefill or decode instance and
    can be frozen (it then sends nothing, not even load reports)."""

    def __init__(self, role: str, iid: str = "", freeze_first: list | None = None) -> None:
        self.role, self.iid = role, iid or f"{role}-0"
        self.frozen = False
        self.got: list[object] = []
        self.freeze_first = freeze_first  # shared: the first of these workers to get a Prefill freezes

    async def join(self, addr: str) -> None:
        self.reader, self.writer = await asyncio.open_connection(*parse_addr(addr))
        self.writer.write(FRAMING.encode(m.Join(self.role, self.iid)))
        await FRAMING.read(self.reader, _DEC)  # Welcome
        self.writer.write(FRAMING.encode(m.Register(self.role, self.iid, "tiny", "127.0.0.1:1", 512, 512,
                                                    264, 64, 16)))
        self.tasks = [asyncio.create_task(self._report()), asyncio.create_task(self._serve())]

    async def _report(self) -> None:
        while True:
            if not self.frozen:
                self.writer.write(FRAMING.encode(EngineStats()))
            await asyncio.sleep(0.05)

    async def _serve(self) -> None:
        while True:
            msg = await FRAMING.read(self.reader, _DEC)
            self.got.append(msg)
            if isinstance(msg, m.Prefill) and self.freeze_first is not None and not self.freeze_first:
                self.freeze_first.append(self)
                self.frozen = True
            if self.frozen:
                continue
            if isinstance(msg, m.Reserve):
                self.writer.write(FRAMING.encode(m.Reserved(msg.request_id, True)))
            elif isinstance(msg, m.Prefill):
                self.writer.write(FRAMING.encode(RequestOutput(request_id=msg.request_id, handed_off=True)))

    def emit(self, out: RequestOutput) -> None:
        self.writer.write(FRAMING.encode(out))

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.writer.close()


def test_a_frozen_decode_instance_fails_its_streams_and_is_skipped_until_it_speaks(served_checkpoint):
    async def go() -> None:
        router = Router(served_checkpoint, "tiny", frozen_after=0.5)
        addr = await router.start()
        prefill, decode = FakeWorker("prefill"), FakeWorker("decode")
        await prefill.join(addr)
        await decode.join(addr)
        await router.wait_for(1, 1, timeout=5)
        stream = router.generate("r1", [5, 6, 7], SamplingParams(max_tokens=8))
        first = asyncio.ensure_future(anext(stream))
        while not any(isinstance(x, m.Prefill) for x in prefill.got):
            await asyncio.sleep(0.01)
        decode.emit(RequestOutput(request_id="r1", token_ids=[9], num_output_tokens=1))
        assert (await first).token_ids == [9]
        decode.frozen = True  # SIGSTOP: not a byte from now on
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(EngineDeadError, match="stopped responding"):
            await asyncio.wait_for(anext(stream), timeout=5)
        assert loop.time() - t0 < 2.5
        assert router.health() is not None and "decode" in router.health()
        with pytest.raises(EngineDeadError, match="no decode instance"):
            await anext(router.generate("r2", [5, 6], SamplingParams(max_tokens=2)))
        decode.frozen = False  # SIGCONT
        while router.health() is not None:
            await asyncio.sleep(0.05)
        assert Abort("r1") in decode.got  # the failed request is dropped on the instance too
        assert router.frozen_instances == 1
        prefill.close()
        decode.close()

    asyncio.run(go())


def test_a_frozen_prefill_instances_request_is_retried_on_another(served_checkpoint):
    async def go() -> None:
        router = Router(served_checkpoint, "tiny", frozen_after=0.5)
        addr = await router.start()
        froze: list[FakeWorker] = []
        prefills = [FakeWorker("prefill", f"p{i}", freeze_first=froze) for i in range(2)]
        decode = FakeWorker("decode")
        for w in (*prefills, decode):
            await w.join(addr)
        await router.wait_for(2, 1, timeout=5)
        stream = router.generate("r1", [5, 6, 7], SamplingParams(max_tokens=8))
        first = asyncio.ensure_future(anext(stream))
        while not all(any(isinstance(x, m.Prefill) for x in w.got) for w in prefills):
            await asyncio.sleep(0.05)  # the first taker froze; the request moved to the other
        decode.emit(RequestOutput(request_id="r1", token_ids=[9], num_output_tokens=1, finished=True))
        assert (await asyncio.wait_for(first, 5)).token_ids == [9]
        assert Abort("r1") in froze[0].got  # the frozen one drops it when it resumes
        for w in (*prefills, decode):
            w.close()

    asyncio.run(go())


def test_frozen_after_is_a_serve_setting_and_must_be_positive():
    import argparse

    from matrixinfer.cli_args import add_dataclass_args, from_args
    from matrixinfer.config import ServeConfig

    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, ServeConfig)
    assert from_args(ServeConfig, parser.parse_args(["--frozen-after", "4"])).frozen_after == 4.0
    assert ServeConfig().frozen_after == 10.0
    with pytest.raises(ValueError, match="frozen_after"):
        ServeConfig(frozen_after=0)
