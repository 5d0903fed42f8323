"""The MTP module loads from a checkpoint and matches a direct computation from its definition."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from matrixinfer.model.attention import AttentionMetadata
from matrixinfer.model.loader import CheckpointError, load_model
from tests.checkpoints import load_reference, make_checkpoint


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _add_mtp(ckpt, with_own_embedding: bool) -> dict[str, torch.Tensor]:
    """Append MTP tensors (layer 3 of a 3-layer model) to the checkpoint; return them."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

    ref = load_reference(ckpt)
    torch.manual_seed(11)
    block = DeepseekV3DecoderLayer(ref.config, layer_idx=3)
    tensors = load_file(ckpt / "model.safetensors")
    h = ref.config.hidden_size
    mtp = {f"model.layers.3.{k}": v.detach().normal_(0, 0.08) if v.dim() >= 2 else v.detach().uniform_(0.8, 1.2)
           for k, v in block.state_dict().items()}
    mtp.update({
        "model.layers.3.enorm.weight": torch.rand(h) + 0.5,
        "model.layers.3.hnorm.weight": torch.rand(h) + 0.5,
        "model.layers.3.eh_proj.weight": torch.randn(h, 2 * h) * 0.08,
        "model.layers.3.shared_head.norm.weight": torch.rand(h) + 0.5,
        "model.layers.3.shared_head.head.weight": torch.randn(ref.config.vocab_size, h) * 0.08,
    })
    if with_own_embedding:
        mtp["model.layers.3.embed_tokens.weight"] = torch.randn(ref.config.vocab_size, h)
    # transformers keeps experts fused in memory; the checkpoint layout is per expert.
    fused_gu = mtp.pop("model.layers.3.mlp.experts.gate_up_proj", None)
    fused_d = mtp.pop("model.layers.3.mlp.experts.down_proj", None)
    if fused_gu is not None:
        inter = fused_gu.shape[1] // 2
        for e in range(fused_gu.shape[0]):
            mtp[f"model.layers.3.mlp.experts.{e}.gate_proj.weight"] = fused_gu[e, :inter].contiguous()
            mtp[f"model.layers.3.mlp.experts.{e}.up_proj.weight"] = fused_gu[e, inter:].contiguous()
            mtp[f"model.layers.3.mlp.experts.{e}.down_proj.weight"] = fused_d[e].contiguous()
    tensors.update(mtp)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    return mtp


def _reference_mtp(ckpt, mtp: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """MTP logits for positions 0..T-2 straight from the definition, using transformers' decoder layer."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

    ref = load_reference(ckpt)
    block = DeepseekV3DecoderLayer(ref.config, layer_idx=3).eval()
    own = {k[len("model.layers.3."):]: v for k, v in mtp.items()}
    mtp_own = ("enorm", "hnorm", "eh_proj", "shared_head", "embed_tokens")
    sd = {k: v for k, v in own.items() if not k.startswith(mtp_own)}
    gu = [torch.cat([sd.pop(f"mlp.experts.{e}.gate_proj.weight"), sd.pop(f"mlp.experts.{e}.up_proj.weight")])
          for e in range(ref.config.n_routed_experts)]
    dn = [sd.pop(f"mlp.experts.{e}.down_proj.weight") for e in range(ref.config.n_routed_experts)]
    sd["mlp.experts.gate_up_proj"], sd["mlp.experts.down_proj"] = torch.stack(gu), torch.stack(dn)
    block.load_state_dict(sd)
    with torch.no_grad():
        hidden = ref.model(ids[None]).last_hidden_state[0]  # after the final norm
        emb_w = own.get("embed_tokens.weight", ref.model.embed_tokens.weight)
        e = _rms(emb_w[ids[1:]], own["enorm.weight"])
        x = torch.cat([e, _rms(hidden[:-1], own["hnorm.weight"])], dim=-1) @ own["eh_proj.weight"].T
        t = x.shape[0]
        pos = torch.arange(t)[None]
        cos_sin = ref.model.rotary_emb(x[None], pos)
        mask = torch.full((t, t), float("-inf")).triu(1)[None, None]
        y = block(x[None], attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
        y = y[0] if isinstance(y, tuple) else y
        return _rms(y[0], own["shared_head.norm.weight"]) @ own["shared_head.head.weight"].T


def _ours_mtp(model, ids: torch.Tensor) -> torch.Tensor:
    t = ids.shape[0]
    with torch.no_grad():
        hidden = model(ids, torch.arange(t), AttentionMetadata.build([t]))
        h = model.mtp_forward(ids[1:], torch.arange(t - 1), hidden[:-1], AttentionMetadata.build([t - 1]))
        return model.mtp_logits(h)


def test_mtp_matches_definition(tmp_path):
    for own_embedding in (True, False):
        ckpt = make_checkpoint(tmp_path / f"mtp{own_embedding}", "v3", seed=4)
        mtp = _add_mtp(ckpt, own_embedding)
        model = load_model(ckpt, progress=False)
        assert len(model.mtp) == 1
        ids = torch.randint(2, 128, (19,), generator=torch.Generator().manual_seed(3))
        got, expect = _ours_mtp(model, ids), _reference_mtp(ckpt, mtp, ids)
        assert (got - expect).abs().max().item() < 1e-4


def test_checkpoint_without_mtp_tensors_loads_without_mtp(tiny_v3):
    model = load_model(tiny_v3, progress=False)  # config says 1 MTP layer; transformers saved none
    assert len(model.mtp) == 0
    try:
        load_model(tiny_v3, with_mtp=True, progress=False)
    except CheckpointError as exc:
        assert "model.layers.3." in str(exc)
    else:
        raise AssertionError("with_mtp=True on a checkpoint without MTP tensors must fail")
