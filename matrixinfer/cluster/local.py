"""A deployment spec as the single-host launcher's settings (``serve --deploy FILE``).

The spec decides the deployment (model, pools, ranks, EMS, ports, engine settings); the command
line keeps what belongs to the host and the operator (bind address, API key, log level, secret
file, worker threads). Pure: no process is started here.
"""

from __future__ import annotations

import dataclasses

from matrixinfer.cluster.spec import DeploymentSpec, SpecError, parse_bytes
from matrixinfer.config import EngineConfig, ServeConfig


def engine_config(spec: DeploymentSpec, base: EngineConfig, role: str, source: str = "spec") -> EngineConfig:
    """The engine settings of one ``role`` instance: ``base`` with the spec's model, engine
    settings, EP degree (the pool's ranks) and KV cache size."""
    pool = spec.pool(role)
    changes: dict[str, object] = dict(spec.engine)
    if spec.model:
        changes["model"] = spec.model
    changes["ep"] = pool.ranks
    if pool.kv_cache_memory:
        changes["kv_cache_memory"] = parse_bytes(pool.kv_cache_memory, f"{source}: {role}.kv_cache_memory")
    try:
        return dataclasses.replace(base, **changes)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{source}: engine: {exc}") from None


def local_configs(spec: DeploymentSpec, engine: EngineConfig, serve: ServeConfig,
                  source: str = "spec") -> tuple[EngineConfig, ServeConfig]:
    """(EngineConfig, ServeConfig) for :func:`matrixinfer.serve.launcher.serve_pdc` on this host.

    The launcher gives every worker one engine configuration, so both pools must have the same
    ranks per instance here (a Ray cluster or Kubernetes runs pools of different sizes)."""
    if spec.prefill.ranks != spec.decode.ranks:
        raise SpecError(f"{source}: the single-host launcher runs one EP degree for both pools; prefill.ranks "
                        f"is {spec.prefill.ranks} and decode.ranks {spec.decode.ranks} (run it with --ray, or "
                        "on Kubernetes with `matrixinfer plan --emit k8s`)")
    eng = engine_config(spec, engine, "decode", source)
    prefill_kv = engine_config(spec, engine, "prefill", source).kv_cache_memory
    try:
        srv = dataclasses.replace(
            serve, colocated=False, port=spec.router.port or serve.port,
            router_port=spec.router.control_port or serve.router_port,
            num_prefill=spec.prefill.instances, num_decode=spec.decode.instances, num_ems=spec.ems.servers,
            ems_capacity=spec.ems.capacity, prefill_kv_cache_memory=prefill_kv,
            decode_kv_cache_memory=eng.kv_cache_memory)
    except ValueError as exc:
        raise SpecError(f"{source}: {exc}") from None
    return eng, srv
