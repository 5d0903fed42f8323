"""Throughput per chip against TPOT: the batch sweep behind `matrixinfer simulate sweep`."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from matrixinfer.sim.decode import DecodeConfig, decode_step
from matrixinfer.sim.hardware import ClusterSpec
from matrixinfer.sim.measurements import profile_for
from matrixinfer.sim.operators import Die
from matrixinfer.sim.planner import BATCHES
from matrixinfer.sim.shapes import ModelShapes


@dataclass(frozen=True)
class SweepPoint:
    hardware: str
    decode_chips: int
    batch_per_chip: int
    tpot_ms: float
    tok_s_per_chip: float
    fits: bool


def decode_sweep(shapes: ModelShapes, hw: ClusterSpec, prompt: int, output: int,
                 decode_chips: int | None = None, mtp: bool = True) -> list[SweepPoint]:
    """One decode instance (default: the paper's 160 chips, capped at the cluster) over batches."""
    chips = min(decode_chips or 160, hw.chips)
    dies = chips * hw.chip.dies
    spare = dies - shapes.routed_experts - 32
    shared = spare if 0 < spare <= dies // 4 else 0
    die = Die(hw.chip, profile_for(hw.chip.name))
    points = []
    for batch in BATCHES:
        r = decode_step(die, shapes, DecodeConfig(dies=dies, batch_per_chip=batch,
                                                  context=prompt + output / 2,
                                                  shared_expert_dies=shared, mtp=mtp))
        points.append(SweepPoint(hw.name, chips, batch, r.tpot * 1e3, r.tokens_per_s_per_chip,
                                 r.fits))
    return points


def write_sweep(series: list[list[SweepPoint]], out_dir: Path) -> list[Path]:
    """Write sweep.csv, sweep.json and sweep.png (Agg backend) into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [asdict(p) for s in series for p in s]
    csv_path, json_path, png_path = out_dir / "sweep.csv", out_dir / "sweep.json", out_dir / "sweep.png"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    json_path.write_text(json.dumps(rows, indent=1))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in series:
        pts = [p for p in s if p.fits]
        ax.plot([p.tpot_ms for p in pts], [p.tok_s_per_chip for p in pts], marker="o",
                label=f"{s[0].hardware} ({s[0].decode_chips} chips)")
    ax.set_xlabel("TPOT (ms)")
    ax.set_ylabel("decode tokens/s per chip")
    ax.set_title("Decode throughput per chip vs TPOT (batch sweep)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return [csv_path, json_path, png_path]
