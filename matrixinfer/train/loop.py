"""The training loop: next-token loss plus DeepSeek-V3's MTP loss on our own runtime model, AdamW
with linear warmup and cosine decay, auxiliary-loss-free expert balancing after every step, and
resumable checkpoints.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from matrixinfer.config import ModelConfig
from matrixinfer.model.attention import AttentionMetadata
from matrixinfer.model.backend import select_backend
from matrixinfer.model.deepseek import DeepseekForCausalLM, MTPLayer
from matrixinfer.train.balance import ExpertLoad, update_bias
from matrixinfer.train.data import batches
from matrixinfer.train.recipe import TrainConfig


def log_line(message: str) -> None:
    """Print a line above the progress bar (stderr, unbuffered, so logs to files stay in order)."""
    tqdm.write(message, file=sys.stderr)


# Output projections get a smaller init so the residual stream does not grow with depth.
_RESIDUAL_OUT = ("o_proj.weight", "down_proj.weight", "experts.down_proj")


def build_model(cfg: ModelConfig, seed: int, std: float = 0.02) -> DeepseekForCausalLM:
    """A freshly initialised model; the MTP module shares the main embedding and output head
    (as in DeepSeek-V3), so those weights get gradients from both losses."""
    torch.manual_seed(seed)
    model = DeepseekForCausalLM(cfg, with_mtp=True)
    scaled = std / math.sqrt(2 * (cfg.num_hidden_layers + cfg.num_nextn_predict_layers))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # every 1-D parameter is an RMSNorm gain
                p.fill_(1.0)
            else:
                p.normal_(0.0, scaled if name.endswith(_RESIDUAL_OUT) else std)
    for m in model.mtp:
        assert isinstance(m, MTPLayer)  # a ModuleList's items are typed as Module
        m.embed_tokens.weight = model.model.embed_tokens.weight
        m.shared_head.head.weight = model.lm_head.weight
    return model


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warmup to ``lr`` then cosine decay to ``min_lr`` at ``steps``."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps))
    return tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: DeepseekForCausalLM, tc: TrainConfig, fused: bool = False) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices except embeddings and routers."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        skip = p.dim() < 2 or "embed_tokens" in name or name.endswith("mlp.gate.weight")
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused or None)


def losses(model: DeepseekForCausalLM, batch: torch.Tensor, meta: AttentionMetadata,
           positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of the main model (token i+1) and of the MTP module (token i+2)."""
    seq = batch.shape[1] - 2
    hidden = model(batch[:, :seq].reshape(-1), positions, meta)
    main = F.cross_entropy(model.compute_logits(hidden), batch[:, 1:seq + 1].reshape(-1))
    mtp_hidden = model.mtp_forward(batch[:, 1:seq + 1].reshape(-1), positions, hidden, meta)
    mtp = F.cross_entropy(model.mtp_logits(mtp_hidden), batch[:, 2:].reshape(-1))
    return main, mtp


def train(model: DeepseekForCausalLM, stream: torch.Tensor, tc: TrainConfig, work_dir: Path,
          device: torch.device, log: Callable[[str], None] = log_line,
          stop_at: int | None = None) -> DeepseekForCausalLM:
    """Train ``model`` on ``stream`` for ``tc.steps`` steps, resuming from ``work_dir/last.pt``.

    ``stop_at`` ends this call after that many steps (with a checkpoint), to continue later.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = work_dir / "last.pt"
    model.to(device).train()
    select_backend(model, "auto")  # grouped-matmul experts on CUDA; the C kernels step aside under autograd
    opt = make_optimizer(model, tc, fused=device.type == "cuda")
    start = 0
    state = torch.load(ckpt_path, map_location=device, weights_only=True) if ckpt_path.exists() else None
    if state is not None and state.get("recipe") != tc.to_dict():
        log(f"{ckpt_path} was written by a different recipe; starting from scratch")
        state = None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
        log(f"resuming from {ckpt_path} at step {start}")
    load = ExpertLoad(model)
    meta = AttentionMetadata.build([tc.seq_len] * tc.batch_size, device=device)
    positions = torch.arange(tc.seq_len, device=device).repeat(tc.batch_size)
    data = batches(stream, tc.seq_len, tc.batch_size, tc.seed, start_step=start)
    end = tc.steps if stop_at is None else min(stop_at, tc.steps)
    bar = tqdm(range(start, end), initial=start, total=tc.steps, desc="train-demo", unit="step")
    t0 = time.time()
    for step in bar:
        batch = next(data).to(device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc)
        load.reset()
        main, mtp = losses(model, batch, meta, positions)
        loss = main + tc.mtp_weight * mtp
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        update_bias(load.gates, load.counts, tc.bias_update_speed)
        if step % 10 == 0 or step == tc.steps - 1:
            bar.set_postfix(loss=f"{main.item():.3f}", mtp=f"{mtp.item():.3f}", gnorm=f"{gnorm.item():.2f}",
                            maxload=f"{max(load.max_over_mean()):.2f}")
        if step % 100 == 0 or step == tc.steps - 1:
            tok_s = (step + 1 - start) * tc.batch_size * tc.seq_len / max(time.time() - t0, 1e-9)
            log(f"step {step} loss {main.item():.4f} mtp {mtp.item():.4f} lr {lr_at(step, tc):.2e} "
                f"max/mean load {max(load.max_over_mean()):.2f} {tok_s:.0f} tok/s")
        if (step + 1) % tc.checkpoint_every == 0 or step + 1 == end:
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step + 1,
                        "recipe": tc.to_dict()}, tmp)
            tmp.replace(ckpt_path)
    load.close()
    return model.eval()
