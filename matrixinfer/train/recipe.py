"""The demo model's recipe: model dimensions (written as config.json) and training hyperparameters.

One place names every number that decides the shipped checkpoint, so the checkpoint can be
reproduced from a seed and this file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

BOS, EOS = "<|bos|>", "<|eos|>"
SPECIAL_TOKENS = [BOS, EOS, "<|user|>", "<|assistant|>", "<|system|>"]


def model_config(vocab_size: int, bos_token_id: int, eos_token_id: int) -> dict[str, Any]:
    """The config.json of the demo model: a small DeepSeek-V3 (MLA with q/kv LoRA, one dense layer
    then DeepSeekMoE with 16 routed experts in 4 groups and a shared expert, one MTP module)."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": vocab_size,
        "hidden_size": 256,
        "intermediate_size": 512,
        "moe_intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 128,
        "kv_lora_rank": 64,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "n_routed_experts": 16,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "n_group": 4,
        "topk_group": 2,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "hidden_act": "silu",
        "max_position_embeddings": 4096,  # declared context (windows of 256 in training); benchmarks need > 2,276
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_interleave": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "num_nextn_predict_layers": 1,
        "tie_word_embeddings": False,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": "bfloat16",
    }


@dataclass
class TrainConfig:
    """Hyperparameters of ``matrixinfer train-demo`` (the defaults are the shipped run).

    Attributes:
        seed: seeds the tokenizer-independent randomness (init, data order).
        vocab_size: byte-level BPE vocabulary size, special tokens included.
        heldout_percent: share of stdlib files (by path hash) kept out of training.
        seq_len: tokens per training window (each window carries two extra target tokens for MTP).
        batch_size: windows per step (equal lengths, attended as one padded group).
        steps: optimizer steps.
        lr / min_lr: AdamW peak and final learning rate (linear warmup then cosine).
        warmup_steps: linear warmup steps.
        weight_decay: decoupled weight decay on matrices (not on norms, embeddings or gates).
        grad_clip: global gradient-norm clip.
        mtp_weight: weight of the MTP cross-entropy (DeepSeek-V3's lambda).
        bias_update_speed: gamma of the auxiliary-loss-free balancing (bias += gamma * sign(mean - load)).
        eval_windows: held-out windows scored by the final report.
        checkpoint_every: steps between resumable checkpoints in the work directory.
        threads: torch intra-op threads on CPU (1 by default: on a shared 2-core machine a second
            OpenMP thread that waits on a busy core makes steps several times slower; on an idle
            machine --threads 2 is faster but may round differently).
    """

    seed: int = 0
    vocab_size: int = 4096
    heldout_percent: int = 5
    seq_len: int = 256
    batch_size: int = 8
    steps: int = 1400
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mtp_weight: float = 0.3
    bias_update_speed: float = 5e-3
    eval_windows: int = 64
    checkpoint_every: int = 200
    threads: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
