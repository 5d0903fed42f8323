"""`matrixinfer simulate ...` and `matrixinfer plan ...`: the supernode simulator and planner."""

from __future__ import annotations

import argparse


def _workload(text: str) -> tuple[int, int, float]:
    parts = text.split("/")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"--workload {text!r}: expected prompt/output[/reuse]")
    try:
        reuse = float(parts[2]) if len(parts) == 3 else 0.0
        return int(parts[0]), int(parts[1]), reuse
    except ValueError:
        raise argparse.ArgumentTypeError(f"--workload {text!r}: expected integers prompt/output "
                                         "and an optional reuse fraction") from None


def _shapes(path: str | None):
    from matrixinfer.sim.shapes import ModelShapes, default_model_path

    return ModelShapes.from_file(path or default_model_path())


def register(subparsers) -> None:
    """Add `simulate` (paper | nvidia | sweep | des) and `plan`."""
    sim = subparsers.add_parser("simulate", help="supernode simulator (paper reproduction, sweeps)")
    simsub = sim.add_subparsers(dest="sim_command", metavar="WHAT")
    paper = simsub.add_parser("paper", help="reproduce the paper's figures side by side")
    paper.add_argument("--model", help="config.json (default: shared DeepSeek-R1)")
    paper.add_argument("--nvidia", action="store_true", help="also print the H800/H100 predictions")
    paper.add_argument("--profile", default="profile.json",
                       help="profile for the profile-informed column (cached KV loaded at its measured EMS get "
                            "rate, one client, largest block, where that is below the link's); used when it exists")
    paper.add_argument("--no-profile", action="store_true", help="the analytic model only")
    paper.set_defaults(func=_cmd_paper)
    nv = simsub.add_parser("nvidia", help="DeepSeek-R1 tok/s per GPU on H800/H100 (H200 optional)")
    nv.add_argument("--model")
    nv.add_argument("--gpus", default="h800,h100")
    nv.add_argument("--tpot-ms", type=float, default=50.0)
    nv.set_defaults(func=_cmd_nvidia)
    sw = simsub.add_parser("sweep", help="throughput/chip vs TPOT plot (PNG) plus CSV/JSON")
    sw.add_argument("--model")
    sw.add_argument("--hardware", action="append",
                    help="cm384 or h100x8-nodes:N ... (repeatable; default cm384 and h800x8-nodes:18)")
    sw.add_argument("--workload", type=_workload, default=(4096, 256, 0.0))
    sw.add_argument("--decode-chips", type=int, default=None)
    sw.add_argument("--out", default="sim-sweep")
    sw.set_defaults(func=_cmd_sweep)
    des = simsub.add_parser("des", help="discrete-event run of the paper's decode load")
    des.add_argument("--model")
    des.add_argument("--minutes", type=float, default=10.0)
    sim.set_defaults(func=lambda args: (sim.print_help(), 2)[1])

    des.set_defaults(func=_cmd_des)
    val = simsub.add_parser("validate", help="simulate this machine's engine from a profile and compare with "
                            "measured `matrixinfer bench` runs (colocated and P/D)")
    val.add_argument("--profile", default=None,
                     help="profile taken here (`matrixinfer profile`); alone, every scenario is simulated from it. "
                          "Without it, --profile-each on a small grid taken at start")
    val.add_argument("--profile-each", action="store_true",
                     help="before each scenario and each repeat, re-measure the profile points its simulation "
                          "reads (its deployment's thread count) and simulate from those over the base profile: "
                          "this machine's speed drifts more in minutes than the bar allows")
    val.add_argument("--model", default=None, help="checkpoint (default: the built-in demo model)")
    val.add_argument("--quick", action="store_true", help="few short runs (a smoke test, not the bar)")
    val.add_argument("--skip-pd", action="store_true", help="colocated engine only")
    val.add_argument("--simulate-only", action="store_true", help="print the predictions, measure nothing")
    val.add_argument("--repeats", type=int, default=1,
                     help="measure each scenario this many times: the table gives the mean and the spread "
                          "(max - min over mean), the measurement's own noise floor")
    val.add_argument("--result-json", default=None, help="write the table here as JSON")
    val.set_defaults(func=_cmd_validate)

    prof = subparsers.add_parser("profile", help="measure the runtime's operators on this device (for the simulator)")
    prof.add_argument("--model", default=None, help="checkpoint (default: the built-in demo model)")
    prof.add_argument("--out", default="profile.json", help="profile JSON (a CSV of the same table goes beside it)")
    prof.add_argument("--grid", choices=("tiny", "full"), default="full", help="shape grid (tiny: a schema check)")
    prof.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    prof.add_argument("--threads", default=None,
                      help="torch threads, comma-separated for several tables, e.g. 2,1 (default: all cores "
                           "and the P/D workers' share)")
    prof.add_argument("--no-ems", action="store_true", help="skip EMS get/put")
    prof.add_argument("--no-ep", action="store_true", help="skip expert-parallel dispatch/combine (EP 2 and 4)")
    prof.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    prof.set_defaults(func=_cmd_profile)

    plan = subparsers.add_parser("plan", help="recommend a P/D deployment for an SLO and workload")
    plan.add_argument("--model")
    plan.add_argument("--hardware", default="cm384")
    plan.add_argument("--ttft-ms", type=float, required=True)
    plan.add_argument("--tpot-ms", type=float, required=True)
    plan.add_argument("--workload", type=_workload, required=True, help="prompt/output[/reuse]")
    plan.add_argument("--price-per-hour", type=float, default=2.0, help="price per chip-hour")
    plan.add_argument("--autoscale-peak-rps", type=float, default=None,
                      help="also print instances per hour for a diurnal load with this peak")
    from matrixinfer.cluster.cli import add_plan_args

    add_plan_args(plan)
    plan.set_defaults(func=_cmd_plan)


def _cmd_paper(args) -> int:
    from matrixinfer.sim.paper import format_figures, reproduce_paper

    shapes = _shapes(args.model)
    print(f"Model: {shapes.name} (weights {shapes.weight_bytes() / 1e9:.0f} GB INT8)")
    from pathlib import Path

    if not args.no_profile and Path(args.profile).exists():
        import sys

        from matrixinfer.sim.profile_data import Profile
        try:
            rate, label = Profile.load(args.profile).ems_get_rate()
        except (FileNotFoundError, ValueError, KeyError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(format_figures(reproduce_paper(shapes), reproduce_paper(shapes, rate), label))
    else:
        if not args.no_profile:
            print(f"(no {args.profile}: analytic model only; `matrixinfer profile` writes one)")
        print(format_figures(reproduce_paper(shapes)))
    if args.nvidia:
        _print_nvidia(shapes, ("h800", "h100"), 0.050)
    return 0


def _print_nvidia(shapes, gpus, tpot) -> None:
    from matrixinfer.sim.nvidia import format_predictions, predict

    print()
    print("DeepSeek-R1 on NVIDIA (predictions of the same cost model):")
    print(format_predictions(predict(shapes, gpus, tpot)))


def _cmd_nvidia(args) -> int:
    _print_nvidia(_shapes(args.model), tuple(g.strip() for g in args.gpus.split(",")),
                  args.tpot_ms / 1e3)
    return 0


def _cmd_sweep(args) -> int:
    from pathlib import Path

    from matrixinfer.sim.hardware import parse_hardware
    from matrixinfer.sim.sweep import decode_sweep, write_sweep

    shapes = _shapes(args.model)
    prompt, output, _ = args.workload
    series = [decode_sweep(shapes, parse_hardware(h), prompt, output, args.decode_chips)
              for h in (args.hardware or ["cm384", "h800x8-nodes:18"])]
    for path in write_sweep(series, Path(args.out)):
        print(f"wrote {path}")
    return 0


def _cmd_des(args) -> int:
    import time

    from matrixinfer.sim.des import simulate
    from matrixinfer.sim.paper import paper_decode
    from matrixinfer.sim.scenarios import paper_decode_load

    shapes = _shapes(args.model)
    dep, wl = paper_decode_load(shapes)
    start = time.perf_counter()
    res = simulate(dep, wl, args.minutes * 60, warmup_s=min(60.0, args.minutes * 6))
    wall = time.perf_counter() - start
    step = paper_decode(shapes, 96, 4096, 256)
    print(f"simulated {args.minutes:.0f} min in {wall:.1f} s wall; {res.completed} requests")
    print(f"TTFT p50/p99 {res.ttft_p50:.2f}/{res.ttft_p99:.2f} s, TPOT p50/p99 "
          f"{res.tpot_p50 * 1e3:.1f}/{res.tpot_p99 * 1e3:.1f} ms, goodput {res.goodput_rps:.0f} req/s")
    print(f"decode tok/s/chip: DES {res.output_tok_s_per_decode_chip:,.0f} vs step model "
          f"{step.tokens_per_s_per_chip:,.0f}")
    return 0


def _cmd_plan(args) -> int:
    import sys

    from matrixinfer.sim.autoscale import autoscale, diurnal_curve
    from matrixinfer.sim.hardware import parse_hardware
    from matrixinfer.sim.planner import PlanRequest, format_plan, plan

    if not args.out and (args.emit != "spec" or args.paper_deployment):
        print("error: --emit k8s and --paper-deployment write files: give --out PATH", file=sys.stderr)
        return 2
    try:
        hw = parse_hardware(args.hardware)
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    prompt, output, reuse = args.workload
    req = PlanRequest(args.ttft_ms / 1e3, args.tpot_ms / 1e3, prompt, output, reuse,
                      args.price_per_hour)
    shapes = _shapes(args.model)
    try:
        pl = plan(shapes, hw, req)
    except ValueError as exc:
        print(f"error: {exc}")
        return 1
    print(f"{shapes.name} on {hw.name}: TTFT <= {args.ttft_ms:.0f} ms, TPOT <= {args.tpot_ms:.0f} ms, "
          f"workload {prompt}/{output} reuse {reuse:.0%}")
    print(format_plan(pl, hw))
    if args.autoscale_peak_rps:
        print("\nhour  load(req/s)  prefill  decode  chips")
        for h in autoscale(pl, req, diurnal_curve(args.autoscale_peak_rps), hw.chips):
            print(f"{h.hour:>4}  {h.load_rps:>11.1f}  {h.prefill_instances:>7}  "
                  f"{h.decode_instances:>6}  {h.chips:>5}")
    if args.out:
        from matrixinfer.cluster.cli import write_plan

        return write_plan(args, pl, hw, req)
    return 0


def _cmd_profile(args) -> int:
    import os
    import sys
    from pathlib import Path

    from matrixinfer.model.default_model import default_model_path
    from matrixinfer.model.device import resolve_device
    from matrixinfer.sim.profiler import GRIDS, run_profile, threads_tables

    try:
        device = resolve_device(args.device)
        threads = threads_tables(args.threads, os.cpu_count() or 1)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model = Path(args.model) if args.model else default_model_path()
    if not (model / "config.json").exists():
        print(f"error: {model}: not a checkpoint directory (no config.json)", file=sys.stderr)
        return 2
    out = Path(args.out)
    for n in threads:
        path = out if n == threads[0] else out.with_name(f"{out.stem}.t{n}{out.suffix}")
        prof = run_profile(model, path, GRIDS[args.grid], device, n, progress=not args.disable_tqdm,
                           with_ems=not args.no_ems, with_ep=not args.no_ep and n == threads[0])
        m = prof.meta
        print(f"wrote {path} and {path.with_suffix('.csv')}: {sum(len(t.points) for t in prof.ops.values())} points, "
              f"{len(prof.ops)} operators, {m['threads']} thread(s), {m['wall_s']} s on {m['device_name']} "
              f"(load average {m['load_avg_start']:.1f} -> {m['load_avg_end']:.1f})")
    return 0


def _cmd_validate(args) -> int:
    import sys

    from matrixinfer.sim.validate import run_validation

    try:
        return run_validation(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
