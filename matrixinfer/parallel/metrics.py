"""What an EP instance exports: Prometheus series per rank and per expert (from rank 0's load
snapshot, :meth:`DPEngine.load_snapshot`), and the snapshot itself as JSON at ``GET /ep/load``
(next to ``/metrics``; ``matrixinfer ep-load`` fetches it)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

#: per-rank series: (snapshot key, metric name, help, kind)
RANK_SERIES = (
    ("tokens", "ep_rank_tokens", "Tokens a rank's own batches sent through the MoE layers (per forward pass)",
     "counter"),
    ("passes", "ep_rank_passes", "Forward passes a rank took part in", "counter"),
    ("idle_passes", "ep_rank_idle_passes", "Forward passes a rank took part in with an empty batch", "counter"),
    ("dispatch_bytes", "ep_dispatch_bytes", "Bytes a rank sent to other ranks in dispatch", "counter"),
    ("combine_bytes", "ep_combine_bytes", "Bytes a rank sent to other ranks in combine", "counter"),
    ("dispatch_seconds", "ep_dispatch_seconds", "Seconds a rank spent in dispatch", "counter"),
    ("combine_seconds", "ep_combine_seconds", "Seconds a rank spent in combine", "counter"),
    ("running", "ep_rank_requests_running", "Requests in a rank's running batch (DP attention)", "gauge"),
    ("waiting", "ep_rank_requests_waiting", "Requests waiting in a rank's scheduler", "gauge"),
)


class EPCollector:
    """Prometheus families from ``snapshot()`` (rank 0's load snapshot)."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        for key, name, doc, kind in RANK_SERIES:
            fam: GaugeMetricFamily | CounterMetricFamily
            if kind == "counter":
                fam = CounterMetricFamily(f"matrixinfer_{name}", doc, labels=["rank"])
            else:
                fam = GaugeMetricFamily(f"matrixinfer_{name}", doc, labels=["rank"])
            for r in snap["ranks"]:
                fam.add_metric([str(r["rank"])], float(r[key]))
            yield fam
        tables = [x["slots"] for x in snap.get("layers", [])] or [snap["placement"]] * len(snap["expert_tokens"])
        # the rank holding each expert in each layer ("0+2" for an expert with copies on ranks 0 and 2)
        owners = [{e: "+".join(str(r) for r, xs in enumerate(t) if e in xs) for e in range(len(counts))}
                  for t, counts in zip(tables, snap["expert_tokens"])]
        experts = CounterMetricFamily("matrixinfer_ep_expert_tokens", "Tokens routed to each routed expert, by MoE "
                                      "layer (0 = the first MoE layer) and the rank holding the expert",
                                      labels=["layer", "expert", "rank"])
        for layer, counts in enumerate(snap["expert_tokens"]):
            for e, n in enumerate(counts):
                experts.add_metric([str(layer), str(e), owners[layer][e]], float(n))
        yield experts


def add_ep_routes(app: Any, engine: Any) -> None:
    """``GET /ep/load`` (the snapshot as JSON) on a FastAPI ``app``, and the EP series in its
    ``/metrics`` registry; ``engine``: a :class:`~matrixinfer.parallel.dp_engine.DPEngine`."""
    from fastapi.responses import JSONResponse

    app.state.metrics.registry.register(EPCollector(engine.load_snapshot))

    @app.get("/ep/load")
    async def ep_load() -> JSONResponse:
        return JSONResponse(engine.load_snapshot())
