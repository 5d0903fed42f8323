"""Issue 18 (metrics): every series carries ``model_name``, and every series the shipped Grafana
dashboard (docs/grafana/matrixinfer-dashboard.json) queries is exported by the API server, for a
colocated engine and for a P/D deployment's per-instance gauges."""

from __future__ import annotations

import json
import re
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from matrixinfer.engine.outputs import EngineStats, FinishReason
from matrixinfer.serve.api_server import create_app
from tests.serve.test_api_errors import AUTH, KEY, ScriptedBackend, out

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "matrixinfer-dashboard.json"
SERIES = re.compile(r"\bmatrixinfer_[a-z0-9_]+")


class PDBackend(ScriptedBackend):
    def instance_metrics(self) -> list[tuple[str, str, EngineStats]]:
        return [("prefill-0", "prefill", EngineStats()), ("decode-0", "decode", EngineStats())]


def _exported() -> dict[str, list[dict[str, str]]]:
    c = TestClient(create_app(PDBackend([out("A"), out("B", FinishReason.LENGTH, n=2)]), api_key=KEY))
    assert c.post("/v1/completions", json={"model": "fake", "prompt": "x", "max_tokens": 2},
                  headers=AUTH).status_code == 200
    assert c.post("/v1/completions", json={"model": "nope", "prompt": "x"}, headers=AUTH).status_code == 404
    out_: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(c.get("/metrics").text):
        for s in family.samples:
            out_.setdefault(s.name, []).append(s.labels)
    return out_


def test_every_series_has_the_model_name():
    for name, labels in _exported().items():
        if name.startswith("matrixinfer_"):
            assert all(lab.get("model_name") == "fake" for lab in labels), name


def test_dashboard_queries_only_exported_series():
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    queried = {m for e in exprs for m in SERIES.findall(e)}
    exported = set(_exported())
    assert len(queried) >= 15
    assert queried <= exported, f"queried but not exported: {sorted(queried - exported)}"
    assert all('model_name=~"$model"' in e for e in exprs)  # every panel follows the model picker


def test_engine_stats_line():
    from matrixinfer.serve.metrics import stats_line

    prev = EngineStats(prompt_tokens=100, generation_tokens=50, prefix_queried_tokens=64, prefix_hit_tokens=0)
    now = EngineStats(prompt_tokens=300, generation_tokens=150, running=3, waiting=1, kv_total=100, kv_used=25,
                      prefix_queried_tokens=128, prefix_hit_tokens=16, external_hit_tokens=16, preemptions=2)
    assert stats_line(prev, now, 10.0) == (
        "prompt throughput 20.0 tok/s, generation throughput 10.0 tok/s, running 3, waiting 1, "
        "KV cache usage 25.0%, prefix cache hit rate 50.0%, preemptions 2")
    assert stats_line(now, EngineStats(**{**{f: getattr(now, f) for f in now.__struct_fields__},
                                          "running": 0, "waiting": 0}), 10.0) is None  # idle: nothing logged
