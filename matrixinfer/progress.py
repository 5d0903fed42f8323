"""Progress bars that survive a pipe: a child process of the launcher reports its progress as lines a
parent turns back into one bar per child.

A tqdm bar redraws itself with carriage returns; piped through the launcher (which reads its
children's output line by line and prefixes each line with the child's name) every redraw became a
line of its own, and two workers loading at once interleaved dozens of them. A process started with
``MATRIXINFER_PROGRESS_LINES=1`` in its environment instead writes ``@@progress {json}`` lines (at
most every 0.2 s, and at the end); :class:`ChildBars` in the parent draws one tqdm bar per child from
them. Without the variable, :func:`progress` is tqdm itself.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm import tqdm

from matrixinfer import envs

T = TypeVar("T")

ENV = "MATRIXINFER_PROGRESS_LINES"
MARK = "@@progress "
INTERVAL_S = 0.2


def progress(items: Iterable[T], desc: str, unit: str = "it", total: int | None = None,
             disable: bool = False) -> Iterable[T]:
    """``items`` with a progress bar: tqdm on a terminal or a log, progress lines for a parent
    process when ``MATRIXINFER_PROGRESS_LINES`` is set."""
    if disable:
        return items
    if envs.progress_lines():
        return _lines(items, desc, unit, total if total is not None else _len(items))
    return tqdm(items, desc=desc, unit=unit, total=total)


def _len(items: Iterable[Any]) -> int | None:
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None


def _lines(items: Iterable[T], desc: str, unit: str, total: int | None) -> Iterator[T]:
    def report(n: int) -> None:
        sys.stdout.write(MARK + json.dumps({"desc": desc, "n": n, "total": total, "unit": unit}) + "\n")
        sys.stdout.flush()

    n, last = 0, 0.0
    report(0)
    for item in items:
        yield item
        n += 1
        now = time.monotonic()
        if now - last >= INTERVAL_S:
            report(n)
            last = now
    report(n)


class ChildBars:
    """One tqdm bar per child, drawn from the children's progress lines (thread-safe: each child's
    output is read on a thread of its own).

    On a terminal the bars are live, one line each. Into a log (stderr not a terminal) each bar is
    written once, finished: tqdm's stacked bars move the cursor up to redraw, which a log cannot
    show, and two children loading at once would split each other's bars into several lines."""

    def __init__(self, live: bool | None = None) -> None:
        self._lock = threading.Lock()
        self._bars: dict[str, tqdm] = {}
        self._started: dict[str, float] = {}
        self._finished: set[str] = set()  # bars drawn to the end (a child repeats its last report)
        self._slots = 0
        self._live = live

    @property
    def live(self) -> bool:
        if self._live is None:
            isatty = getattr(sys.stderr, "isatty", None)
            self._live = bool(isatty and isatty())
        return self._live

    def feed(self, child: str, line: str) -> bool:
        """Draw ``line`` if it is a progress line (True); leave any other line to the caller (False)."""
        if not line.startswith(MARK):
            return False
        try:
            msg = json.loads(line[len(MARK):])
            n, total, desc, unit = int(msg["n"]), msg.get("total"), str(msg["desc"]), str(msg.get("unit", "it"))
        except (ValueError, KeyError, TypeError):
            return False  # not ours after all: print it as it is
        key = f"{child}:{desc}"
        done = total is not None and n >= total
        with self._lock:
            if done and key in self._finished and key not in self._started and key not in self._bars:
                return True  # the same end reported again
            if done:
                self._finished.add(key)
            else:
                self._finished.discard(key)  # a new load under the same name
            if not self.live:
                start = self._started.setdefault(key, time.monotonic())
                if done:
                    del self._started[key]
                    meter = tqdm.format_meter(n, total, time.monotonic() - start, prefix=f"[{child}] {desc}", unit=unit)
                    tqdm.write(meter, file=sys.stderr)
                return True
            bar = self._bars.get(key)
            if bar is None:
                bar = tqdm(total=total, desc=f"[{child}] {desc}", unit=unit, position=self._slots, leave=True)
                self._bars[key] = bar
                self._slots += 1
            bar.update(n - bar.n)
            if done:
                bar.close()
                del self._bars[key]
                if not self._bars:
                    self._slots = 0
        return True
