"""The deployment spec: what the planner decided, in one typed, validated document.

``matrixinfer plan ... --out deploy.yaml`` writes it; ``matrixinfer serve --deploy deploy.yaml`` runs
it on this host, ``--ray ADDRESS`` on a Ray cluster, and ``plan --emit k8s`` turns it into
Kubernetes manifests. One schema (msgspec structs, unknown fields refused) serves all three, so a
field means the same thing everywhere. Loading reports the failing field's path
(``$.decode.max_instances``) and what was expected.

Vocabulary: a *rank* is one accelerator die running one EP rank (the paper's "die"); an instance of
a pool has ``ranks`` ranks (its EP degree), ``ranks_per_node`` of which fit one node, so a
multi-rank instance spans ``nodes_per_instance`` nodes (a LeaderWorkerSet group, a Ray placement
group).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import msgspec

SPEC_VERSION = 1


class SpecError(ValueError):
    """A deployment spec that cannot be used; the message names the file and field."""


class Base(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class Hardware(Base, frozen=True):
    """The cluster the plan is for.

    Attributes:
        name: a label (``CloudMatrix384``, ``2x HGX H100``, ``local``).
        nodes: hosts available.
        ranks_per_node: accelerator dies (EP ranks) per host.
        uniform_fabric: crossing hosts costs almost nothing (CloudMatrix384's UB plane), so an
            instance may span hosts freely; otherwise it must stay on adjacent hosts or one host.
        accelerator_resource: the Kubernetes extended resource of one device
            (``nvidia.com/gpu``, ``huawei.com/ascend-1980``); empty for CPU-only hosts.
        ranks_per_device: EP ranks per device (2 on an Ascend 910C: one per die).
        group_topology_key: the Kubernetes node label whose value names one scale-up domain (a
            supernode, an NVLink or rail-aligned group of hosts); an instance spanning hosts is kept
            inside one such domain.
    """

    name: str = "local"
    nodes: int = 1
    ranks_per_node: int = 1
    uniform_fabric: bool = False
    accelerator_resource: str = ""
    ranks_per_device: int = 1
    group_topology_key: str = "matrixinfer.io/scale-up-domain"


class Slo(Base, frozen=True):
    """Latency targets the scaling policy defends (milliseconds)."""

    ttft_ms: float
    tpot_ms: float


class Pool(Base, frozen=True):
    """One pool of prefill or decode instances.

    Attributes:
        instances: instances started.
        min_instances, max_instances: the autoscaler's bounds (it never leaves them).
        ranks: EP ranks of one instance (its EP degree); 1 is a plain single-process instance.
        ranks_per_node: ranks of one instance on one host (default: all that fit the hardware's host).
        placement: ``pack`` keeps an instance's ranks together (one host when they fit, else adjacent
            hosts), ``spread`` lets them land anywhere.
        redundant_experts: redundant expert copies the plan counted on.
        cpus_per_rank, memory_per_rank: host resources one rank process asks for (Kubernetes
            requests, Ray actor resources); memory as ``16G``.
        kv_cache_memory: KV cache bytes of each instance (``2G``; default: the engine's setting).
    """

    instances: int = 1
    min_instances: int = 1
    max_instances: int = 1
    ranks: int = 1
    ranks_per_node: int | None = None
    placement: Literal["pack", "spread"] = "pack"
    redundant_experts: int = 0
    cpus_per_rank: float = 1.0
    memory_per_rank: str = "4G"
    kv_cache_memory: str | None = None


class Ems(Base, frozen=True):
    """The EMS memory pool: ``servers`` servers of ``capacity`` DRAM each (``0`` servers: no pool)."""

    servers: int = 1
    capacity: str = "512M"
    cpus: float = 1.0


class Router(Base, frozen=True):
    """The API front end and its control port (workers join there); ports left out are the command
    line's (``--port``, default 8000, and ``--router-port``, default the port + 1)."""

    port: int | None = None
    control_port: int | None = None
    cpus: float = 1.0
    memory: str = "2G"


class Autoscale(Base, frozen=True):
    """The scaling policy's thresholds (see :mod:`matrixinfer.cluster.autoscale`).

    Attributes:
        enabled: whether the Ray backend runs the policy.
        interval_s: seconds between decisions.
        queue_per_instance_high: waiting requests per instance above which a pool grows.
        queue_per_instance_low: waiting requests per instance below which a pool may shrink.
        latency_high: grow when TTFT (prefill) or TPOT (decode) exceeds this fraction of the SLO.
        latency_low: shrink only while latency is below this fraction of the SLO.
        up_after, down_after: consecutive decisions that must agree before scaling (hysteresis).
        cooldown_s: seconds after a change before the same pool changes again.
    """

    enabled: bool = True
    interval_s: float = 5.0
    queue_per_instance_high: float = 4.0
    queue_per_instance_low: float = 0.5
    latency_high: float = 0.9
    latency_low: float = 0.5
    up_after: int = 2
    down_after: int = 6
    cooldown_s: float = 30.0


class DeploymentSpec(Base, frozen=True):
    """A whole P/D/C deployment (see the module docstring and docs/cluster.md)."""

    version: int = SPEC_VERSION
    name: str = "matrixinfer"
    model: str | None = None
    image: str = "matrixinfer:latest"
    hardware: Hardware = msgspec.field(default_factory=Hardware)
    slo: Slo = msgspec.field(default_factory=lambda: Slo(ttft_ms=2000.0, tpot_ms=100.0))
    prefill: Pool = msgspec.field(default_factory=Pool)
    decode: Pool = msgspec.field(default_factory=Pool)
    ems: Ems = msgspec.field(default_factory=Ems)
    router: Router = msgspec.field(default_factory=Router)
    autoscale: Autoscale = msgspec.field(default_factory=Autoscale)
    engine: dict[str, str | int | float | bool] = msgspec.field(default_factory=dict)

    def pool(self, role: str) -> Pool:
        if role not in ("prefill", "decode"):
            raise SpecError(f"unknown pool {role!r}: expected prefill or decode")
        return self.prefill if role == "prefill" else self.decode

    def ranks_per_node(self, role: str) -> int:
        """Ranks of one ``role`` instance placed on one host."""
        p = self.pool(role)
        return min(p.ranks, p.ranks_per_node or self.hardware.ranks_per_node)

    def nodes_per_instance(self, role: str) -> int:
        return math.ceil(self.pool(role).ranks / self.ranks_per_node(role))


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str, where: str) -> int:
    """``512M`` / ``4G`` / ``1024`` -> bytes; a SpecError naming ``where`` otherwise."""
    t = str(text).strip().upper().removesuffix("I").removesuffix("B")
    unit = t[-1:] if t[-1:] in _SIZE_UNITS and t[-1:] else ""
    try:
        value = float(t[: len(t) - len(unit)])
    except ValueError:
        raise SpecError(f"{where}: {text!r} is not a size (expected e.g. 512M, 4G)") from None
    if value <= 0:
        raise SpecError(f"{where}: size must be positive, got {text!r}")
    return int(value * _SIZE_UNITS[unit])


def validate(spec: DeploymentSpec, source: str = "spec") -> DeploymentSpec:
    """Check what the types cannot: counts, bounds, sizes, engine keys. Returns ``spec``."""
    from matrixinfer.config import EngineConfig

    def fail(field: str, msg: str) -> None:
        raise SpecError(f"{source}: {field}: {msg}")

    if spec.version != SPEC_VERSION:
        fail("version", f"this MatrixInfer reads version {SPEC_VERSION}, got {spec.version}")
    hw = spec.hardware
    for name, v in (("nodes", hw.nodes), ("ranks_per_node", hw.ranks_per_node),
                    ("ranks_per_device", hw.ranks_per_device)):
        if v < 1:
            fail(f"hardware.{name}", f"must be at least 1, got {v}")
    if hw.ranks_per_node % hw.ranks_per_device:
        fail("hardware.ranks_per_node", f"{hw.ranks_per_node} is not a multiple of ranks_per_device "
             f"{hw.ranks_per_device}")
    if spec.slo.ttft_ms <= 0 or spec.slo.tpot_ms <= 0:
        fail("slo", f"targets must be positive, got ttft_ms {spec.slo.ttft_ms}, tpot_ms {spec.slo.tpot_ms}")
    for role in ("prefill", "decode"):
        p = spec.pool(role)
        if p.ranks < 1:
            fail(f"{role}.ranks", f"must be at least 1, got {p.ranks}")
        if p.ranks_per_node is not None and not 1 <= p.ranks_per_node <= hw.ranks_per_node:
            fail(f"{role}.ranks_per_node", f"must be between 1 and hardware.ranks_per_node "
                 f"({hw.ranks_per_node}), got {p.ranks_per_node}")
        if not 0 <= p.min_instances <= p.instances <= p.max_instances:
            fail(role, f"needs 0 <= min_instances <= instances <= max_instances, got {p.min_instances} <= "
                 f"{p.instances} <= {p.max_instances}")
        if p.cpus_per_rank <= 0:
            fail(f"{role}.cpus_per_rank", f"must be positive, got {p.cpus_per_rank}")
        parse_bytes(p.memory_per_rank, f"{source}: {role}.memory_per_rank")
        if p.kv_cache_memory is not None:
            parse_bytes(p.kv_cache_memory, f"{source}: {role}.kv_cache_memory")
        need = spec.nodes_per_instance(role)
        if need > hw.nodes:
            fail(f"{role}.ranks", f"one instance of {p.ranks} ranks needs {need} hosts of "
                 f"{spec.ranks_per_node(role)} ranks; hardware.nodes is {hw.nodes}")
    if spec.ems.servers < 0:
        fail("ems.servers", f"cannot be negative, got {spec.ems.servers}")
    parse_bytes(spec.ems.capacity, f"{source}: ems.capacity")
    a = spec.autoscale
    if a.interval_s <= 0 or a.cooldown_s < 0 or a.up_after < 1 or a.down_after < 1:
        fail("autoscale", "interval_s must be positive, cooldown_s non-negative, up_after and down_after >= 1")
    if not (0 <= a.queue_per_instance_low < a.queue_per_instance_high and 0 < a.latency_low < a.latency_high):
        fail("autoscale", "the low thresholds must be below the high ones (queue_per_instance_low < _high, "
             "latency_low < latency_high)")
    known = {f.name for f in __import__("dataclasses").fields(EngineConfig)}
    owned = {"model", "ep", "nnodes", "node_rank", "master_addr", "master_port", "kv_cache_memory"}
    for key in spec.engine:
        if key not in known:
            fail(f"engine.{key}", f"not an engine setting (known: {', '.join(sorted(known - owned))})")
        if key in owned:
            fail(f"engine.{key}", "is set by the spec itself (model, the pools' ranks and kv_cache_memory)")
    return spec


def loads(text: str | bytes, source: str = "spec") -> DeploymentSpec:
    """Parse YAML (or JSON) text into a validated spec."""
    import yaml

    try:
        raw: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        spec = msgspec.convert(raw, DeploymentSpec)
    except msgspec.ValidationError as exc:
        raise SpecError(f"{source}: {exc}") from None
    return validate(spec, source)


def load(path: str | Path) -> DeploymentSpec:
    """Read and validate a spec file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise SpecError(f"{p}: cannot read the deployment spec ({exc.strerror or exc})") from None
    return loads(text, str(p))


def to_dict(spec: DeploymentSpec) -> dict[str, Any]:
    return msgspec.to_builtins(spec)


def dumps(spec: DeploymentSpec) -> str:
    """YAML text of ``spec`` with a header line; ``loads(dumps(s)) == s``."""
    import yaml

    body = yaml.safe_dump(to_dict(spec), sort_keys=False, default_flow_style=False)
    return f"# MatrixInfer deployment spec (docs/cluster.md); run: matrixinfer serve --deploy FILE\n{body}"
