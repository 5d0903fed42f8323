"""``kv_transfer``: a prompt's KV from a prefill worker to a decode worker, profiled on loopback.

In P/D the decode instance streams a request's first token only once it holds the prompt's KV,
so the transfer is part of TTFT. The simulator used EMS gets per block as a stand-in, 0.1 ms
for a 160-token prompt of the demo model; the prefill worker's own counter
(``kv_transfer_seconds`` / ``kv_transfers``) gave 2.8 ms in a traced P/D ``serve`` at 2
requests/s (2026-11-30). The real path sends one socket frame per group of layers and waits for
the decode side's acknowledgement, with a receiver thread writing into reserved blocks.

This times that path itself: the serving stack's :class:`~matrixinfer.serve.kv_transfer.KVSender`
(its public ``send_handoff``, the path rank 0 of an expert-parallel instance uses for KV another
rank prefilled) to a :class:`~matrixinfer.serve.kv_transfer.KVReceiver` in front of a real engine
with a reservation, over loopback. The value is the sender's own transfer time (its ``stats``,
the counter the worker reports), per transfer, at each prompt length.
"""

from __future__ import annotations

import statistics
import threading
from collections.abc import Iterator

import torch


def profile_kv(engine, tokens: tuple[int, ...], rounds: int, table) -> Iterator[str]:
    """Measure ``kv_transfer`` (seconds per prompt of ``tokens``) into ``table(name, axes)``;
    ``engine`` is the decode side's :class:`~matrixinfer.engine.llm_engine.LLMEngine`, whose cache
    must hold the longest prompt."""
    from matrixinfer.parallel.messages import KVHandoff
    from matrixinfer.serve.kv_transfer import KVReceiver, KVSender

    cache = engine.runner.kv_cache
    arrived = threading.Event()
    stopped = threading.Event()
    failures: list[str] = []
    receiver = KVReceiver(engine, "127.0.0.1", lambda done: arrived.set(), stopped)
    def failed(rid: str, err: str) -> None:
        failures.append(err)
        arrived.set()

    sender = KVSender(failed)
    try:
        n = 0
        for t in tokens:
            kv = torch.randn(cache.num_layers, t, cache.dim).to(cache.data.dtype)
            raw = kv.view(torch.uint8).numpy().tobytes()
            samples = []
            for r in range(rounds + 1):  # the first round opens the connection: not counted
                n += 1
                rid = f"kv{n}"
                if engine.reserve(rid, t, 30.0) is None:
                    raise RuntimeError(f"the profile's decode engine cannot hold {t} tokens of KV")
                sender.destinations[rid] = receiver.addr
                before = sender.stats()["kv_transfer_seconds"]
                arrived.clear()
                sender.send_handoff(KVHandoff(rid, 0, None, 0, b"", b"", str(kv.dtype).removeprefix("torch."),
                                              list(kv.shape), raw))
                if not arrived.wait(30.0) or failures:
                    raise RuntimeError(f"the profile's KV transfer of {t} tokens failed: {failures or 'timed out'}")
                while sender.stats()["kv_transfers"] < n:  # the counter is updated after the ack
                    threading.Event().wait(0.0005)
                engine.release_reservation(rid)
                if r:
                    samples.append(float(sender.stats()["kv_transfer_seconds"]) - float(before))
            table("kv_transfer", ("tokens",)).add((t,), statistics.fmean(samples))
            yield f"kv transfer {t}"
    finally:
        stopped.set()
        sender.close()
