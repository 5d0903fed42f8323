"""Model-weight loading: object store vs a per-node local DRAM cache vs the shared memory pool.

Pure arithmetic over the catalog: the object store's read bandwidth is shared by everything
loading at once; a warm load streams the weights from host DRAM at one Kunpeng CPU's UB
bandwidth (the copy lives in one CPU's memory, so that port is the bottleneck).
"""

from __future__ import annotations

from dataclasses import dataclass

from matrixinfer.sim.hardware import GB

# Each Kunpeng CPU reaches the UB at about 160 GB/s [paper §1].
CPU_UB_BW = 160 * GB


@dataclass(frozen=True)
class LoadingScenario:
    """Seconds and footprints for one caching strategy."""

    name: str
    cold_start_s: float
    warm_start_s: float | None
    dram_copies: int
    switch_s: float


def model_loading_table(model_bytes: float, instances: int = 8,
                        object_store_bw: float = 2.5 * GB,
                        dram_bw: float = CPU_UB_BW) -> list[LoadingScenario]:
    """The paper's model-caching comparison for ``instances`` instances of one model.

    - no cache: every instance reads the object store (shared bandwidth), cold or switching.
    - local DRAM: each instance's node caches its own copy (``instances`` copies); a cold start
      still reads the object store once per instance. With the same DRAM budget as one pooled
      copy per model, a node-local cache holds 1/``instances`` of the models the pool holds, so a
      model switch hits DRAM with probability 1/``instances`` and otherwise reloads.
    - pool (EMS): one copy shared by all; the first instance pulls it from the object store, the
      rest (and every switch) stream it from the pool.
    """
    from_store = model_bytes / object_store_bw
    from_dram = model_bytes / dram_bw
    hit = 1.0 / instances
    return [
        LoadingScenario("no cache", instances * from_store, None, 0, from_store),
        LoadingScenario("local DRAM cache", instances * from_store, from_dram, instances,
                        (1 - hit) * from_store + hit * from_dram),
        LoadingScenario("EMS pool", from_store + from_dram, from_dram, 1, from_dram),
    ]
