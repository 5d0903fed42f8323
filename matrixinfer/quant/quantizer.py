"""The offline INT8 pass: a float model and calibration windows in, the same model with INT8
modules out (served as is, or written by :mod:`matrixinfer.quant.checkpoint`).

The five steps of the reference design (docs/reference-design.md §7), each switchable (:class:`QuantRecipe`):

1. mixed precision: the heads stay in high precision, and so does every linear whose INT8 form
   alone raises the calibration NLL by more than the threshold (the sensitivity table);
2. smoothing: per smoothing group (the linears reading one input), the SmoothQuant strength with
   the smallest output error on the group's calibration activations;
3. structural transformation: each smoothing vector is absorbed where the input is produced (the
   RMSNorm before it, ``up_proj``'s rows before ``down_proj``, ``kv_b_proj``'s value rows before
   ``o_proj``; the router's weight takes the inverse, so routing is unchanged), and optionally a
   block Hadamard rotation of the dense ``down_proj`` inputs;
4. INT8 GEMMs with per-token activation and per-channel weight scales (the runtime modules);
5. per block, the weight clipping ratio with the smallest block output error, then per-channel
   error-compensation biases (kept where they lower the block's error).

Blocks are calibrated in order, each on the output of the already quantized blocks before it, so
later blocks see (and compensate) the error that reaches them in serving.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from matrixinfer.model.attention import AttentionMetadata
from matrixinfer.model.backend import select_backend
from matrixinfer.model.deepseek import Block, DeepseekForCausalLM, MTPLayer
from matrixinfer.model.experts import Experts, Int8Experts, Routing
from matrixinfer.model.layers import MLP, Int8Linear, Linear, RotaryEmbedding
from matrixinfer.model.moe import MoE
from matrixinfer.quant import policy
from matrixinfer.quant.int8 import quantize_weight, rotate, rotation_block, w8a8_linear
from matrixinfer.quant.policy import QuantRecipe, flag_sensitive, high_precision_by_default, may_be_int8
from matrixinfer.quant.search import search_clip, search_smoothing

SEARCH_WINDOWS = 16  # windows the clip and compensation searches run on (all windows propagate)
SMOOTH_ROWS = 2048  # activation rows per consumer in the smoothing search
SENSITIVITY_WINDOWS = 8


@dataclass
class BlockReport:
    """What the quantizer chose for one block and the block's remaining output error (relative to
    the block's update ``Y - X``)."""

    name: str
    smoothing: dict[str, str] = field(default_factory=dict)
    clip: float = 1.0
    clip_errors: dict[str, float] = field(default_factory=dict)
    bias_correction: bool = False
    error: float = 0.0


@dataclass
class QuantReport:
    """The run's decisions: the sensitivity table, the modules left in high precision, per-block
    choices and the rotated modules."""

    recipe: QuantRecipe
    int8: list[str]
    high_precision: dict[str, str]  # module -> why
    sensitivity: dict[str, float]
    blocks: list[BlockReport]
    rotated: dict[str, int]

    def details(self) -> dict[str, Any]:
        """JSON-able record (stored in the checkpoint's ``quantization_config.matrixinfer``)."""
        return {"steps": self.recipe.steps(), "sensitivity_threshold": self.recipe.sensitivity_threshold,
                "high_precision": self.high_precision,
                "sensitivity": {k: round(v, 6) for k, v in self.sensitivity.items()},
                "blocks": [asdict(b) for b in self.blocks]}

    def table(self) -> str:
        """The mixed-precision table: every candidate module, its solo INT8 cost and the decision."""
        rows = [f"{'module':<44} {'solo INT8 dNLL':>15}  precision"]
        for name in sorted(set(self.int8) | set(self.high_precision)):
            d = self.sensitivity.get(name)
            cost = f"{100 * d:+.3f}%" if d is not None else "-"
            why = self.high_precision.get(name)
            rows.append(f"{name:<44} {cost:>15}  {'INT8' if why is None else 'high (' + why + ')'}")
        return "\n".join(rows)


def candidates(model: DeepseekForCausalLM) -> dict[str, nn.Module]:
    """Every module the runtime can run in INT8: linears (not kv_b_proj) and routed experts."""
    return {name: m for name, m in model.named_modules()
            if (isinstance(m, Linear) and may_be_int8(name)) or type(m) is Experts}


def int8_linear(lin: Linear, clip: float = 1.0, rotate_block: int = 0) -> Int8Linear:
    """The INT8 form of a float linear (weights rotated first when ``rotate_block``)."""
    w = lin.weight.detach().float()
    q, scale = quantize_weight(rotate(w, rotate_block) if rotate_block else w, clip)
    m = Int8Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, rotate_block=rotate_block)
    m.weight.copy_(q)
    m.weight_scale.copy_(scale)
    if lin.bias is not None and m.bias is not None:
        m.bias.copy_(lin.bias.detach().float())
    return m.to(w.device)


def int8_experts(ex: Experts, clip: float = 1.0) -> Int8Experts:
    """The INT8 form of float routed experts."""
    gu, down = ex.gate_up_proj.detach(), ex.down_proj.detach()
    m = Int8Experts(ex.n_experts, gu.shape[2], ex.inter).to(gu.device)
    for w, q_name, s_name in ((gu, "gate_up_proj", "gate_up_proj_scale"), (down, "down_proj", "down_proj_scale")):
        q, s = quantize_weight(w, clip)
        getattr(m, q_name).copy_(q)
        getattr(m, s_name).copy_(s)
    return m


def _swap(root: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at ``name`` under ``root``; returns what was there."""
    parent, _, attr = name.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    old = getattr(owner, attr)
    setattr(owner, attr, module)
    return cast(nn.Module, old)


@contextmanager
def _swapped(root: nn.Module, modules: dict[str, nn.Module]) -> Iterator[None]:
    old = {n: _swap(root, n, m) for n, m in modules.items()}
    try:
        yield
    finally:
        for n, m in old.items():
            _swap(root, n, m)


def _int8_form(m: nn.Module, clip: float = 1.0, rotate_block: int = 0) -> nn.Module:
    return int8_experts(m, clip) if isinstance(m, Experts) else int8_linear(cast(Linear, m), clip, rotate_block)


class _Batch:
    """``n`` windows of ``length`` tokens as one flat batch: what a block needs besides its input."""

    def __init__(self, rope: RotaryEmbedding, n: int, length: int) -> None:
        self.n, self.length, self.rope = n, length, rope
        self.meta = AttentionMetadata.build([length] * n)
        self.cos, self.sin = rope.cos_sin(torch.arange(length).repeat(n))

    def first(self, n: int) -> _Batch:
        """The batch of the first ``n`` windows."""
        return _Batch(self.rope, min(n, self.n), self.length)

    def rows(self, n: int) -> slice:
        """The token rows of the first ``n`` windows."""
        return slice(0, min(n, self.n) * self.length)

    def run(self, block: Block, x: torch.Tensor) -> torch.Tensor:
        return block(x, self.cos, self.sin, self.rope, self.meta, None)


class Quantizer:
    """One offline pass over ``model`` (float, eval mode) with calibration ``windows`` ``[N, L + 1]``.
    :meth:`run` turns the model's chosen modules into INT8 in place and returns the report."""

    def __init__(self, model: DeepseekForCausalLM, windows: torch.Tensor, recipe: QuantRecipe | None = None,
                 progress: bool = True) -> None:
        self.model, self.windows = model, windows.long()
        self.recipe = recipe or QuantRecipe()
        self.progress = progress
        self.rotated: dict[str, int] = {}

    @torch.no_grad()
    def run(self) -> QuantReport:
        model, recipe = self.model, self.recipe
        model.eval()
        select_backend(model, "native")  # PyTorch everywhere while calibrating (hooks see every module)
        units = candidates(model)
        high, sensitivity = self._mixed_precision(units)
        int8 = [n for n in units if n not in high]
        blocks = [(f"model.layers.{i}", cast(Block, b)) for i, b in enumerate(model.model.layers)]
        blocks += [(f"mtp.{k}.block", cast(MTPLayer, m).block) for k, m in enumerate(model.mtp)]
        batch = _Batch(model.rope, self.windows.shape[0], self.windows.shape[1] - 1)
        x = model.model.embed_tokens(self.windows[:, :-1].reshape(-1)).float()
        reports = []
        for name, block in tqdm(blocks, desc="quantizing blocks", unit="block", disable=not self.progress):
            if name.startswith("mtp."):
                x = self._mtp_input(int(name.split(".")[1]), x)
            todo = {n[len(name) + 1:]: units[n] for n in int8 if n.startswith(name + ".")}
            report, x = self._block(name, block, x, todo, batch)
            reports.append(report)
        for name in int8:  # outside the blocks: the heads and MTP's input projection (when not kept)
            if not any(name.startswith(b + ".") for b, _ in blocks):
                _swap(model, name, _int8_form(units[name]))
        select_backend(model, "native")
        return QuantReport(recipe, int8, high, sensitivity, reports, dict(self.rotated))

    # -- step 1 ------------------------------------------------------------------------------------

    def _mixed_precision(self, units: dict[str, nn.Module]) -> tuple[dict[str, str], dict[str, float]]:
        model, recipe = self.model, self.recipe
        high: dict[str, str] = {}
        if model.config.tie_word_embeddings and "lm_head" in units:
            high["lm_head"] = "tied to the embedding"
        if not recipe.mixed_precision:
            return high, {}
        for name in units:
            if high_precision_by_default(name):
                high.setdefault(name, "policy")
        probe = _SensitivityProbe(model, self.windows[:SENSITIVITY_WINDOWS])
        deltas = {name: probe.delta(name, _int8_form(m))
                  for name, m in tqdm(units.items(), desc="sensitivity", unit="module", disable=not self.progress)}
        for name in flag_sensitive(deltas, recipe.sensitivity_threshold):
            high.setdefault(name, "sensitive")
        return high, deltas

    # -- steps 2 to 5, one block -------------------------------------------------------------------

    def _block(self, name: str, block: Block, x: torch.Tensor, todo: dict[str, nn.Module],
               batch: _Batch) -> tuple[BlockReport, torch.Tensor]:
        report = BlockReport(name)
        search = batch.first(SEARCH_WINDOWS)
        xs = x[batch.rows(SEARCH_WINDOWS)]
        rot = self._rotations(name, block, set(todo))
        y_ref = search.run(block, xs)
        update = max(float(((y_ref - xs) ** 2).sum()), 1e-30)

        def error(clip: float) -> float:
            with _swapped(block, {p: _int8_form(m, clip, rot.get(p, 0)) for p, m in todo.items()}):
                return float(((search.run(block, xs) - y_ref) ** 2).sum()) / update

        if self.recipe.smooth and todo:
            # Each group's strength minimises that group's output error; the block keeps the result
            # only if the block's output error (what the next block sees) is lower too.
            before = {k: v.clone() for k, v in block.state_dict().items()}
            unsmoothed = error(1.0)
            report.smoothing = _smooth(block, _capture(block, batch, x), set(todo), self.recipe)
            if error(1.0) > unsmoothed:
                block.load_state_dict(before)
                report.smoothing = {"block": "reverted: the block error was lower without smoothing"}
        if self.recipe.clip and todo:
            report.clip, report.clip_errors = search_clip(error)
        final = {p: _int8_form(m, report.clip, rot.get(p, 0)) for p, m in todo.items()}
        floats = {p: _swap(block, p, q) for p, q in final.items()}
        report.error = float(((search.run(block, xs) - y_ref) ** 2).sum()) / update
        if self.recipe.bias_correction and final:
            report.bias_correction = self._compensation_generalises(block, search, xs, y_ref, floats, final)
            if report.bias_correction:  # fitted again on every search window
                _drop_compensation(final, floats)
                _compensate(block, search, xs, floats, final, self.recipe.min_expert_tokens)
                report.error = float(((search.run(block, xs) - y_ref) ** 2).sum()) / update
        self.rotated.update({f"{name}.{p}": b for p, b in rot.items()})
        return report, batch.run(block, x)

    def _compensation_generalises(self, block: Block, search: _Batch, xs: torch.Tensor, y_ref: torch.Tensor,
                                  floats: dict[str, nn.Module], final: dict[str, nn.Module]) -> bool:
        """Fit the compensation biases on the first half of the search windows and keep them only
        if they lower the block error on the other half (a mean over few tokens can add noise)."""
        half = search.n // 2
        if half == 0:
            return False
        fit, rows = search.first(half), search.rows(half)
        held = _Batch(search.rope, search.n - half, search.length)
        x_held, y_held = xs[rows.stop:], y_ref[rows.stop:]
        before = float(((held.run(block, x_held) - y_held) ** 2).sum())
        _compensate(block, fit, xs[rows], floats, final, self.recipe.min_expert_tokens)
        after = float(((held.run(block, x_held) - y_held) ** 2).sum())
        _drop_compensation(final, floats)
        return after < before

    def _rotations(self, name: str, block: Block, int8: set[str]) -> dict[str, int]:
        """Step 3's rotation option: the Hadamard block of each INT8 linear of :data:`ROTATED_INPUTS`."""
        if not self.recipe.rotate:
            return {}
        out: dict[str, int] = {}
        for p in policy.ROTATED_INPUTS:
            if p in int8:
                b = rotation_block(cast(Linear, block.get_submodule(p)).in_features)
                if b > 1:
                    out[p] = b
        return out

    def _mtp_input(self, k: int, x_main_out: torch.Tensor) -> torch.Tensor:
        """MTP depth ``k``'s block input from the quantized main model's last block output."""
        if k:
            raise NotImplementedError("calibrating more than one MTP depth")
        model, w = self.model, self.windows
        m = cast(MTPLayer, model.mtp[k])
        hidden = model.model.norm(x_main_out)
        e = m.enorm(m.embed_tokens(w[:, 1:].reshape(-1)))
        return m.eh_proj(torch.cat([e, m.hnorm(hidden)], dim=-1)).float()


class _SensitivityProbe:
    """The calibration NLL with one module swapped for its INT8 form, recomputed only from where
    that module acts: block inputs, the final hidden states and the baseline losses are kept, so
    a module of block l reruns blocks l.. and the head; an MTP module reruns MTP alone."""

    def __init__(self, model: DeepseekForCausalLM, windows: torch.Tensor) -> None:
        self.model, self.windows = model, windows
        self.batch = _Batch(model.rope, windows.shape[0], windows.shape[1] - 1)
        self.positions = torch.arange(self.batch.length).repeat(self.batch.n)
        x = model.model.embed_tokens(windows[:, :-1].reshape(-1))
        self.inputs = []
        for layer in model.model.layers:
            self.inputs.append(x)
            x = self.batch.run(cast(Block, layer), x)
        self.hidden = model.model.norm(x)
        self.base_main = self._main_nll(self.hidden)
        self.base_mtp = self._mtp_nll() if len(model.mtp) else None

    def _main_nll(self, hidden: torch.Tensor) -> float:
        return float(F.cross_entropy(self.model.compute_logits(hidden), self.windows[:, 1:].reshape(-1)))

    def _mtp_nll(self) -> float:
        model, w, b = self.model, self.windows, self.batch
        h = model.mtp_forward(w[:, 1:].reshape(-1), self.positions, self.hidden, b.meta)
        draft = model.mtp_logits(h).view(b.n, b.length, -1)[:, :-1]
        return float(F.cross_entropy(draft.reshape(-1, draft.shape[-1]), w[:, 2:].reshape(-1)))

    def delta(self, name: str, int8: nn.Module) -> float:
        """Relative NLL increase with ``name`` replaced by ``int8`` (MTP modules: of the MTP NLL)."""
        with _swapped(self.model, {name: int8}):
            if name.startswith("mtp.") and self.base_mtp is not None:
                return (self._mtp_nll() - self.base_mtp) / self.base_mtp
            if name.startswith("model.layers."):
                first = int(name.split(".")[2])
                x = self.inputs[first]
                for layer in self.model.model.layers[first:]:
                    x = self.batch.run(cast(Block, layer), x)
                hidden = self.model.model.norm(x)
            else:
                hidden = self.hidden
            return (self._main_nll(hidden) - self.base_main) / self.base_main


# -- activations and smoothing (steps 2 and 3) --------------------------------------------------------

def _capture(block: Block, batch: _Batch, x: torch.Tensor) -> dict[str, Any]:
    """The inputs of every smoothing group of ``block`` on ``x`` (float pass, before any change)."""
    acts: dict[str, Any] = {}
    a, mlp = block.self_attn, block.mlp
    hooks: dict[str, nn.Module] = {"attn_in": a.q_proj if a.q_lora_rank is None else a.q_a_proj,
                                   "o_in": a.o_proj, "mlp_in": mlp}
    if a.q_lora_rank is not None:
        hooks["q_b_in"] = a.q_b_proj
    dense = mlp if isinstance(mlp, MLP) else mlp.shared_experts
    if dense is not None:
        hooks["down_in"] = dense.down_proj
    if isinstance(mlp, MoE):
        hooks["routing"] = mlp.experts
    handles = []
    for key, mod in hooks.items():
        def hook(_m: nn.Module, args: tuple[Any, ...], key: str = key) -> None:
            acts[key] = args[1] if key == "routing" else args[0].detach().float()
        handles.append(mod.register_forward_pre_hook(hook))
    try:
        batch.run(block, x)
    finally:
        for h in handles:
            h.remove()
    return acts


def _rows(x: torch.Tensor, n: int = SMOOTH_ROWS) -> torch.Tensor:
    if x.shape[0] <= n:
        return x
    return x[torch.linspace(0, x.shape[0] - 1, n).long()]


def _choose(acts: torch.Tensor, consumers: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[str, torch.Tensor | None]:
    """The smoothing of one group (None: not smoothing) and a label of the chosen strength."""
    alpha, s, _ = search_smoothing(acts.abs().amax(dim=0), consumers)
    return ("none", None) if alpha is None else (f"{alpha:g}", s)


def _smooth(block: Block, acts: dict[str, Any], int8: set[str], recipe: QuantRecipe) -> dict[str, str]:
    """Search and absorb each smoothing group's scales in ``block`` (exact in real arithmetic:
    inputs divided where they are produced, consumers' weights multiplied)."""
    a, mlp, chosen = block.self_attn, block.mlp, {}

    def lin(path: str) -> Linear:
        return cast(Linear, block.get_submodule(path))

    def linear_group(key: str, paths: list[str], absorb: Callable[[torch.Tensor], object]) -> None:
        quantized = [p for p in paths if p in int8]
        if not quantized or (recipe.rotate and any(p in policy.ROTATED_INPUTS for p in quantized)):
            return  # (a rotated input is spread by the rotation instead)
        x = acts[key]
        label, s = _choose(x, [(lin(p).weight, _rows(x)) for p in quantized])
        chosen[key] = label
        if s is not None:
            absorb(s)
            for p in paths:
                lin(p).weight.mul_(s)

    q_in = ["self_attn.q_proj"] if a.q_lora_rank is None else ["self_attn.q_a_proj"]
    linear_group("attn_in", q_in + ["self_attn.kv_a_proj_with_mqa"], block.input_layernorm.weight.div_)
    if a.q_lora_rank is not None:
        linear_group("q_b_in", ["self_attn.q_b_proj"], a.q_a_layernorm.weight.div_)

    def into_values(s: torch.Tensor) -> None:  # o_proj's input is attention's values: kv_b_proj's W_UV rows
        w = a.kv_b_proj.weight.view(a.n_heads, a.nope_dim + a.v_dim, a.kv_lora_rank)
        w[:, a.nope_dim:].div_(s.view(a.n_heads, a.v_dim, 1))

    linear_group("o_in", ["self_attn.o_proj"], into_values)
    prefix = "mlp." if isinstance(mlp, MLP) else "mlp.shared_experts."
    dense = mlp if isinstance(mlp, MLP) else mlp.shared_experts
    if dense is not None:
        up = dense.up_proj.weight
        linear_group("down_in", [prefix + "down_proj"], lambda s: up.div_(s[:, None]))
    if isinstance(mlp, MoE):
        chosen.update(_smooth_moe(block, mlp, acts, int8))
    else:
        linear_group("mlp_in", ["mlp.gate_proj", "mlp.up_proj"], block.post_attention_layernorm.weight.div_)
    return chosen


def _smooth_moe(block: Block, moe: MoE, acts: dict[str, Any], int8: set[str]) -> dict[str, str]:
    """The MoE input group (shared experts, every routed expert, the router compensating) and each
    routed expert's down projection (absorbed into its up rows)."""
    x, routing, ex = acts["mlp_in"], cast(Routing, acts["routing"]), moe.experts
    chosen: dict[str, str] = {}
    s: torch.Tensor | None = None
    per_expert = _expert_rows(routing, ex.n_experts)
    consumers = []
    shared = moe.shared_experts
    if shared is not None:
        consumers += [(m.weight, _rows(x)) for p, m in (("gate_proj", shared.gate_proj), ("up_proj", shared.up_proj))
                      if f"mlp.shared_experts.{p}" in int8]
    if "mlp.experts" in int8:
        consumers += [(ex.gate_up_proj[e], _rows(x[rows], 512)) for e, rows in enumerate(per_expert) if len(rows)]
    if consumers:
        label, s = _choose(x, consumers)
        chosen["mlp_in"] = label
        if s is not None:
            block.post_attention_layernorm.weight.div_(s)
            moe.gate.weight.mul_(s)
            ex.gate_up_proj.mul_(s)
            if shared is not None:
                shared.gate_proj.weight.mul_(s)
                shared.up_proj.weight.mul_(s)
    if "mlp.experts" not in int8:
        return chosen
    picks = []
    for e, rows in enumerate(per_expert):
        if not len(rows):
            continue
        xe = x[rows] if s is None else x[rows] / s
        gate, up = F.linear(xe, ex.gate_up_proj[e]).chunk(2, dim=-1)
        h = F.silu(gate) * up
        label, se = _choose(h, [(ex.down_proj[e], _rows(h, 512))])
        picks.append(label)
        if se is not None:
            ex.gate_up_proj[e, ex.inter:].div_(se[:, None])
            ex.down_proj[e].mul_(se)
    chosen["experts_down"] = f"{sum(p != 'none' for p in picks)}/{len(picks)} experts smoothed"
    return chosen


def _expert_rows(routing: Routing, n_experts: int) -> list[torch.Tensor]:
    """The token rows routed to each expert."""
    ids = routing.topk_ids
    return [torch.nonzero((ids == e).any(dim=1)).view(-1) for e in range(n_experts)]


# -- error compensation (step 5) ---------------------------------------------------------------------

def _compensate(block: Block, batch: _Batch, x: torch.Tensor, floats: dict[str, nn.Module],
                int8: dict[str, nn.Module], min_tokens: int) -> None:
    """Per-channel biases ``mean(W x - INT8(x))`` over each INT8 module's own (quantized-path)
    calibration inputs; routed experts with fewer than ``min_tokens`` tokens get none."""
    inputs: dict[str, tuple[Any, ...]] = {}
    handles = [m.register_forward_pre_hook(lambda _m, args, p=p: inputs.__setitem__(p, args))
               for p, m in int8.items()]
    try:
        batch.run(block, x)
    finally:
        for h in handles:
            h.remove()
    for p, q in int8.items():
        f = floats[p]
        if isinstance(q, Int8Linear):
            xin = inputs[p][0].float()
            diff = (cast(Linear, f)(xin).float() - q(xin).float()).mean(dim=0)
            q.bias = diff if q.bias is None else q.bias + diff
        else:
            _compensate_experts(cast(Experts, f), cast(Int8Experts, q), inputs[p][0].float(),
                                cast(Routing, inputs[p][1]), min_tokens)


def _compensate_experts(f: Experts, q: Int8Experts, x: torch.Tensor, routing: Routing, min_tokens: int) -> None:
    gu_bias = torch.zeros(q.n_experts, 2 * q.inter)
    down_bias = torch.zeros(q.n_experts, q.hidden)
    for e, rows in enumerate(_expert_rows(routing, q.n_experts)):
        if len(rows) < min_tokens:
            continue
        xe = x[rows]
        gu_q = w8a8_linear(xe, q.gate_up_proj[e], q.gate_up_proj_scale[e])
        gu_bias[e] = (F.linear(xe, f.gate_up_proj[e]) - gu_q).mean(dim=0)
        gate, up = (gu_q + gu_bias[e]).chunk(2, dim=-1)
        h = F.silu(gate) * up
        down_bias[e] = (F.linear(h, f.down_proj[e]) - w8a8_linear(h, q.down_proj[e], q.down_proj_scale[e])).mean(0)
    q.gate_up_proj_bias, q.down_proj_bias = gu_bias, down_bias


def _drop_compensation(int8: dict[str, nn.Module], floats: dict[str, nn.Module]) -> None:
    for p, q in int8.items():
        if isinstance(q, Int8Linear):
            fb = cast(Linear, floats[p]).bias
            q.bias = None if fb is None else fb.detach().float().clone()
        elif isinstance(q, Int8Experts):
            q.gate_up_proj_bias = q.down_proj_bias = None
