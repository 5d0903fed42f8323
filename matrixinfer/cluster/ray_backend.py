"""``matrixinfer serve --deploy deploy.yaml --ray ADDRESS``: a deployment spec on a Ray cluster.

The driver (this process) starts the router actor on its own node, one actor per EMS server, and
per prefill or decode instance one actor per rank in a placement group chosen by
:mod:`matrixinfer.cluster.placement` (``STRICT_PACK`` keeps an EP instance on one node). It then
supervises and scales:

- a one-rank instance's actor is restarted by Ray (``max_restarts=-1``) and its new process joins
  the router as a new instance; the driver notices the new process and logs the restart;
- an EP instance whose rank died is recreated as a group in its placement group (its ranks share
  one collective group: a lone restarted rank could not rejoin it);
- every ``autoscale.interval_s`` the router's signals go through :func:`~matrixinfer.cluster.autoscale.decide`;
  an instance is added, or an idle one removed, within the spec's bounds; each decision is logged
  and exported in the router's ``/metrics`` (``matrixinfer_autoscale_*``).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from matrixinfer.cli_args import to_argv
from matrixinfer.cluster.autoscale import PoolSignals, ScaleState, decide, windowed_mean
from matrixinfer.cluster.local import engine_config
from matrixinfer.cluster.placement import GroupPlan, group_plans, strategy
from matrixinfer.cluster.ray_actors import FREE_PORT, NODE_IP, ProcessActor, RouterActor
from matrixinfer.cluster.spec import DeploymentSpec, SpecError
from matrixinfer.config import EngineConfig, ServeConfig

log = logging.getLogger(__name__)
NAMESPACE = "matrixinfer"
SUPERVISE_S = 1.0


@dataclass
class Instance:
    """One prefill or decode instance: its rank actors and placement group."""

    role: str
    index: int
    plan: GroupPlan
    pg: Any
    actors: list[Any] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    restarts: int = 0
    instance_id: str | None = None


class RayDeployment:
    """The deployment's actors and the loop that supervises and scales them (see the module docstring)."""

    def __init__(self, spec: DeploymentSpec, engine: EngineConfig, serve: ServeConfig, secret: bytes) -> None:
        import ray

        self.ray = ray
        self.spec, self.engine, self.serve, self.secret = spec, engine, serve, secret
        self.instances: list[Instance] = []
        self.ems: list[Any] = []
        self.router: Any = None
        self.addr: dict[str, str] = {}
        self.next_index = {"prefill": 0, "decode": 0}
        self.scale_state = {"prefill": ScaleState(), "decode": ScaleState()}
        self.last_hist: dict[str, list[float]] | None = None
        self.last_reason: dict[str, str] = {}
        self.plans = {(p.role, p.index): p for p in group_plans(spec)}
        self._process = ray.remote(ProcessActor)
        self._router = ray.remote(RouterActor)

    # -- start -----------------------------------------------------------------------------------
    def _env(self, threads: float) -> dict[str, str]:
        return {"MATRIXINFER_SECRET": self.secret.decode(), "MATRIXINFER_SECRET_FILE": "",
                "MATRIXINFER_THREADS": str(max(1, int(threads))), "MATRIXINFER_LOG": "INFO"}

    def start(self, timeout: float = 600.0) -> dict[str, str]:
        """Start everything and wait until the router has every instance; returns its addresses."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        spec = self.spec
        model = self.engine.model or ""
        here = NodeAffinitySchedulingStrategy(self.ray.get_runtime_context().get_node_id(), soft=False)
        serve = dataclasses.asdict(self.serve)
        self.router = self._router.options(name=f"{spec.name}-router", num_cpus=0, scheduling_strategy=here,
                                           max_concurrency=8).remote(
            model, self.engine.served_model_name, serve, self.secret.decode(), spec.ems.servers > 0)
        self.addr = self.ray.get(self.router.addresses.remote())
        ctrl = self.addr["control"]
        for i in range(spec.ems.servers):
            self.ems.append(self._process.options(name=f"{spec.name}-ems{i}", num_cpus=spec.ems.cpus, max_restarts=-1)
                            .remote(f"ems{i}", ["worker", "--role", "ems", "--router", ctrl, "--kv-host", NODE_IP,
                                                "--ems-capacity", spec.ems.capacity], self._env(1)))
        for role in ("prefill", "decode"):
            for _ in range(spec.pool(role).instances):
                self.add_instance(role)
        self.wait_joined(timeout)
        return self.addr

    def _plan(self, role: str, index: int) -> GroupPlan:
        plan = self.plans.get((role, index))
        if plan is None:  # an instance the autoscaler added beyond the spec's count
            pool = self.spec.pool(role)
            first = self.plans.get((role, 0))
            bundle = first.bundle if first else {"CPU": pool.cpus_per_rank}
            plan = GroupPlan(role, index, pool.ranks, strategy(self.spec, role, 0), bundle, 0)
        return plan

    def add_instance(self, role: str) -> Instance:
        from ray.util.placement_group import placement_group

        index = self.next_index[role]
        self.next_index[role] += 1
        plan = self._plan(role, index)
        pg = placement_group([dict(plan.bundle) for _ in range(plan.ranks)], strategy=plan.strategy,
                             name=f"{self.spec.name}-{role}{index}")
        inst = Instance(role, index, plan, pg)
        self._start_ranks(inst)
        self.instances.append(inst)
        log.info("%s%d: %d rank(s), placement group %s", role, index, plan.ranks, plan.strategy)
        return inst

    def _start_ranks(self, inst: Instance) -> None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        eng = engine_config(self.spec, self.engine, inst.role)
        base = to_argv(eng, skip=("ep", "nnodes", "node_rank", "master_addr", "master_port"))
        n = inst.plan.ranks

        def actor(rank: int, argv: list[str]) -> Any:
            opts: dict[str, Any] = {"num_cpus": inst.plan.bundle.get("CPU", 1.0),
                                    "num_gpus": inst.plan.bundle.get("GPU", 0), "max_restarts": -1 if n == 1 else 0,
                                    "scheduling_strategy": PlacementGroupSchedulingStrategy(inst.pg, rank)}
            return self._process.options(**opts).remote(f"{inst.role}{inst.index}.{rank}", argv,
                                                        self._env(inst.plan.bundle.get("CPU", 1.0)))

        worker = ["worker", "--role", inst.role, "--router", self.addr["control"], "--kv-host", NODE_IP]
        if n == 1:
            inst.actors = [actor(0, [*worker, *base])]
        else:  # one actor per rank; rank 0 serves and hosts the rendezvous
            ep = ["--ep", str(n), "--nnodes", str(n)]
            lead = actor(0, [*worker, *ep, "--node-rank", "0", "--master-addr", NODE_IP, "--master-port", FREE_PORT,
                             *base])
            info = self.ray.get(lead.info.remote())
            inst.actors = [lead] + [actor(k, ["serve", *ep, "--node-rank", str(k), "--master-addr", info["ip"],
                                              "--master-port", str(info["port"]), *base]) for k in range(1, n)]
        inst.pids = [info["pid"] for info in self.ray.get([a.info.remote() for a in inst.actors])]

    def wait_joined(self, timeout: float) -> None:
        """Until the router has as many instances of each pool as the driver started."""
        deadline = time.monotonic() + timeout
        while True:
            sig = self.ray.get(self.router.signals.remote())
            want = {r: sum(1 for i in self.instances if i.role == r) for r in ("prefill", "decode")}
            have = {r: len(sig["pools"][r]["instances"]) for r in want}
            if all(have[r] >= want[r] for r in want):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"instances joined within {timeout:.0f} s: {have}, started: {want}")
            time.sleep(0.5)

    # -- supervise -------------------------------------------------------------------------------
    def supervise(self) -> None:
        """Notice restarted single-rank instances and recreate EP instances that lost a rank."""
        from ray.exceptions import ActorDiedError, RayError

        for inst in list(self.instances):
            infos: list[Any] = []  # a rank's info, None when its actor died, "?" when it did not answer
            for a in inst.actors:
                try:
                    infos.append(self.ray.get(a.info.remote(), timeout=5))
                except ActorDiedError:
                    infos.append(None)
                except RayError:  # restarting, unreachable or slow: judged next round
                    infos.append("?")
            if len(inst.actors) == 1:
                info = infos[0]
                if isinstance(info, dict) and info["pid"] != inst.pids[0]:
                    inst.restarts += 1
                    log.warning("%s%d restarted by Ray (process %d -> %d, restart %d)", inst.role, inst.index,
                                inst.pids[0], info["pid"], inst.restarts)
                    inst.pids = [info["pid"]]
                continue
            if any(i is None for i in infos):
                log.warning("%s%d lost a rank; recreating its %d ranks in placement group %s", inst.role, inst.index,
                            len(inst.actors), inst.plan.strategy)
                for a in inst.actors:
                    self.ray.kill(a, no_restart=True)
                inst.restarts += 1
                self._start_ranks(inst)

    # -- scale -----------------------------------------------------------------------------------
    def autoscale(self, now: float) -> list[Any]:
        """One round of the scaling policy over both pools; returns the decisions."""
        sig = self.ray.get(self.router.signals.remote())
        hist = {"ttft": sig["ttft"], "itl": sig["itl"]}
        prev, self.last_hist = self.last_hist or hist, hist
        out = []
        for role, key, slo in (("prefill", "ttft", self.spec.slo.ttft_ms), ("decode", "itl", self.spec.slo.tpot_ms)):
            pool = self.spec.pool(role)
            mine = [i for i in self.instances if i.role == role]
            p = sig["pools"][role]
            latency = windowed_mean((prev[key][0], prev[key][1]), (hist[key][0], hist[key][1]))
            s = PoolSignals(len(mine), p["queued"], latency)
            d = decide(role, s, slo / 1e3, pool, self.spec.autoscale, self.scale_state[role], now)
            self.scale_state[role] = d.state
            if d.target > len(mine):
                self.add_instance(role)
            elif d.target < len(mine) and not self._remove_idle(role, mine, set(p["idle"])):
                d = dataclasses.replace(d, action="hold", target=len(mine), reason=f"{d.reason}; no idle instance")
            if d.action != "hold":
                log.warning("autoscale %s: %s to %d instances (%s)", role, d.action, d.target, d.reason)
            elif d.reason != self.last_reason.get(role):  # a hold is logged when its reason changes
                log.info("autoscale %s: hold at %d (%s)", role, d.target, d.reason)
            self.last_reason[role] = d.reason
            self.router.record.remote(role, d.action, d.target, d.reason, len(mine))
            out.append(d)
        return out

    def _remove_idle(self, role: str, mine: list[Instance], idle: set[str]) -> bool:
        """Stop the newest instance of ``role`` that the router reports idle; False if none is."""
        for inst in reversed(mine):
            iid = self.ray.get(inst.actors[0].info.remote(), timeout=10)["instance_id"]
            if iid in idle:
                self.stop_instance(inst)
                return True
        return False

    def stop_instance(self, inst: Instance) -> None:
        from ray.util.placement_group import remove_placement_group

        for a in inst.actors:
            try:
                self.ray.get(a.stop.remote(), timeout=15)
            except Exception:  # an actor already gone: nothing to stop
                pass
            self.ray.kill(a, no_restart=True)
        remove_placement_group(inst.pg)
        self.instances.remove(inst)

    def run(self) -> None:
        """Supervise and scale until interrupted."""
        next_scale = time.monotonic() + self.spec.autoscale.interval_s
        while True:
            time.sleep(SUPERVISE_S)
            self.supervise()
            now = time.monotonic()
            if self.spec.autoscale.enabled and now >= next_scale:
                self.autoscale(now)
                next_scale = now + self.spec.autoscale.interval_s

    def shutdown(self) -> None:
        for inst in list(self.instances):
            self.stop_instance(inst)
        for a in self.ems:
            try:
                self.ray.get(a.stop.remote(), timeout=15)
            except Exception:  # already gone
                pass
            self.ray.kill(a, no_restart=True)
        if self.router is not None:
            try:
                self.ray.get(self.router.stop.remote(), timeout=15)
            except Exception:  # already gone
                pass
            self.ray.kill(self.router, no_restart=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serve_on_ray(spec: DeploymentSpec, address: str, engine: EngineConfig, serve: ServeConfig,
                 source: str = "spec") -> int:
    """Run ``spec`` on the Ray cluster at ``address`` until interrupted."""
    try:
        import ray
    except ImportError:
        raise SpecError("--ray needs Ray: pip install 'matrixinfer[cluster]'") from None
    from pathlib import Path

    from matrixinfer.model.default_model import default_model_path
    from matrixinfer.serve.launcher import deployment_secret, discard_secret

    logging.basicConfig(level=serve.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # the router's settings; each instance's engine (its EP degree, KV cache) comes from its pool
    engine = dataclasses.replace(engine_config(spec, engine, "decode", source), ep=1)
    engine = dataclasses.replace(engine, model=str(Path(engine.model) if engine.model else default_model_path()))
    serve = dataclasses.replace(serve, colocated=False, port=spec.router.port or serve.port,
                                router_port=spec.router.control_port or serve.router_port, num_ems=spec.ems.servers,
                                ems_capacity=spec.ems.capacity)
    secret, _, generated = deployment_secret(serve)
    ray.init(address=None if address == "auto" else address, namespace=NAMESPACE, logging_level=logging.WARNING)
    signal.signal(signal.SIGTERM, _interrupt)  # after ray.init, which installs its own handler
    dep = RayDeployment(spec, engine, serve, secret)
    try:
        addr = dep.start()
        print(f"MatrixInfer on Ray serving at {addr['http']} ({spec.prefill.instances} prefill, "
              f"{spec.decode.instances} decode, {spec.ems.servers} EMS; workers join at {addr['control']})", flush=True)
        dep.run()
    except KeyboardInterrupt:
        pass
    except (TimeoutError, RuntimeError) as exc:
        print(f"error: {exc}", flush=True)
        return 1
    finally:
        dep.shutdown()
        discard_secret(generated)
    return 0
