"""Token sampling for a batch of rows with per-row parameters (greedy, temperature, top-k, top-p, seed)."""

from __future__ import annotations

import torch

from matrixinfer import kernels
from matrixinfer.engine.sampling_params import SamplingParams


class Sampler:
    """Samples one token per logits row; seeded rows use their own generator so that a request's
    sample does not depend on what else is in the batch."""

    def __init__(self) -> None:
        self._generators: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def export_state(self, request_id: str) -> bytes:
        """A seeded request's generator state (empty if unseeded), to continue it elsewhere."""
        gen = self._generators.get(request_id)
        return bytes(gen.get_state().numpy().tobytes()) if gen is not None else b""

    def import_state(self, request_id: str, state: bytes, device: torch.device) -> None:
        if state:
            gen = torch.Generator(device=device)
            gen.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
            self._generators[request_id] = gen

    def _generator(self, request_id: str, params: SamplingParams, device: torch.device) -> torch.Generator | None:
        if params.seed is None:
            return None
        gen = self._generators.get(request_id)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(params.seed)
            self._generators[request_id] = gen
        return gen

    def __call__(self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams],
                 ) -> tuple[list[int], list[float] | None]:
        """Pick a token per row; also return each chosen token's log-probability when any row asks."""
        logits = logits.float()
        if logits.dim() == 2 and logits.shape[1] and logits.is_cpu and logits.is_contiguous() and kernels.available():
            tokens = kernels.argmax_rows(logits)
        else:
            tokens = logits.argmax(dim=-1)
        sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
        if sampled_rows:
            idx = torch.tensor(sampled_rows, device=logits.device)
            rows = logits[idx]
            temps = torch.tensor([params[i].temperature for i in sampled_rows], device=logits.device)
            rows = rows / temps[:, None]
            rows = _top_k_top_p(rows, [params[i].top_k for i in sampled_rows], [params[i].top_p for i in sampled_rows])
            probs = rows.softmax(dim=-1)
            for j, i in enumerate(sampled_rows):
                gen = self._generator(request_ids[i], params[i], logits.device)
                tokens[i] = torch.multinomial(probs[j], 1, generator=gen)[0]
        chosen = tokens.tolist()  # the one host synchronisation per step
        logprobs = None
        if any(p.logprobs for p in params):
            lp = logits.log_softmax(dim=-1).gather(1, tokens[:, None])[:, 0]
            logprobs = lp.tolist()
        return chosen, logprobs


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Mask logits outside each row's top-k and top-p nucleus to -inf."""
    if all(k <= 0 for k in top_k) and all(p >= 1.0 for p in top_p):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ks = torch.tensor([k if k > 0 else vocab for k in top_k], device=logits.device)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    drop = ranks >= ks[:, None]
    ps = torch.tensor(top_p, device=logits.device)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # keep a token while the mass *before* it is below p (the top token is always kept)
    drop |= (cum - sorted_logits.softmax(dim=-1)) >= ps[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
