"""``matrixinfer quantize``: a float checkpoint in, an INT8 (W8A8) checkpoint out, training-free."""

from __future__ import annotations

import argparse

from matrixinfer.cli_args import add_dataclass_args
from matrixinfer.quant.policy import QuantRecipe


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="write an INT8 (W8A8) checkpoint of a float one",
                       description="Calibrate on text, choose per-layer smoothing and clipping, and write an INT8 "
                                   "checkpoint that `matrixinfer serve --model OUT` serves.")
    p.add_argument("--model", default=None, help="float checkpoint directory (default: the built-in model)")
    p.add_argument("--out", required=True, help="directory of the INT8 checkpoint to write")
    p.add_argument("--calibration", nargs="+", default=["builtin"], metavar="FILE",
                   help="text files to calibrate on, or 'builtin': the first half of the demo corpus's held-out "
                        "stdlib files (default)")
    p.add_argument("--windows", type=int, default=32, help="calibration windows (default: 32)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window (default: 256)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    add_dataclass_args(p.add_argument_group("steps (each can be switched off for ablation)"), QuantRecipe)
    p.set_defaults(func=_quantize)


def _quantize(args: argparse.Namespace) -> int:
    import sys

    import torch

    from matrixinfer.cli_args import from_args
    from matrixinfer.model.default_model import default_model_path
    from matrixinfer.model.loader import CheckpointError, load_model
    from matrixinfer.model.tokenizer import TokenizerError
    from matrixinfer.quant import calibration
    from matrixinfer.quant.checkpoint import write_checkpoint
    from matrixinfer.quant.quantizer import Quantizer

    if args.windows < 1 or args.seq_len < 2:
        print("error: --windows must be at least 1 and --seq-len at least 2", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.model or default_model_path()
    recipe = from_args(QuantRecipe, args)
    source = calibration.BUILTIN if args.calibration == [calibration.BUILTIN] else args.calibration
    try:
        windows = calibration.windows(path, source, args.seq_len + 1, args.windows)
        model = load_model(path, dtype=torch.float32, device="cpu")
        print(f"calibrating on {windows.shape[0]} windows of {args.seq_len} tokens "
              f"({'built-in held-out stdlib' if source == calibration.BUILTIN else ', '.join(source)})")
        report = Quantizer(model, windows, recipe).run()
        print(report.table())
        out = write_checkpoint(model, path, args.out, report.rotated, report.details())
    except (CheckpointError, TokenizerError, calibration.CalibrationError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for b in report.blocks:
        print(f"{b.name}: smoothing {b.smoothing or '-'}, clip {b.clip:g}, "
              f"compensation {'kept' if b.bias_correction else 'off'}, block error {b.error:.2e}")
    print(f"wrote {out} ({len(report.int8)} INT8 modules, {len(report.high_precision)} in high precision)")
    return 0
