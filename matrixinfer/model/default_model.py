"""The built-in default model, so the quick start needs no download.

The trained demo model ships inside the package (``matrixinfer/assets/demo-model``). When it is
absent, a small random-weight DeepSeek-V3-architecture checkpoint with a byte-level tokenizer is
generated deterministically on first use under ``$MATRIXINFER_HOME`` (default ``~/.cache/matrixinfer``).
"""

from __future__ import annotations

import json
from pathlib import Path

from matrixinfer import envs

SHIPPED = Path(__file__).resolve().parent.parent / "assets" / "demo-model"
RANDOM_NAME = "random-deepseek-v3-tiny-v1"

RANDOM_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "vocab_size": 264, "hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64,
    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
    "q_lora_rank": 64, "kv_lora_rank": 32, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16,
    "v_head_dim": 32, "n_routed_experts": 16, "n_shared_experts": 1, "num_experts_per_tok": 4,
    "first_k_dense_replace": 1, "n_group": 4, "topk_group": 2, "norm_topk_prob": True,
    "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "num_nextn_predict_layers": 0, "tie_word_embeddings": False, "bos_token_id": 256,
    "eos_token_id": 257, "torch_dtype": "float32",
}


def home() -> Path:
    return envs.home()


def default_model_path() -> Path:
    """The shipped demo model if present, else the generated random model (created if needed)."""
    if (SHIPPED / "config.json").exists():
        return SHIPPED
    path = home() / RANDOM_NAME
    if not (path / "model.safetensors").exists():
        write_random_model(path)
    return path


def write_random_model(path: Path, seed: int = 0) -> Path:
    """Write the deterministic random checkpoint (weights, byte-level tokenizer, chat template)."""
    import torch
    from safetensors.torch import save_file

    from matrixinfer.config import ModelConfig
    from matrixinfer.model.deepseek import DeepseekForCausalLM
    from matrixinfer.model.export import export_state_dict

    path.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.from_dict(RANDOM_CONFIG)
    torch.manual_seed(seed)
    model = DeepseekForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.05)
            elif "norm" in name:
                p.fill_(1.0)
    tmp = path / "model.safetensors.tmp"
    save_file(export_state_dict(model), str(tmp), metadata={"format": "pt"})
    write_byte_tokenizer(path)
    (path / "config.json").write_text(json.dumps(RANDOM_CONFIG, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 256, "eos_token_id": 257}))
    tmp.rename(path / "model.safetensors")
    return path


def write_byte_tokenizer(path: Path) -> None:
    """A byte-level tokenizer (256 byte tokens, ids 256.. special) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from matrixinfer.train.bpe import add_bos_post_processor

    # sorted: sets are unordered
    byte_vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=byte_vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>"])
    add_bos_post_processor(tok, "<|bos|>")
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|bos|>", "eos_token": "<|eos|>", "add_bos_token": True,
        "chat_template": CHAT_TEMPLATE}, indent=2))


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
