"""The scheduling policy: which sequences run this step and how many tokens each (pure, no I/O).

Continuous batching with chunked prefill: running sequences go first, oldest first, each asking
for its remaining tokens (1 when decoding, plus its draft tokens when speculating); waiting
sequences are admitted in arrival order while the token budget, the sequence cap and free KV
blocks allow. When a running sequence needs a block and none is free, the newest running sequence
is preempted (its blocks freed, recomputed later).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SeqView:
    """What the policy knows about one sequence.

    Attributes:
        seq_id: the request id.
        num_tokens: tokens that must be in the KV cache before the next token is sampled.
        num_computed: tokens already in the cache (for a waiting sequence: its prefix-cache hit).
        num_blocks: blocks it holds (waiting: the cached prefix blocks it would take).
        freeable: blocks that preempting it would return to the free pool.
        revive: waiting only: cached prefix blocks that are currently free (taking them uses free blocks).
        lookahead: running only: draft tokens it would verify this step beyond ``num_tokens``
            (speculative decoding); the policy may grant fewer when the token budget runs out.
    """

    seq_id: str
    num_tokens: int
    num_computed: int
    num_blocks: int
    freeable: int = 0
    revive: int = 0
    lookahead: int = 0


@dataclass(frozen=True)
class Budget:
    """Per-step limits: tokens computed, sequences running, and the block size."""

    max_tokens: int
    max_seqs: int
    block_size: int


@dataclass
class StepPlan:
    """The policy's decision: ``chunks`` maps seq id to new tokens; ``admitted`` and ``preempted``
    list ids that move from waiting to running and from running back to waiting."""

    chunks: dict[str, int] = field(default_factory=dict)
    admitted: list[str] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)


def _blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def schedule(running: list[SeqView], waiting: list[SeqView], free_blocks: int, budget: Budget) -> StepPlan:
    """Decide one engine step. ``running`` and ``waiting`` are in arrival order (oldest first)."""
    plan = StepPlan()
    tokens_left = budget.max_tokens
    active = list(running)
    i = 0
    while i < len(active) and tokens_left > 0:
        seq = active[i]
        n = min(seq.num_tokens - seq.num_computed + seq.lookahead, tokens_left)
        if n <= 0:
            i += 1
            continue
        need = _blocks_for(seq.num_computed + n, budget.block_size) - seq.num_blocks
        while need > free_blocks and len(active) - 1 > i:
            victim = active.pop()  # newest running sequence
            plan.preempted.append(victim.seq_id)
            free_blocks += victim.freeable
        if need > free_blocks:
            # Even alone it does not fit: it waits (preempted) until blocks free up.
            active.pop(i)
            plan.preempted.append(seq.seq_id)
            free_blocks += seq.freeable
            continue
        free_blocks -= max(need, 0)
        plan.chunks[seq.seq_id] = n
        tokens_left -= n
        i += 1
    if plan.preempted:
        return plan  # memory is short: admit nothing new this step
    num_running = len(active)
    for seq in waiting:
        if tokens_left <= 0 or num_running >= budget.max_seqs:
            break
        n = min(seq.num_tokens - seq.num_computed, tokens_left)
        need = _blocks_for(seq.num_computed + n, budget.block_size) - seq.num_blocks + seq.revive
        if need > free_blocks:
            break  # first come, first served: later requests do not overtake it
        free_blocks -= need
        plan.admitted.append(seq.seq_id)
        plan.chunks[seq.seq_id] = n
        tokens_left -= n
        num_running += 1
    return plan
