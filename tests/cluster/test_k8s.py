"""Kubernetes manifests from `matrixinfer plan --emit k8s`, checked against the Kubernetes OpenAPI
schemas (kubernetes-validate's strict schemas; our vendored LeaderWorkerSet schema) offline."""

from __future__ import annotations

import copy

import pytest
import yaml

from matrixinfer.cli import main

pytest.importorskip("kubernetes_validate", reason="the cluster extra (pip install -e '.[cluster]') is not installed")

from matrixinfer.cluster.k8s_schema import ManifestError, validate_manifest  # noqa: E402

PLAN = ["plan", "--ttft-ms", "2000", "--tpot-ms", "50", "--emit", "k8s"]


def _emit(tmp_path, capsys, *args: str) -> dict[str, dict]:
    out = tmp_path / "k8s"
    assert main([*PLAN, *args, "--out", str(out)]) == 0
    assert "validated against the Kubernetes" in capsys.readouterr().out
    objs = {}
    for path in sorted(out.iterdir()):
        obj = yaml.safe_load(path.read_text())
        validate_manifest(obj)
        objs[f"{obj['kind']}/{obj['metadata']['name'].split('-')[-1]}"] = obj
    return objs


def _container(template: dict) -> dict:
    (c,) = template["spec"]["containers"]
    return c


def test_paper_deployment_manifests(tmp_path, capsys):
    objs = _emit(tmp_path, capsys, "--hardware", "cm384", "--workload", "4096/256", "--paper-deployment",
                 "--checkpoint", "/models/deepseek-r1")
    assert sorted(objs) == ["Deployment/router", "LeaderWorkerSet/decode", "LeaderWorkerSet/prefill",
                            "Service/ems", "Service/router", "StatefulSet/ems"]
    decode, prefill = objs["LeaderWorkerSet/decode"]["spec"], objs["LeaderWorkerSet/prefill"]["spec"]
    # 1 decode instance of 160 NPUs (EP320) over 20 hosts; 6 prefill instances of 16 NPUs (EP32) over 2
    assert (decode["replicas"], decode["leaderWorkerTemplate"]["size"]) == (1, 20)
    assert (prefill["replicas"], prefill["leaderWorkerTemplate"]["size"]) == (6, 2)
    leader = _container(decode["leaderWorkerTemplate"]["leaderTemplate"])
    assert leader["args"][:4] == ["worker", "--role", "decode", "--router"]
    assert leader["args"][leader["args"].index("--ep") + 1] == "320"
    assert leader["resources"]["limits"]["huawei.com/Ascend910"] == 8  # 16 ranks = 8 two-die NPUs per host
    rank = _container(decode["leaderWorkerTemplate"]["workerTemplate"])
    assert rank["args"][rank["args"].index("--node-rank") + 1] == "$(LWS_WORKER_INDEX)"
    for c in (leader, rank):  # the rendezvous: the leader pod's address and one agreed port
        assert c["args"][c["args"].index("--master-addr") + 1] == "$(LWS_LEADER_ADDRESS)"
        assert c["args"][c["args"].index("--master-port") + 1] == "29500"
    meta = objs["LeaderWorkerSet/decode"]["metadata"]
    assert meta["annotations"]["leaderworkerset.sigs.k8s.io/exclusive-topology"] == "matrixinfer.io/scale-up-domain"
    assert objs["StatefulSet/ems"]["spec"]["replicas"] == 31  # 32 hosts' pools; server 0 beside the router


def test_one_host_plan_manifests(tmp_path, capsys):
    from matrixinfer.model.default_model import default_model_path

    objs = _emit(tmp_path, capsys, "--hardware", "h100x8-nodes:1", "--workload", "1024/128",
                 "--model", str(default_model_path() / "config.json"))
    assert sorted(objs) == ["Deployment/decode", "Deployment/prefill", "Deployment/router", "Service/router"]
    for role in ("prefill", "decode"):
        pod = objs[f"Deployment/{role}"]["spec"]["template"]["spec"]
        assert 1 <= _container({"spec": pod})["resources"]["limits"]["nvidia.com/gpu"] <= 8
        assert pod["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"


def test_the_schemas_refuse_bad_manifests(tmp_path, capsys):
    objs = _emit(tmp_path, capsys, "--hardware", "cm384", "--workload", "4096/256", "--paper-deployment")
    lws = copy.deepcopy(objs["LeaderWorkerSet/decode"])
    lws["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "Always"
    with pytest.raises(ManifestError, match="restartPolicy"):
        validate_manifest(lws)
    lws = copy.deepcopy(objs["LeaderWorkerSet/decode"])
    _container(lws["spec"]["leaderWorkerTemplate"]["workerTemplate"])["imagePullPolicee"] = "Always"
    with pytest.raises(ManifestError, match="imagePullPolicee"):  # checked down into Kubernetes' PodSpec
        validate_manifest(lws)
    dep = copy.deepcopy(objs["Deployment/router"])
    dep["spec"]["replicas"] = "one"
    with pytest.raises(ManifestError, match="replicas"):
        validate_manifest(dep)


def test_emit_needs_out(capsys):
    assert main([*PLAN, "--hardware", "cm384", "--workload", "4096/256"]) == 2
    assert "give --out PATH" in capsys.readouterr().err
