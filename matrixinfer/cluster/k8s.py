"""Kubernetes manifests of a deployment spec (pure: dicts in, YAML files out).

What each part becomes:

- the router: a Deployment (one replica: workers join one router) and a Service with the HTTP and
  control ports. It also runs EMS server 0 and the pool's controller, since EMS servers join the
  pool through the router (``matrixinfer worker --role ems``);
- a prefill or decode instance that fits one host: one pod of a Deployment whose replicas are the
  pool's instances, spread over hosts;
- an instance spanning hosts: a LeaderWorkerSet group (``size`` = its hosts). The leader pod
  (node rank 0) is the instance's ``matrixinfer worker``; the other pods run its remaining EP ranks
  (``matrixinfer serve --node-rank K``) and reach the leader at ``$LWS_LEADER_ADDRESS``. With
  ``placement: pack`` the group is kept inside one scale-up domain (LeaderWorkerSet's
  exclusive-topology annotation on ``hardware.group_topology_key``) and its pods on distinct hosts;
- EMS servers 1..N-1: a StatefulSet behind a headless Service, one per host where possible.

Pods ask for their ranks' CPUs, memory and devices (``hardware.accelerator_resource``); the
deployment secret comes from a Secret ``<name>-secret`` (key ``secret``) mounted as a 0400 file;
the model directory is a read-only hostPath at the same path (pre-staged on the hosts).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from matrixinfer.cli_args import to_argv
from matrixinfer.cluster.local import engine_config
from matrixinfer.cluster.spec import DeploymentSpec, parse_bytes
from matrixinfer.config import EngineConfig

LWS_API = "leaderworkerset.x-k8s.io/v1"
EXCLUSIVE_TOPOLOGY = "leaderworkerset.sigs.k8s.io/exclusive-topology"
HOSTNAME = "kubernetes.io/hostname"
DEFAULT_PORT = 8000
EP_PORT = 29500  # an EP instance's rendezvous on its leader pod
SECRET_DIR = "/etc/matrixinfer/secret"
APP = "app.kubernetes.io/name"
COMPONENT = "app.kubernetes.io/component"
INSTANCE = "app.kubernetes.io/instance"


def _mi(n_bytes: float) -> str:
    return f"{max(1, math.ceil(n_bytes / (1 << 20)))}Mi"


def _labels(spec: DeploymentSpec, component: str) -> dict[str, str]:
    return {APP: "matrixinfer", INSTANCE: spec.name, COMPONENT: component}


def _ports(spec: DeploymentSpec) -> tuple[int, int]:
    http = spec.router.port or DEFAULT_PORT
    return http, spec.router.control_port or http + 1


def _env(spec: DeploymentSpec) -> list[dict[str, Any]]:
    return [
        {"name": "MATRIXINFER_SECRET_FILE", "value": f"{SECRET_DIR}/secret"},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    ]


def _volumes(spec: DeploymentSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    vols: list[dict[str, Any]] = [{"name": "secret", "secret": {"secretName": f"{spec.name}-secret",
                                                                "defaultMode": 0o400}}]
    mounts: list[dict[str, Any]] = [{"name": "secret", "mountPath": SECRET_DIR, "readOnly": True}]
    if spec.model and spec.model.startswith("/"):
        vols.append({"name": "model", "hostPath": {"path": spec.model, "type": "Directory"}})
        mounts.append({"name": "model", "mountPath": spec.model, "readOnly": True})
    return vols, mounts


def _container(spec: DeploymentSpec, name: str, args: list[str], cpus: float, memory_bytes: float,
               devices: int = 0, ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    requests: dict[str, Any] = {"cpu": f"{int(cpus * 1000)}m", "memory": _mi(memory_bytes)}
    limits: dict[str, Any] = {"memory": _mi(memory_bytes)}
    if devices and spec.hardware.accelerator_resource:
        requests[spec.hardware.accelerator_resource] = devices
        limits[spec.hardware.accelerator_resource] = devices
    c: dict[str, Any] = {"name": name, "image": spec.image, "command": ["matrixinfer"], "args": args,
                         "env": _env(spec), "volumeMounts": _volumes(spec)[1],
                         "resources": {"requests": requests, "limits": limits}}
    if ports:
        c["ports"] = ports
    return c


def _pod(spec: DeploymentSpec, component: str, container: dict[str, Any], affinity: dict[str, Any] | None = None,
         extra_labels: dict[str, str] | None = None, spread: bool = False) -> dict[str, Any]:
    labels = {**_labels(spec, component), **(extra_labels or {})}
    pod: dict[str, Any] = {"containers": [container], "volumes": _volumes(spec)[0]}
    if affinity:
        pod["affinity"] = affinity
    if spread:  # instances (and EMS servers) over hosts: one host lost takes few of them
        pod["topologySpreadConstraints"] = [{"maxSkew": 1, "topologyKey": HOSTNAME,
                                             "whenUnsatisfiable": "ScheduleAnyway",
                                             "labelSelector": {"matchLabels": _labels(spec, component)}}]
    return {"metadata": {"labels": labels}, "spec": pod}


def _router_addr(spec: DeploymentSpec) -> str:
    return f"{spec.name}-router:{_ports(spec)[1]}"


def router_objects(spec: DeploymentSpec) -> list[dict[str, Any]]:
    http, control = _ports(spec)
    eng = EngineConfig(model=spec.model, **spec.engine)  # type: ignore[arg-type]
    # the pod's own address: the router advertises its control port and EMS controller at it
    args = ["serve", "--host", "$(POD_IP)", "--port", str(http), "--router-port", str(control),
            "--num-prefill", "0", "--num-decode", "0", "--num-ems", "1" if spec.ems.servers else "0",
            "--ems-capacity", spec.ems.capacity, *to_argv(eng, skip=("ep",))]
    mem = parse_bytes(spec.router.memory, "router.memory") + \
        (parse_bytes(spec.ems.capacity, "ems.capacity") if spec.ems.servers else 0)
    cpus = spec.router.cpus + (spec.ems.cpus if spec.ems.servers else 0)
    container = _container(spec, "router", args, cpus, mem, ports=[{"name": "http", "containerPort": http},
                                                                   {"name": "control", "containerPort": control}])
    container["readinessProbe"] = {"httpGet": {"path": "/health", "port": http}, "periodSeconds": 5}
    labels = _labels(spec, "router")
    deploy = {"apiVersion": "apps/v1", "kind": "Deployment",
              "metadata": {"name": f"{spec.name}-router", "labels": labels},
              "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": _pod(spec, "router", container)}}
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"{spec.name}-router", "labels": labels},
           "spec": {"selector": labels, "ports": [{"name": "http", "port": http, "targetPort": http},
                                                  {"name": "control", "port": control, "targetPort": control}]}}
    return [deploy, svc]


def _rank_args(spec: DeploymentSpec, role: str, leader: bool) -> list[str]:
    eng = engine_config(spec, EngineConfig(), role)
    nnodes = spec.nodes_per_instance(role)
    ep = ["--ep", str(eng.ep)] if eng.ep > 1 else []
    if nnodes > 1:
        ep += ["--nnodes", str(nnodes), "--master-addr", "$(LWS_LEADER_ADDRESS)", "--master-port", str(EP_PORT),
               "--node-rank", "0" if leader else "$(LWS_WORKER_INDEX)"]
    base = to_argv(eng, skip=("ep", "nnodes", "node_rank", "master_addr", "master_port"))
    if leader:
        return ["worker", "--role", role, "--router", _router_addr(spec), "--kv-host", "$(POD_IP)", *ep, *base]
    return ["serve", *ep, *base]


def pool_objects(spec: DeploymentSpec, role: str) -> list[dict[str, Any]]:
    """A Deployment (instances of one host) or a LeaderWorkerSet (instances spanning hosts)."""
    pool = spec.pool(role)
    per_pod = spec.ranks_per_node(role)
    devices = math.ceil(per_pod / spec.hardware.ranks_per_device)
    mem = parse_bytes(pool.memory_per_rank, f"{role}.memory_per_rank") * per_pod
    name = f"{spec.name}-{role}"
    labels = _labels(spec, role)
    nnodes = spec.nodes_per_instance(role)
    if nnodes == 1:
        c = _container(spec, role, _rank_args(spec, role, True), pool.cpus_per_rank * per_pod, mem, devices)
        return [{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "labels": labels},
                 "spec": {"replicas": pool.instances, "selector": {"matchLabels": labels},
                          "template": _pod(spec, role, c, spread=True)}}]
    # one pod per host of the group: pods of this pool never share a host
    apart = {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": labels}, "topologyKey": HOSTNAME}]}}
    leader = _container(spec, role, _rank_args(spec, role, True), pool.cpus_per_rank * per_pod, mem, devices)
    worker = _container(spec, f"{role}-rank", _rank_args(spec, role, False), pool.cpus_per_rank * per_pod, mem, devices)
    meta: dict[str, Any] = {"name": name, "labels": labels}
    if pool.placement == "pack":
        meta["annotations"] = {EXCLUSIVE_TOPOLOGY: spec.hardware.group_topology_key}
    return [{"apiVersion": LWS_API, "kind": "LeaderWorkerSet", "metadata": meta,
             "spec": {"replicas": pool.instances, "startupPolicy": "LeaderCreated",
                      "leaderWorkerTemplate": {
                          "size": nnodes, "restartPolicy": "RecreateGroupOnPodRestart",
                          "leaderTemplate": _pod(spec, role, leader, apart, {"matrixinfer.io/rank": "leader"}),
                          "workerTemplate": _pod(spec, role, worker, apart, {"matrixinfer.io/rank": "worker"}),
                      }}}]


def ems_objects(spec: DeploymentSpec) -> list[dict[str, Any]]:
    """EMS servers 1..N-1 (server 0 runs beside the router)."""
    n = spec.ems.servers - 1
    if n < 1:
        return []
    name = f"{spec.name}-ems"
    labels = _labels(spec, "ems")
    args = ["worker", "--role", "ems", "--router", _router_addr(spec), "--kv-host", "$(POD_IP)",
            "--ems-capacity", spec.ems.capacity]
    mem = parse_bytes(spec.ems.capacity, "ems.capacity") * 1.1  # the arena plus the server's own heap
    c = _container(spec, "ems", args, spec.ems.cpus, mem)
    away = {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 100, "podAffinityTerm": {"labelSelector": {"matchLabels": labels}, "topologyKey": HOSTNAME}}]}}
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": labels},
           "spec": {"clusterIP": "None", "selector": labels}}
    sts = {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": name, "labels": labels},
           "spec": {"serviceName": name, "replicas": n, "podManagementPolicy": "Parallel",
                    "selector": {"matchLabels": labels}, "template": _pod(spec, "ems", c, away)}}
    return [svc, sts]


def manifests(spec: DeploymentSpec) -> list[dict[str, Any]]:
    """Every object of the deployment, router first."""
    return [*router_objects(spec), *ems_objects(spec), *pool_objects(spec, "prefill"), *pool_objects(spec, "decode")]


def write_manifests(objs: list[dict[str, Any]], out: Path) -> list[Path]:
    """One YAML file per object under ``out`` (``NN-kind-name.yaml``), for ``kubectl apply -f out``."""
    import yaml

    class Plain(yaml.SafeDumper):  # shared sub-dicts written out in full, not as &anchors
        def ignore_aliases(self, data: Any) -> bool:
            return True

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, obj in enumerate(objs):
        p = out / f"{i:02d}-{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"
        p.write_text(yaml.dump(obj, Dumper=Plain, sort_keys=False))
        paths.append(p)
    return paths
