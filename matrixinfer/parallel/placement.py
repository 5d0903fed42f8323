"""The expert-placement table: which EP rank holds each routed expert (pure, no I/O).

The simulator speaks of the same table (``experts_per_rank``, redundant experts); here a
placement is one copy of every logical expert (no replicas yet). The default is contiguous
blocks: rank r holds experts ``[r*E/N, (r+1)*E/N)``; with N >= E ranks every expert has a rank
of its own and ranks ``E..N-1`` hold none (they still run attention and the shared experts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where tensors are made: the placement policy (and the
    import torch  # simulator, which uses it) stays torch-free


@dataclass(frozen=True)
class ExpertPlacement:
    """``rank_of[e]``: the EP rank holding routed expert ``e``; ``local_index[e]``: its row in that
    rank's stacked expert weights. ``experts_of(r)`` lists rank r's experts in row order."""

    n_experts: int
    ep_size: int
    rank_of: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.n_experts < 1 or self.ep_size < 1:
            raise ValueError(f"placement needs at least one expert and one rank, got {self.n_experts} "
                             f"experts over {self.ep_size} ranks")
        if len(self.rank_of) != self.n_experts:
            raise ValueError(f"placement table has {len(self.rank_of)} entries for {self.n_experts} experts")
        bad = [(e, r) for e, r in enumerate(self.rank_of) if not 0 <= r < self.ep_size]
        if bad:
            raise ValueError(f"placement table puts expert {bad[0][0]} on rank {bad[0][1]}; ranks are "
                             f"0..{self.ep_size - 1}")

    @classmethod
    def contiguous(cls, n_experts: int, ep_size: int) -> ExpertPlacement:
        """Contiguous blocks, as even as possible (the first ``E % N`` ranks hold one more)."""
        if ep_size >= n_experts:
            return cls(n_experts, ep_size, tuple(range(n_experts)))
        base, extra = divmod(n_experts, ep_size)
        table: list[int] = []
        for r in range(ep_size):
            table += [r] * (base + (r < extra))
        return cls(n_experts, ep_size, tuple(table))

    @classmethod
    def from_table(cls, table: list[list[int]], n_experts: int) -> ExpertPlacement:
        """From ``table[r]`` = the experts rank r holds; every expert exactly once."""
        rank_of = [-1] * n_experts
        for r, experts in enumerate(table):
            for e in experts:
                if not 0 <= e < n_experts:
                    raise ValueError(f"placement table: rank {r} lists expert {e}; experts are 0..{n_experts - 1}")
                if rank_of[e] != -1:
                    raise ValueError(f"placement table: expert {e} is on ranks {rank_of[e]} and {r}")
                rank_of[e] = r
        missing = [e for e, r in enumerate(rank_of) if r == -1]
        if missing:
            raise ValueError(f"placement table: expert(s) {missing} are on no rank")
        return cls(n_experts, len(table), tuple(rank_of))

    def experts_of(self, rank: int) -> list[int]:
        return [e for e, r in enumerate(self.rank_of) if r == rank]

    @property
    def experts_per_rank(self) -> int:
        """The most experts one rank holds (the simulator's ``experts_per_rank``)."""
        return max(len(self.experts_of(r)) for r in range(self.ep_size))

    def local_index(self) -> tuple[int, ...]:
        """``local_index[e]``: expert e's row among its rank's experts."""
        seen = [0] * self.ep_size
        out = []
        for r in self.rank_of:
            out.append(seen[r])
            seen[r] += 1
        return tuple(out)

    def tensors(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """``(rank_of, local_index)`` as int64 tensors for indexing by expert id."""
        import torch

        return (torch.tensor(self.rank_of, dtype=torch.long, device=device),
                torch.tensor(self.local_index(), dtype=torch.long, device=device))

    def as_table(self) -> list[list[int]]:
        """``[experts of rank 0, experts of rank 1, ...]`` (what :meth:`from_table` reads and the load
        snapshot records)."""
        return [self.experts_of(r) for r in range(self.ep_size)]


def rank_loads(placement: ExpertPlacement, expert_tokens: list[int]) -> list[int]:
    """Tokens each rank's experts received, from one layer's per-expert counts."""
    loads = [0] * placement.ep_size
    for e, n in enumerate(expert_tokens):
        loads[placement.rank_of[e]] += n
    return loads


def load_imbalance(placement: ExpertPlacement, expert_tokens: list[list[int]]) -> float:
    """The busiest rank's expert load over the mean, averaged over MoE layers (1.0 = balanced):
    the simulator's ``DecodeConfig.imbalance``, measured. Ranks holding no expert are left out;
    1.0 where nothing was routed yet."""
    holders = [r for r in range(placement.ep_size) if placement.experts_of(r)]
    ratios = []
    for layer in expert_tokens:
        loads = [rank_loads(placement, layer)[r] for r in holders]
        if sum(loads):
            ratios.append(max(loads) / (sum(loads) / len(loads)))
    return sum(ratios) / len(ratios) if ratios else 1.0
