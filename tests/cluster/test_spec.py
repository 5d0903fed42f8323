"""The deployment spec: planner -> file -> validated spec -> the launcher's settings, and its errors."""

from __future__ import annotations

import httpx
import msgspec
import pytest
import yaml

from matrixinfer.bench.launch import ServerProcess
from matrixinfer.cli import main
from matrixinfer.cluster.local import local_configs
from matrixinfer.cluster.planning import paper_deployment
from matrixinfer.cluster.spec import DeploymentSpec, Pool, SpecError, dumps, load, loads
from matrixinfer.config import EngineConfig, ServeConfig
from matrixinfer.sim.hardware import CLOUDMATRIX384
from matrixinfer.sim.planner import PlanRequest

PLAN = ["plan", "--hardware", "cm384", "--ttft-ms", "2000", "--tpot-ms", "50", "--workload", "4096/256"]


def test_plan_out_writes_the_planners_decision(tmp_path, capsys):
    out = tmp_path / "deploy.yaml"
    assert main([*PLAN, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    spec = load(out)
    # the spec holds what the recommendation line printed: counts and ranks of both pools
    assert f"recommended: {spec.prefill.instances} x prefill(" in printed
    assert f"{spec.prefill.ranks} ranks, EP{spec.prefill.ranks}" in printed
    assert f"{spec.decode.instances} x decode(" in printed and f"EP{spec.decode.ranks}," in printed
    assert spec.slo.ttft_ms == 2000 and spec.slo.tpot_ms == 50
    assert spec.hardware.nodes == 48 and spec.hardware.ranks_per_node == 16
    # bounds: what the 384 chips hold with the other pool at one instance
    chips = spec.decode.ranks // 2
    assert spec.decode.max_instances == (384 - spec.prefill.ranks // 2) // chips
    assert loads(dumps(spec)) == spec


def test_paper_deployment():
    spec = paper_deployment(CLOUDMATRIX384, PlanRequest(2.0, 0.05, 4096, 256))
    assert (spec.decode.instances, spec.decode.ranks, spec.prefill.instances, spec.prefill.ranks) == (1, 320, 6, 32)
    assert spec.nodes_per_instance("decode") == 20 and spec.nodes_per_instance("prefill") == 2
    assert spec.ems.servers == 32  # 256 NPUs on 8-NPU hosts


@pytest.mark.parametrize("edit, needle", [
    ({"decode": {"instances": 3, "max_instances": 2}}, "decode: needs 0 <= min_instances <= instances"),
    ({"decode": {"instanses": 3}}, "unknown field `instanses`"),
    ({"prefill": {"ranks": "many"}}, "Expected `int`, got `str` - at `$.prefill.ranks`"),
    ({"prefill": {"ranks": 64}, "hardware": {"nodes": 2, "ranks_per_node": 16}}, "prefill.ranks: one instance"),
    ({"ems": {"capacity": "lots"}}, "ems.capacity: 'lots' is not a size"),
    ({"engine": {"kv_cache_memory": 5}}, "engine.kv_cache_memory: is set by the spec itself"),
    ({"engine": {"max_num_seq": 5}}, "engine.max_num_seq: not an engine setting"),
    ({"autoscale": {"latency_low": 0.95}}, "the low thresholds must be below the high ones"),
    ({"version": 7}, "version: this MatrixInfer reads version 1, got 7"),
    ({"decode": {"placement": "scatter"}}, "Invalid enum value 'scatter' - at `$.decode.placement`"),
])
def test_bad_specs_name_the_field(tmp_path, edit, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(edit))
    with pytest.raises(SpecError) as info:
        load(path)
    assert needle in str(info.value) and str(path) in str(info.value)


def test_not_yaml_and_missing_file(tmp_path):
    with pytest.raises(SpecError, match="not valid YAML"):
        loads("decode: [", "x.yaml")
    with pytest.raises(SpecError, match="expected a mapping"):
        loads("- 1", "x.yaml")
    with pytest.raises(SpecError, match="cannot read the deployment spec"):
        load(tmp_path / "none.yaml")


def test_local_configs_map_the_spec():
    spec = DeploymentSpec(model="/m", prefill=Pool(instances=2, max_instances=3, ranks=2, kv_cache_memory="8M"),
                          decode=Pool(ranks=2), engine={"max_num_seqs": 7})
    eng, srv = local_configs(spec, EngineConfig(), ServeConfig(port=9100, api_key="k"))
    assert (eng.model, eng.ep, eng.max_num_seqs, eng.kv_cache_memory) == ("/m", 2, 7, None)
    assert (srv.num_prefill, srv.num_decode, srv.num_ems, srv.prefill_kv_cache_memory) == (2, 1, 1, 8 << 20)
    assert (srv.port, srv.api_key, srv.colocated) == (9100, "k", False)  # the host's settings stay
    uneven = msgspec.structs.replace(spec, decode=Pool(ranks=4))
    with pytest.raises(SpecError, match="one EP degree for both pools"):
        local_configs(uneven, EngineConfig(), ServeConfig())


def test_serve_deploy_refuses_a_bad_spec(tmp_path, capsys):
    bad = tmp_path / "d.yaml"
    bad.write_text("decode:\n  instances: -1\n")
    assert main(["serve", "--deploy", str(bad)]) == 2
    assert "decode: needs 0 <= min_instances" in capsys.readouterr().err
    assert main(["serve", "--ray", "127.0.0.1:1"]) == 2
    assert "--ray needs --deploy FILE" in capsys.readouterr().err


def test_serve_deploy_runs_the_spec(tmp_path, served_checkpoint):
    """The spec's pools start through the launcher (two workers load the model: 55-80 s measured on the 2
    shared cores at load average 7-18)."""
    spec = DeploymentSpec(model=str(served_checkpoint), prefill=Pool(kv_cache_memory="8M"),
                          decode=Pool(kv_cache_memory="8M"), engine={"served_model_name": "tiny", "device": "cpu",
                                                                     "dtype": "float32"})
    path = tmp_path / "deploy.yaml"
    path.write_text(dumps(msgspec.structs.replace(spec, ems=msgspec.structs.replace(spec.ems, servers=0))))
    srv = ServerProcess(["--deploy", str(path), "--log-level", "warning"], env={"MATRIXINFER_THREADS": "1"})
    try:
        r = httpx.post(f"{srv.url}/v1/completions", timeout=60,
                       json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
        running = srv.instance_metrics()["running"]
        assert sorted(k.split("-")[0] for k in running) == ["decode", "prefill"], running
    finally:
        srv.stop()
