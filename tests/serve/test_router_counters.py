"""Issue 18 (defect 3, P/D metrics): a lost or restarted instance does not take its counters out of
the deployment's totals (Prometheus counters must not go back); its gauges do leave."""

from __future__ import annotations

from matrixinfer.engine.outputs import EngineStats
from matrixinfer.serve import messages as m
from matrixinfer.serve.router import Instance, Router


class _Writer:
    def write(self, data: bytes) -> None:
        pass


def test_counters_survive_a_lost_instance(served_checkpoint):
    router = Router(served_checkpoint)
    for iid, role in (("p0", "prefill"), ("d0", "decode")):
        reg = m.Register(role, iid, router.model_id, "", 512, 512, 264, 64, 16)
        inst = Instance(reg, _Writer())  # type: ignore[arg-type]
        inst.stats = EngineStats(prompt_tokens=100, generation_tokens=10, prefix_queried_tokens=64,
                                 prefix_hit_tokens=32, running=2, kv_used=5, kv_total=64)
        router.instances[iid] = inst
    before = router.stats
    router._lost(router.instances["d0"])
    after = router.stats
    assert (after.prompt_tokens, after.generation_tokens, after.prefix_queried_tokens, after.prefix_hit_tokens) == \
        (before.prompt_tokens, before.generation_tokens, before.prefix_queried_tokens, before.prefix_hit_tokens)
    assert (after.running, after.kv_used, after.kv_total) == (2, 5, 64)  # only the live instance's gauges
    assert after.prefix_hit_rate == before.prefix_hit_rate == 0.5
