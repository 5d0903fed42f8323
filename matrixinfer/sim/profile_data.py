"""Measured operator profiles: the file format and lookups (pure; no timing happens here).

A profile is what ``matrixinfer profile`` measured on one device: for each operator, its time at a
grid of shapes (one or two axes), plus the device's measured roofline (GEMM rate and streaming
bandwidth) and a header saying where and with what it was taken. :meth:`Profile.lookup` answers
"how long does this operator take at this shape" and says how it got the answer:

- ``profile``: the shape lies inside the measured grid; monotone piecewise-cubic interpolation
  (Fritsch-Carlson), per axis, between measured points, so the curve never overshoots them;
- ``roofline``: outside the grid; the roofline time of the shape scaled by measured/roofline at
  the nearest measured point (nearest in log space).

The JSON holds everything; the CSV beside it is the same table flat, for spreadsheets.
"""

from __future__ import annotations

import bisect
import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = "matrixinfer-profile"
VERSION = 2  # 2: greedy sampling, api_request and api_token


@dataclass(frozen=True)
class Cost:
    """One predicted operator time and where it came from (``profile`` or ``roofline``)."""

    seconds: float
    source: str
    op: str


@dataclass
class OpTable:
    """Measured times of one operator: ``axes`` names, ``points`` rows of axis values, ``seconds``."""

    axes: tuple[str, ...]
    points: list[tuple[float, ...]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def add(self, point: Sequence[float], seconds: float) -> None:
        if len(point) != len(self.axes):
            raise ValueError(f"point {tuple(point)} has {len(point)} values; axes are {self.axes}")
        self.points.append(tuple(float(v) for v in point))
        self.seconds.append(float(seconds))

    def values(self, axis: int) -> list[float]:
        return sorted({p[axis] for p in self.points})

    def covers(self, point: Sequence[float]) -> bool:
        return all(self.values(i)[0] <= v <= self.values(i)[-1] for i, v in enumerate(point))

    def nearest(self, point: Sequence[float]) -> int:
        """Index of the measured point closest to ``point`` in log space."""
        def dist(p: tuple[float, ...]) -> float:
            return sum((math.log(max(a, 1e-9)) - math.log(max(b, 1e-9))) ** 2 for a, b in zip(p, point))
        return min(range(len(self.points)), key=lambda i: dist(self.points[i]))

    def extrapolate(self, x: float) -> float:
        """One axis: the line through the two measured points at that end of the range."""
        xs = self.values(0)
        by_x = {p[0]: s for p, s in zip(self.points, self.seconds)}
        a, b = (xs[0], xs[1]) if x < xs[0] else (xs[-2], xs[-1])
        return by_x[a] + (by_x[b] - by_x[a]) * (x - a) / (b - a)

    def interpolate(self, point: Sequence[float]) -> float:
        """Monotone interpolation inside the grid (the caller checks :meth:`covers`)."""
        if len(self.axes) == 1:
            xs = self.values(0)
            by_x = {p[0]: s for p, s in zip(self.points, self.seconds)}
            return pchip(xs, [by_x[x] for x in xs], point[0])
        if len(self.axes) != 2:
            raise ValueError(f"interpolation over {len(self.axes)} axes is not supported")
        grid = {p: s for p, s in zip(self.points, self.seconds)}
        a_vals, b_vals = self.values(0), self.values(1)
        rows = []
        for a in a_vals:  # along the second axis within each row, then across rows
            bs = [b for b in b_vals if (a, b) in grid]
            if len(bs) != len(b_vals):
                raise ValueError(f"profile grid of {self.axes} is not rectangular at {self.axes[0]}={a}")
            rows.append(pchip(bs, [grid[(a, b)] for b in bs], point[1]))
        return pchip(a_vals, rows, point[0])


def pchip(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Fritsch-Carlson monotone cubic through ``(xs, ys)`` at ``x`` (xs ascending; clamped to range)."""
    n = len(xs)
    if n == 0:
        raise ValueError("no points to interpolate")
    if n == 1 or x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    h = [xs[i + 1] - xs[i] for i in range(n - 1)]
    d = [(ys[i + 1] - ys[i]) / h[i] for i in range(n - 1)]
    m = [0.0] * n
    m[0], m[-1] = d[0], d[-1]
    for i in range(1, n - 1):
        if d[i - 1] * d[i] > 0:
            w1, w2 = 2 * h[i] + h[i - 1], h[i] + 2 * h[i - 1]
            m[i] = (w1 + w2) / (w1 / d[i - 1] + w2 / d[i])
    for i in range(n - 1):  # keep the end slopes from overshooting
        if d[i] == 0:
            m[i] = m[i + 1] = 0.0
    k = bisect.bisect_right(xs, x) - 1
    t = (x - xs[k]) / h[k]
    h00, h10 = (1 + 2 * t) * (1 - t) ** 2, t * (1 - t) ** 2
    h01, h11 = t * t * (3 - 2 * t), t * t * (t - 1)
    return h00 * ys[k] + h10 * h[k] * m[k] + h01 * ys[k + 1] + h11 * h[k] * m[k + 1]


@dataclass
class Profile:
    """A measured profile: header ``meta``, the device ``roofline`` and one :class:`OpTable` per operator.

    Attributes:
        meta: device name, library versions, date, threads, model, grid, load average, wall time.
        roofline: ``gemm_flops`` (FLOP/s of a large float32 GEMM) and ``stream_bw`` (B/s of a large copy).
        ops: operator name -> its measured table.
    """

    meta: dict[str, Any] = field(default_factory=dict)
    roofline: dict[str, float] = field(default_factory=dict)
    ops: dict[str, OpTable] = field(default_factory=dict)

    def table(self, op: str, axes: tuple[str, ...]) -> OpTable:
        t = self.ops.setdefault(op, OpTable(axes))
        if t.axes != axes:
            raise ValueError(f"operator {op!r} has axes {t.axes}, not {axes}")
        return t

    def roofline_time(self, flops: float, nbytes: float) -> float:
        return max(flops / self.roofline["gemm_flops"], nbytes / self.roofline["stream_bw"])

    def lookup(self, op: str, point: Sequence[float],
               work: Callable[[Sequence[float]], tuple[float, float]] | None = None) -> Cost:
        """Time of ``op`` at ``point``. Outside the measured grid, ``work(point)`` gives the shape's
        (FLOPs, bytes) for the scaled roofline. Operators without a roofline (host work) extend
        their last measured segment linearly along one axis (source ``linear``), or take the
        nearest measurement as is (``nearest``)."""
        t = self.ops.get(op)
        if t is None or not t.points:
            raise KeyError(f"the profile has no measurements of {op!r} (it has {', '.join(sorted(self.ops))})")
        if t.covers(point):
            return Cost(max(t.interpolate(point), 0.0), "profile", op)
        i = t.nearest(point)
        if work is None and len(t.axes) == 1 and len(t.points) >= 2:
            return Cost(max(t.extrapolate(point[0]), 0.0), "linear", op)
        if work is None:
            return Cost(t.seconds[i], "nearest", op)
        ratio = t.seconds[i] / max(self.roofline_time(*work(t.points[i])), 1e-12)
        return Cost(self.roofline_time(*work(point)) * ratio, "roofline", op)

    def ems_get_rate(self, concurrency: float = 1.0) -> tuple[float, str]:
        """Bytes per second one EMS client reads at the largest profiled block (and a label)."""
        t = self.ops.get("ems_get")
        if t is None:
            raise KeyError("the profile has no ems_get measurements (it was taken with --no-ems)")
        kib = t.values(0)[-1]
        seconds = self.lookup("ems_get", (kib, concurrency)).seconds
        rate = kib * 1024 / seconds
        return rate, (f"EMS get {rate / 1e9:.2f} GB/s per client, {kib:g} KiB blocks, "
                      f"{self.meta.get('device_name', '?')}, {self.meta.get('date', '?')}")

    # -- files ---------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "version": VERSION, "meta": self.meta, "roofline": self.roofline,
                "ops": {name: {"axes": list(t.axes), "points": [list(p) for p in t.points],
                               "seconds": t.seconds} for name, t in sorted(self.ops.items())}}

    @classmethod
    def from_json(cls, doc: dict[str, Any], source: str = "profile") -> Profile:
        if doc.get("schema") != SCHEMA:
            raise ValueError(f"{source}: not a MatrixInfer profile (schema {doc.get('schema')!r})")
        if doc.get("version") != VERSION:
            raise ValueError(f"{source}: profile version {doc.get('version')!r}; this build reads version {VERSION} "
                             "(rerun `matrixinfer profile`)")
        prof = cls(dict(doc.get("meta", {})), {k: float(v) for k, v in doc.get("roofline", {}).items()})
        for name, t in doc.get("ops", {}).items():
            table = prof.table(name, tuple(t["axes"]))
            if len(t["points"]) != len(t["seconds"]):
                raise ValueError(f"{source}: operator {name!r} has {len(t['points'])} points and "
                                 f"{len(t['seconds'])} times")
            for p, s in zip(t["points"], t["seconds"]):
                table.add(p, s)
        for key in ("gemm_flops", "stream_bw"):
            if prof.roofline.get(key, 0) <= 0:
                raise ValueError(f"{source}: roofline.{key} is missing or not positive")
        return prof

    def save(self, path: Path) -> tuple[Path, Path]:
        """Write ``path`` (JSON) and the same table as CSV beside it; returns both paths."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1))
        csv_path = path.with_suffix(".csv")
        with csv_path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["op", "axis1", "value1", "axis2", "value2", "seconds"])
            for name, t in sorted(self.ops.items()):
                for p, s in zip(t.points, t.seconds):
                    a2 = (t.axes[1], p[1]) if len(p) > 1 else ("", "")
                    w.writerow([name, t.axes[0], p[0], *a2, f"{s:.9g}"])
        return path, csv_path

    @classmethod
    def load(cls, path: Path | str) -> Profile:
        p = Path(path)
        try:
            doc = json.loads(p.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"profile {p} does not exist (write one with `matrixinfer profile --out {p}`)") \
                from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p}: not valid JSON ({exc})") from None
        return cls.from_json(doc, str(p))
