"""Topology-aware allocation of instances onto a supernode's nodes (MatrixResource's role).

Pure functions over plain data. The unit of allocation is a chip (an Ascend 910C package = one
die pair; a die pair is never split between instances). An instance marked ``contiguous`` gets
a run of adjacent healthy nodes, whole nodes first (the design keeps an instance's ranks on
neighbouring nodes so its traffic stays on few L1 switches; on NVIDIA clusters it is what keeps
an 8-GPU instance inside one NVLink domain). Failed nodes are skipped; :func:`replan` moves
only the instances that lost chips.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InstanceRequest:
    """An instance to place: a name, its size in chips, and whether it needs adjacent nodes."""

    name: str
    chips: int
    contiguous: bool = True


@dataclass(frozen=True)
class Allocation:
    """Where each instance landed: name -> list of (node, chip-slot); plus what did not fit."""

    placements: dict[str, list[tuple[int, int]]]
    unplaced: list[str]

    def nodes_of(self, name: str) -> list[int]:
        return sorted({n for n, _ in self.placements.get(name, [])})


def _free_map(nodes: int, chips_per_node: int, failed: frozenset[int],
              taken: dict[int, set[int]]) -> dict[int, list[int]]:
    return {n: [c for c in range(chips_per_node) if c not in taken.get(n, set())]
            for n in range(nodes) if n not in failed}


def allocate(requests: list[InstanceRequest], nodes: int, chips_per_node: int,
             failed: frozenset[int] = frozenset(),
             existing: dict[str, list[tuple[int, int]]] | None = None) -> Allocation:
    """Place ``requests`` (largest first) on healthy nodes, around ``existing`` placements."""
    for r in requests:
        if r.chips <= 0:
            raise ValueError(f"allocate: instance {r.name!r} asks for {r.chips} chips")
    placements: dict[str, list[tuple[int, int]]] = {k: list(v) for k, v in (existing or {}).items()}
    taken: dict[int, set[int]] = {}
    for held in placements.values():
        for n, c in held:
            taken.setdefault(n, set()).add(c)
    unplaced: list[str] = []
    for req in sorted(requests, key=lambda r: (-r.chips, r.name)):
        free = _free_map(nodes, chips_per_node, failed, taken)
        slots = _contiguous(free, req.chips, chips_per_node) if req.contiguous else \
            _scattered(free, req.chips)
        if slots is None:
            unplaced.append(req.name)
            continue
        placements[req.name] = slots
        for n, c in slots:
            taken.setdefault(n, set()).add(c)
    return Allocation(placements, unplaced)


def _contiguous(free: dict[int, list[int]], chips: int, per_node: int) -> list[tuple[int, int]] | None:
    """Smallest window of adjacent healthy nodes that holds ``chips``, preferring partly used
    nodes for small instances (best fit) so whole nodes stay free for big ones."""
    if chips <= per_node:
        fits = [(len(c), n) for n, c in free.items() if len(c) >= chips]
        if not fits:
            return None
        _, node = min(fits)
        return [(node, c) for c in free[node][:chips]]
    ordered = sorted(free)
    best: list[tuple[int, int]] | None = None
    for start in range(len(ordered)):
        got: list[tuple[int, int]] = []
        prev = None
        for n in ordered[start:]:
            if prev is not None and n != prev + 1:
                break
            got += [(n, c) for c in free[n]]
            prev = n
            if len(got) >= chips:
                window = got[:chips]
                span = window[-1][0] - window[0][0]
                if best is None or span < best[-1][0] - best[0][0]:
                    best = window
                break
    return best


def _scattered(free: dict[int, list[int]], chips: int) -> list[tuple[int, int]] | None:
    slots = [(n, c) for n in sorted(free) for c in free[n]]
    return slots[:chips] if len(slots) >= chips else None


def replan(alloc: Allocation, requests: list[InstanceRequest], nodes: int, chips_per_node: int,
           failed: frozenset[int]) -> Allocation:
    """Re-place every instance that has a chip on a failed node; the others stay where they are."""
    hit = {name for name, slots in alloc.placements.items() if any(n in failed for n, _ in slots)}
    keep = {k: v for k, v in alloc.placements.items() if k not in hit}
    todo = [r for r in requests if r.name in hit or r.name in alloc.unplaced]
    return allocate(todo, nodes, chips_per_node, failed, existing=keep)
