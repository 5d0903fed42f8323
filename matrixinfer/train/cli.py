"""``matrixinfer train-demo``: train the bundled demo model (DeepSeek-V3 architecture, stdlib corpus)."""

from __future__ import annotations

import argparse
from pathlib import Path

from matrixinfer.train.recipe import TrainConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train-demo`` subcommand."""
    defaults = TrainConfig()
    p = subparsers.add_parser("train-demo", help="train the small demo model from the CPython stdlib sources")
    p.add_argument("--out", type=Path, default=None,
                   help="checkpoint directory to write (default: the package's assets/demo-model)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="resumable training state (default: $MATRIXINFER_HOME/train-demo)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    for name in ("seed", "steps", "batch_size", "seq_len", "threads", "vocab_size", "warmup_steps",
                 "checkpoint_every", "eval_windows"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("lr", "min_lr", "mtp_weight", "bias_update_speed"):
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    p.set_defaults(func=_train_demo)


def _train_demo(args: argparse.Namespace) -> int:
    import torch

    from matrixinfer.model.default_model import home
    from matrixinfer.train.demo import SHIPPED_DIR, run

    fields = TrainConfig.__dataclass_fields__
    tc = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    run(tc, args.out or SHIPPED_DIR, args.work_dir or home() / "train-demo", torch.device(args.device))
    return 0
