"""The router's control port with a deployment secret (issue 19, high 5): only a worker that proves
the secret joins; an instance id cannot be taken over; reported limits are checked, clamped to the
model's and recomputed when an instance leaves."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from matrixinfer import auth
from matrixinfer.engine.sampling_params import SamplingParams
from matrixinfer.netio import FRAMING, parse_addr
from matrixinfer.serve import messages as m
from matrixinfer.serve.router import Router

SECRET = b"k" * 32
_DEC = msgspec.msgpack.Decoder(m.RouterToWorker)


async def _join(addr: str, role: str, iid: str, secret: bytes | None = SECRET, max_len: int = 512,
                vocab: int = 264, kv_addr: str = "127.0.0.1:1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(*parse_addr(addr))
    if secret is not None:
        await auth.client_handshake_async(reader, writer, secret, "control")
    writer.write(FRAMING.encode(m.Join(role, iid)))
    await asyncio.wait_for(FRAMING.read(reader, _DEC), 5)  # Welcome
    writer.write(FRAMING.encode(m.Register(role, iid, "tiny", kv_addr, max_len, max_len, vocab, 64, 16)))
    await writer.drain()
    return reader, writer


async def _settle(router: Router, before: int) -> None:
    """Wait until the router has dealt with one more connection (registered or refused it)."""
    for _ in range(200):
        if len(router.instances) + router.refused_workers > before:
            return
        await asyncio.sleep(0.01)


def test_only_workers_holding_the_secret_join(served_checkpoint):
    async def go() -> None:
        router = Router(served_checkpoint, "tiny", secret=SECRET)
        addr = await router.start()
        with pytest.raises((auth.AuthError, ConnectionError, asyncio.IncompleteReadError, TimeoutError)):
            await _join(addr, "prefill", "no-secret", secret=None)  # plain Join: closed without a Welcome
        with pytest.raises(auth.AuthError):
            await _join(addr, "prefill", "wrong", secret=b"w" * 32)
        await _settle(router, 1)
        assert router.instances == {} and router.refused_workers == 2
        _, writer = await _join(addr, "prefill", "p0")
        await router.wait_for(1, 0, timeout=5)
        assert list(router.instances) == ["p0"]
        writer.close()

    asyncio.run(go())


def test_an_instance_id_cannot_be_taken_over(served_checkpoint):
    async def go() -> None:
        router = Router(served_checkpoint, "tiny", secret=SECRET)
        addr = await router.start()
        _, real = await _join(addr, "decode", "d0", kv_addr="127.0.0.1:7001")
        await router.wait_for(0, 1, timeout=5)
        _, fake = await _join(addr, "decode", "d0", kv_addr="127.0.0.1:6666")
        await _settle(router, 1)
        assert router.refused_workers == 1
        assert router.instances["d0"].info.kv_addr == "127.0.0.1:7001"  # still the real one
        assert router.instances["d0"].writer is not None and router.health() is not None  # no prefill yet
        real.close()
        fake.close()

    asyncio.run(go())


@pytest.mark.parametrize("bad", [
    dict(role="prefill", iid="x", vocab=100),  # another vocabulary
    dict(role="decode", iid="x", kv_addr="not an address"),
    dict(role="decode", iid="x", max_len=0),
    dict(role="prefill", iid="x" * 300),
])
def test_unsound_registrations_are_refused(served_checkpoint, bad):
    async def go() -> None:
        router = Router(served_checkpoint, "tiny", secret=SECRET)
        addr = await router.start()
        _, writer = await _join(addr, bad.pop("role"), bad.pop("iid"), **bad)
        await _settle(router, 0)
        assert router.instances == {} and router.refused_workers == 1
        writer.close()

    asyncio.run(go())


def test_limits_are_clamped_and_recomputed_when_an_instance_leaves(served_checkpoint):
    async def go() -> None:
        router = Router(served_checkpoint, "tiny", secret=SECRET)
        model_len = router.max_model_len
        addr = await router.start()
        _, big = await _join(addr, "decode", "d-big", max_len=model_len * 100)
        await router.wait_for(0, 1, timeout=5)
        assert router.max_model_len == router.max_seq_len == model_len  # never above the model's
        _, small = await _join(addr, "prefill", "p-small", max_len=8)
        await router.wait_for(1, 1, timeout=5)
        assert router.max_seq_len == 8
        small.close()
        for _ in range(200):
            if "p-small" not in router.instances:
                break
            await asyncio.sleep(0.01)
        assert router.max_model_len == router.max_seq_len == model_len  # the small one no longer limits
        big.close()

    asyncio.run(go())


def test_requests_still_route_without_instances_of_the_refused_kind(served_checkpoint):
    """A refused fake prefill receives no prompt: the router has no prefill instance to send it to."""
    async def go() -> None:
        router = Router(served_checkpoint, "tiny", secret=SECRET)
        addr = await router.start()
        with pytest.raises(auth.AuthError):
            await _join(addr, "prefill", "spy", secret=b"w" * 32)
        with pytest.raises(Exception, match="no decode instance"):
            await anext(router.generate("r1", [5, 6], SamplingParams(max_tokens=2)))

    asyncio.run(go())
