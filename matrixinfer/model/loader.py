"""Load Hugging Face DeepSeek-V2/V3 checkpoints (safetensors; FP8 block-scaled and INT8 W8A8 included).

Tensors are streamed one at a time from memory-mapped files into a model whose storage was
allocated uninitialised, so peak memory stays near one copy of the model. Every problem names the
file and tensor involved and what was expected. FP8 weights are dequantized while loading; INT8
modules (:mod:`matrixinfer.quant.format`: a ``weight_scale`` beside the weight) replace their float
modules before loading and stay INT8.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import torch
from safetensors import safe_open

from matrixinfer.config import ModelConfig
from matrixinfer.model.backend import select_backend
from matrixinfer.model.deepseek import DeepseekForCausalLM, MTPLayer
from matrixinfer.model.experts import Experts, Int8Experts
from matrixinfer.model.fp8 import FP8_DTYPE, dequantize_fp8_blocks
from matrixinfer.model.layers import Int8Linear, Linear, RotaryEmbedding
from matrixinfer.model.moe import Gate
from matrixinfer.progress import progress as progress_bar
from matrixinfer.quant.format import Int8Layout, QuantFormatError, parse_layout

log = logging.getLogger(__name__)

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^(.*mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\."
                     r"(weight|weight_scale|bias|pre_quant_scale)$")
#: a stacked experts tensor -> (the checkpoint projections stacked in it, their tensor suffix); the
#: float experts have the first two, INT8 experts (matrixinfer.quant.format) all
_EXPERT_STACKS = {
    "gate_up_proj": (("gate_proj", "up_proj"), "weight"),
    "down_proj": (("down_proj",), "weight"),
    "gate_up_proj_scale": (("gate_proj", "up_proj"), "weight_scale"),
    "down_proj_scale": (("down_proj",), "weight_scale"),
    "gate_up_proj_bias": (("gate_proj", "up_proj"), "bias"),
    "down_proj_bias": (("down_proj",), "bias"),
    "gate_up_proj_pre_quant_scale": (("gate_proj", "up_proj"), "pre_quant_scale"),
    "down_proj_pre_quant_scale": (("down_proj",), "pre_quant_scale"),
}
_STACK_OF = {(part, suffix): stack for stack, (parts, suffix) in _EXPERT_STACKS.items() for part in parts}
_MTP_OWN = ("embed_tokens.", "enorm.", "hnorm.", "eh_proj.", "shared_head.")
_MTP_OPTIONAL = ("embed_tokens.weight", "shared_head.head.weight")  # may be shared with the main model


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded: the message names the file and tensor."""


def _index(ckpt: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file holding it."""
    index_file = ckpt / "model.safetensors.index.json"
    if index_file.exists():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index_file}: not a valid safetensors index ({exc})") from exc
        return {name: ckpt / fname for name, fname in weight_map.items()}
    single = ckpt / "model.safetensors"
    files = [single] if single.exists() else sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{ckpt}: no model.safetensors, model.safetensors.index.json or *.safetensors file")
    names: dict[str, Path] = {}
    for f in files:
        names.update(dict.fromkeys(_open(f).keys(), f))
    return names


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: file listed by the checkpoint does not exist") from exc
    except Exception as exc:  # safetensors raises SafetensorError for truncated/corrupt headers
        raise CheckpointError(f"{path}: unreadable safetensors file ({exc}); is it truncated or corrupt?") from exc


def _handle(handles: dict[Path, object], path: Path):
    """The open safetensors file ``path`` (opened on first use)."""
    if path not in handles:
        handles[path] = _open(path)
    return handles[path]


def _expert_dest(params: dict[str, torch.Tensor], base: str, e: int, part: str, suffix: str = "weight") -> torch.Tensor:
    """Where one unstacked expert tensor lives in the stacked tensors (a view): gate rows then up
    rows of ``gate_up_proj*``; gate and up share one input, so one ``pre_quant_scale`` slot."""
    t = params[f"{base}.{_STACK_OF[part, suffix]}"][e]
    if part == "down_proj" or suffix == "pre_quant_scale":
        return t
    half = t.shape[0] // 2
    return t[:half] if part == "gate_proj" else t[half:]


def _target_name(name: str, n_layers: int) -> str | None:
    """Our parameter name for checkpoint tensor ``name`` (None: not part of the model)."""
    m = _LAYER.match(name)
    if not m:
        return name if name.startswith(("model.embed_tokens.", "model.norm.", "lm_head.")) else None
    idx, rest = int(m.group(1)), m.group(2)
    if idx < n_layers:
        return name
    k = idx - n_layers
    if rest.startswith(_MTP_OWN):
        return f"mtp.{k}.{rest}"
    return f"mtp.{k}.block.{rest}"


def _expected(model: DeepseekForCausalLM) -> dict[str, tuple[int, ...]]:
    """Checkpoint-side names (experts unstacked) and shapes the model needs."""
    n_layers = model.config.num_hidden_layers
    out: dict[str, tuple[int, ...]] = {}
    tensors: dict[str, torch.Tensor] = dict(model.named_parameters())
    tensors.update((n, b) for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
    for mname, mod in model.named_modules():  # INT8 modules keep every tensor in (persistent) buffers
        if isinstance(mod, (Int8Linear, Int8Experts)):
            tensors.update((f"{mname}.{b}", t) for b, t in mod.named_buffers(recurse=False))
    for ours, t in tensors.items():
        ck = ours
        if ours.startswith("mtp."):
            _, k, rest = ours.split(".", 2)
            rest = rest[len("block."):] if rest.startswith("block.") else rest
            ck = f"model.layers.{n_layers + int(k)}.{rest}"
        base, _, stack = ck.rpartition(".")
        if base.endswith("mlp.experts") and stack in _EXPERT_STACKS:
            parts, suffix = _EXPERT_STACKS[stack]
            split = len(parts) == 2 and suffix != "pre_quant_scale"
            shape = (t.shape[1] // 2, *t.shape[2:]) if split else tuple(t.shape[1:])
            for j in range(t.shape[0]):
                for part in parts:
                    out[f"{base}.{j}.{part}.{suffix}"] = shape
        else:
            out[ck] = tuple(t.shape)
    if model.config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def read_checkpoint_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint as stored (FP8 and scales included), e.g. to fill a model cache."""
    names = _index(Path(path))
    handles: dict[Path, object] = {}
    out = {}
    for name, fpath in names.items():
        out[name] = _handle(handles, fpath).get_tensor(name)
    return out


class _MappingSource:
    """Tensors from a mapping (e.g. the EMS model cache) behind the safe_open interface."""

    def __init__(self, tensors) -> None:
        self.tensors = tensors

    def get_tensor(self, name: str) -> torch.Tensor:
        t = self.tensors[name]
        return t if isinstance(t, torch.Tensor) else torch.from_numpy(t)


_INIT_FILLS = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
               "trunc_normal_", "zeros_", "ones_", "constant_")


@contextmanager
def _no_init() -> Iterator[None]:
    """Skip ``torch.nn.init``'s fills while the model is built on the meta device: they mean nothing
    there (the checkpoint fills every tensor), and on meta tensors they run torch's Python reference
    ops, whose first use imports ``torch._dynamo`` (1.5-6 s in every process that loads a model)."""
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FILLS}

    def skip(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return tensor

    for name in _INIT_FILLS:
        setattr(torch.nn.init, name, skip)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               with_mtp: bool | None = None, progress: bool = True, tensors=None,
               fill_in_place: Callable[[dict[str, torch.Tensor]], set[str]] | None = None) -> DeepseekForCausalLM:
    """Build the model described by ``path/config.json`` and fill it from the checkpoint's tensors
    (or from ``tensors``, a name -> tensor mapping such as the EMS model cache returns).

    MTP modules are loaded when the config declares them and the checkpoint holds their tensors;
    ``with_mtp=True`` makes missing MTP tensors an error, ``False`` skips them. The model comes back
    in eval mode with its compute backends chosen (``select_backend(model, "auto")``).

    ``fill_in_place`` (CPU models only) receives ``{checkpoint name: the parameter memory it lands
    in}`` (contiguous views, in the model's dtype and shape) and returns the names it wrote there
    itself, so a source such as the EMS model cache copies once, with no staging tensor; the
    loader reads every other tensor from ``tensors`` or the files as usual.
    """
    ckpt = Path(path)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: not a checkpoint directory")
    cfg = ModelConfig.from_file(ckpt)
    if tensors is not None:
        source = _MappingSource(tensors)
        names = {n: ckpt / "<model cache>" for n in tensors}
    else:
        source = None
        names = _index(ckpt)
    n_layers = cfg.num_hidden_layers
    has_mtp = any((m := _LAYER.match(n)) and int(m.group(1)) >= n_layers for n in names)
    if with_mtp is None:
        with_mtp = cfg.num_nextn_predict_layers > 0 and has_mtp
        if cfg.num_nextn_predict_layers > 0 and not has_mtp:
            log.info("%s: config declares %d MTP module(s) but the checkpoint has no MTP tensors; "
                     "loading without MTP", ckpt, cfg.num_nextn_predict_layers)
    try:
        layout = parse_layout(cfg.quantization_config, names)
    except QuantFormatError as exc:
        raise CheckpointError(f"{ckpt}: {exc}") from exc
    with torch.device("meta"), _no_init():
        model = DeepseekForCausalLM(cfg, with_mtp=with_mtp)
        if layout is not None:
            _use_int8(model, layout, names, ckpt)
        _cast(model, dtype)
    model = model.to_empty(device=device)
    model.rope = RotaryEmbedding(cfg).to(device)
    params: dict[str, torch.Tensor] = dict(model.named_parameters())
    params.update(model.named_buffers())
    expected = _expected(model)
    quant = cfg.quantization_config or {}
    block = tuple(quant.get("weight_block_size", (128, 128)))
    handles: dict[Path, object] = {}
    filled: set[str] = set()
    targets = {n: tgt for n in names if not n.endswith("weight_scale_inv") and (tgt := _target_name(n, n_layers))}
    todo = list(targets)
    written: set[str] = set()
    if fill_in_place is not None and torch.device(device).type == "cpu":
        written = fill_in_place(_destinations(params, expected, todo, n_layers))
    for name in progress_bar(todo, desc=f"loading {ckpt.name}", unit="tensor", disable=not progress):
        if name in written:
            filled.add(name)
            continue
        target = targets[name]
        if target.startswith("mtp.") and int(target.split(".")[1]) >= len(model.mtp):
            continue
        fpath = names[name]
        fh = source or _handle(handles, fpath)
        try:
            t = fh.get_tensor(name)
        except Exception as exc:
            raise CheckpointError(f"{fpath}: cannot read tensor {name} ({exc})") from exc
        if t.dtype == FP8_DTYPE:
            sname = name[: -len("weight")] + "weight_scale_inv"
            if sname not in names:
                raise CheckpointError(f"{fpath}: fp8 tensor {name} has no {sname}")
            sfile = names[sname]
            sh = source or _handle(handles, sfile)
            try:
                t = dequantize_fp8_blocks(t, sh.get_tensor(sname), block, torch.float32, name)
            except ValueError as exc:
                raise CheckpointError(f"{fpath}: {exc}") from exc
        _assign(params, expected, name, target, t, fpath, filled)
    missing = [n for n in expected if n not in filled]
    optional = {f"model.layers.{n_layers + k}.{o}" for k in range(len(model.mtp)) for o in _MTP_OPTIONAL}
    for n in [n for n in missing if n in optional]:
        k = int(n.split(".")[2]) - n_layers
        src = model.model.embed_tokens if "embed_tokens" in n else model.lm_head
        mtp = cast(MTPLayer, model.mtp[k])
        dst = mtp.embed_tokens if "embed_tokens" in n else mtp.shared_head.head
        dst.weight = src.weight  # MTP shares the main model's embedding / head
        missing.remove(n)
    if missing:
        where = ", ".join(sorted({str(p.name) for p in names.values()}))
        raise CheckpointError(f"{ckpt}: checkpoint ({where}) is missing {len(missing)} tensor(s), e.g. "
                              + ", ".join(f"{n} (expected shape {list(expected[n])})" for n in missing[:5]))
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    select_backend(model, "auto")  # once, now that every weight is in place on its device
    return model.eval()


def _destinations(params: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], names: list[str],
                  n_layers: int) -> dict[str, torch.Tensor]:
    """The parameter memory each checkpoint tensor is copied into (unstacked experts: a slice of
    the stacked tensor), for tensors the model holds; fused-layout experts are left out."""
    out: dict[str, torch.Tensor] = {}
    for name in names:
        target = _target_name(name, n_layers)
        if target is None:
            continue
        em = _EXPERT.match(target)
        if em:
            base, e, part, suffix = em.group(1), int(em.group(2)), em.group(3), em.group(4)
            if name not in expected or f"{base}.gate_up_proj" not in params:
                continue
            dest = _expert_dest(params, base, e, part, suffix)
        elif target.endswith(("experts.gate_up_proj", "experts.down_proj")) or target not in params:
            continue
        else:
            dest = params[target]
        if dest.is_contiguous():
            out[name] = dest
    return out


def _cast(model: DeepseekForCausalLM, dtype: torch.dtype) -> None:
    """Cast to the runtime dtype, except routers, which stay float32 as in the reference."""
    for mod in model.modules():
        if isinstance(mod, (Gate, RotaryEmbedding)):
            continue
        for pname, p in list(mod.named_parameters(recurse=False)):
            setattr(mod, pname, torch.nn.Parameter(p.to(dtype), requires_grad=False))


def _use_int8(model: DeepseekForCausalLM, layout: Int8Layout, names: dict[str, Path], ckpt: Path) -> None:
    """Replace the modules the checkpoint stores in INT8 by :class:`Int8Linear` / :class:`Int8Experts`
    (on the meta device, before any tensor is read); their optional tensors decide their options."""
    n_layers = model.config.num_hidden_layers
    experts: dict[str, list[str]] = {}
    for ck in sorted(layout.modules):
        target = _target_name(f"{ck}.weight", n_layers)
        if target is None:
            raise CheckpointError(f"{ckpt}: INT8 tensor {ck}.weight_scale belongs to no module of the model")
        if target.startswith("mtp.") and int(target.split(".")[1]) >= len(model.mtp):
            continue  # MTP modules not loaded
        em = _EXPERT.match(target)
        if em:
            experts.setdefault(em.group(1), []).append(ck)
            continue
        mod_name = target[: -len(".weight")]
        try:
            mod = model.get_submodule(mod_name)
        except AttributeError:
            raise CheckpointError(f"{ckpt}: INT8 tensor {ck}.weight_scale belongs to no module of the model") from None
        if not isinstance(mod, Linear) or mod_name.endswith("kv_b_proj"):
            raise CheckpointError(f"{ckpt}: {ck} is stored in INT8, but only linear projections other than "
                                  "kv_b_proj (which attention reads as a matrix) can be")
        new = Int8Linear(mod.in_features, mod.out_features, bias=f"{ck}.bias" in names,
                         pre_quant_scale=f"{ck}.pre_quant_scale" in names, rotate_block=layout.rotated.get(ck, 0))
        parent, _, attr = mod_name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)
    for base, cks in experts.items():
        mod = model.get_submodule(base)
        if not isinstance(mod, Experts) or len(cks) != 3 * mod.n_experts:
            raise CheckpointError(f"{ckpt}: {len(cks)} INT8 projections under {base}: every routed expert's "
                                  f"gate_proj, up_proj and down_proj must be INT8, or none")
        rotated = [ck for ck in cks if ck in layout.rotated]
        if rotated:
            raise CheckpointError(f"{ckpt}: rotated inputs are not supported for routed experts ({rotated[0]})")
        new_ex = Int8Experts(mod.n_experts, mod.gate_up_proj.shape[2], mod.inter,
                             bias=any(f"{ck}.bias" in names for ck in cks),
                             pre_quant_scale=any(f"{ck}.pre_quant_scale" in names for ck in cks))
        parent, _, attr = base.rpartition(".")
        setattr(model.get_submodule(parent), attr, new_ex)


def _assign(params: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], name: str, target: str,
            t: torch.Tensor, fpath: Path, filled: set[str]) -> None:
    em = _EXPERT.match(target)
    if em:
        base, e, part, suffix = em.group(1), int(em.group(2)), em.group(3), em.group(4)
        if name not in expected:
            raise CheckpointError(f"{fpath}: unexpected tensor {name} (the config has fewer experts or layers)")
        if tuple(t.shape) != expected[name]:
            raise CheckpointError(f"{fpath}: tensor {name} has shape {list(t.shape)}, expected {list(expected[name])}")
        slot = _expert_dest(params, base, e, part, suffix)
        _check_int8(slot, t, name, fpath)
        sibling = name.replace(".up_proj.", ".gate_proj.") if part == "up_proj" else name.replace(".gate_proj.",
                                                                                                   ".up_proj.")
        if suffix == "pre_quant_scale" and sibling in filled and not torch.equal(slot, t.to(slot.dtype)):
            raise CheckpointError(f"{fpath}: {name} differs from {sibling}: gate and up share one input, so one "
                                  "smoothing vector")
        with torch.no_grad():
            slot.copy_(t)
        filled.add(name)
        return
    if target.endswith(("experts.gate_up_proj", "experts.down_proj")):  # fused (stacked) layout
        dest = params.get(target)
        if dest is None or tuple(t.shape) != tuple(dest.shape):
            raise CheckpointError(f"{fpath}: tensor {name} has shape {list(t.shape)}, expected "
                                  f"{list(dest.shape) if dest is not None else 'no such tensor'}")
        with torch.no_grad():
            dest.copy_(t)
        prefix = name.rsplit(".", 1)[0]
        parts = ("gate_proj", "up_proj") if target.endswith("gate_up_proj") else ("down_proj",)
        filled.update(f"{prefix}.{e}.{p}.weight" for e in range(t.shape[0]) for p in parts)
        return
    dest = params.get(target)
    if dest is None:
        if name.endswith(("rotary_emb.inv_freq",)):
            return
        raise CheckpointError(f"{fpath}: unexpected tensor {name} (not part of the model this config describes)")
    if tuple(t.shape) != tuple(dest.shape):
        raise CheckpointError(f"{fpath}: tensor {name} has shape {list(t.shape)}, expected {list(dest.shape)}")
    _check_int8(dest, t, name, fpath)
    with torch.no_grad():
        dest.copy_(t)
    filled.add(name)


def _check_int8(dest: torch.Tensor, t: torch.Tensor, name: str, fpath: Path) -> None:
    """INT8 tensors go exactly where INT8 is expected (a silent cast would serve garbage)."""
    if (t.dtype is torch.int8) != (dest.dtype is torch.int8):
        if t.dtype is torch.int8:
            raise CheckpointError(f"{fpath}: tensor {name} is int8 but has no "
                                  f"{name.rsplit('.', 1)[0]}.weight_scale beside it")
        raise CheckpointError(f"{fpath}: tensor {name} is {t.dtype}; this INT8 module expects int8")
