"""Command-line edges of the cluster layer: ``plan --out/--emit`` and ``serve --deploy/--ray``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from matrixinfer.cluster.spec import DeploymentSpec, SpecError
from matrixinfer.config import EngineConfig, ServeConfig


def add_plan_args(plan: argparse.ArgumentParser) -> None:
    """The plan command's output options."""
    plan.add_argument("--out", default=None, metavar="PATH",
                      help="write the decision: a deployment spec (deploy.yaml) with --emit spec, a directory "
                           "of manifests with --emit k8s")
    plan.add_argument("--emit", choices=["spec", "k8s"], default="spec",
                      help="what --out holds: the deployment spec (for `serve --deploy`) or Kubernetes manifests")
    plan.add_argument("--paper-deployment", action="store_true",
                      help="write the reference design's deployment (1 decode x 160 NPUs + 6 prefill x 16 NPUs "
                           "+ EMS) instead of the recommendation")
    plan.add_argument("--checkpoint", default=None, metavar="DIR",
                      help="checkpoint directory the deployment serves, as its hosts see it (default: the "
                           "directory of --model's config.json)")
    plan.add_argument("--image", default=None, help="container image of the manifests (default: matrixinfer:latest)")


def write_plan(args: argparse.Namespace, pl, hw, req) -> int:
    """``plan --out``: the spec or the manifests of the recommendation (or of the paper's deployment)."""
    from msgspec import structs

    from matrixinfer.cluster.planning import from_plan, paper_deployment
    from matrixinfer.cluster.spec import dumps

    # --model is the planner's config.json; the spec names the checkpoint directory that holds it
    model = args.checkpoint or (str(Path(args.model).parent) if args.model and Path(args.model).is_file() else None)
    try:
        spec = paper_deployment(hw, req, model) if args.paper_deployment else from_plan(pl, hw, req, model)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.image:
        spec = structs.replace(spec, image=args.image)
    out = Path(args.out)
    if args.emit == "spec":
        out.write_text(dumps(spec))
        print(f"wrote {out}: {_summary(spec)}; run it with `matrixinfer serve --deploy {out}`")
        return 0
    from matrixinfer.cluster import k8s_schema
    from matrixinfer.cluster.k8s import manifests, write_manifests

    objs = manifests(spec)
    checked = "not validated: pip install 'matrixinfer[cluster]' for the schema check"
    if k8s_schema.available():
        try:
            for obj in objs:
                k8s_schema.validate_manifest(obj)
        except k8s_schema.ManifestError as exc:
            print(f"error: a generated manifest is invalid (a bug; please report it): {exc}", file=sys.stderr)
            return 1
        checked = f"validated against the Kubernetes {k8s_schema.K8S_VERSION} schemas"
    paths = write_manifests(objs, out)
    print(f"wrote {len(paths)} manifest files under {out}/ ({_summary(spec)}; {checked}); apply with "
          f"`kubectl apply -f {out}` after creating the Secret {spec.name}-secret (key `secret`)")
    return 0


def _summary(spec: DeploymentSpec) -> str:
    p, d = spec.prefill, spec.decode
    return (f"{p.instances} x prefill ({p.ranks} ranks) + {d.instances} x decode ({d.ranks} ranks) + "
            f"{spec.ems.servers} EMS server(s)")


def resolve_deploy(args: argparse.Namespace, engine_cfg: EngineConfig,
                   serve_cfg: ServeConfig) -> tuple[EngineConfig, ServeConfig] | int:
    """``serve --deploy FILE``: the launcher's settings from the spec; with ``--ray ADDRESS`` the
    deployment runs on the Ray cluster here and the exit status comes back instead."""
    from matrixinfer.cluster.spec import load

    if not args.deploy:
        print("error: --ray needs --deploy FILE (the deployment to run on the cluster)", file=sys.stderr)
        return 2
    try:
        spec = load(args.deploy)
        if args.ray:
            from matrixinfer.cluster.ray_backend import serve_on_ray

            return serve_on_ray(spec, args.ray, engine_cfg, serve_cfg, source=args.deploy)
        from matrixinfer.cluster.local import local_configs

        return local_configs(spec, engine_cfg, serve_cfg, args.deploy)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
