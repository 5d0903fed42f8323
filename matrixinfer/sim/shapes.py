"""Model shapes for the cost model: weights, FLOPs and bytes per token, from a ModelConfig.

Everything is derived from the checkpoint's config.json through
:class:`matrixinfer.config.ModelConfig` (the parser the runtime uses); nothing is hard-coded
for DeepSeek-R1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from matrixinfer.config import ModelConfig

BF16 = 2
INT8 = 1

# Where a published config ships with the repository's shared area (the paper's model).
#: published config.json files of real checkpoints (shapes only) that ship with the package
MODEL_CONFIGS = Path(__file__).resolve().parents[1] / "assets" / "model-configs"
DEFAULT_MODEL_CANDIDATES = (MODEL_CONFIGS / "deepseek-r1.config.json",)


@dataclass(frozen=True)
class ModelShapes:
    """Per-layer parameter counts and per-token costs of a DeepSeek-V2/V3 family model.

    Attributes (parameter counts are per layer unless named otherwise):
        name: a label for tables.
        hidden: model width.
        layers: main transformer blocks; mtp_layers: MTP modules after them.
        dense_layers: blocks with a dense MLP (the rest are MoE).
        heads: attention heads; kv_dim: cached values per token per layer (latent + rope key);
        kv_lora: latent width; qk_dim / qk_nope / v_dim: per-head dims.
        attn_proj_params: q down/up, kv down and o_proj (the INT8 projections).
        attn_absorb_params: kv_b (W_UK and W_UV), kept BF16 and applied as per-head BMMs when
            absorbed in decode, or as the K/V up-projection in prefill.
        expert_params: one routed or shared expert (gate, up, down).
        dense_mlp_params: the dense MLP of the first layers.
        routed_experts / shared_experts / top_k: MoE structure.
        vocab: head rows; head_params = vocab x hidden.
        q_lora: query latent width (0: direct q_proj).
    """

    name: str
    hidden: int
    layers: int
    mtp_layers: int
    dense_layers: int
    heads: int
    kv_dim: int
    kv_lora: int
    qk_dim: int
    qk_nope: int
    v_dim: int
    attn_proj_params: int
    attn_absorb_params: int
    expert_params: int
    dense_mlp_params: int
    routed_experts: int
    shared_experts: int
    top_k: int
    vocab: int
    q_lora: int = 0

    @classmethod
    def from_config(cls, cfg: ModelConfig, name: str = "model") -> ModelShapes:
        """Derive the shapes from a parsed config.json."""
        h = cfg.hidden_size
        heads = cfg.num_attention_heads
        if cfg.q_lora_rank:
            q = h * cfg.q_lora_rank + cfg.q_lora_rank * heads * cfg.qk_head_dim
        else:
            q = h * heads * cfg.qk_head_dim
        kv_a = h * cfg.kv_cache_dim
        o = heads * cfg.v_head_dim * h
        absorb = cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
        dense = sum(1 for i in range(cfg.num_hidden_layers) if not cfg.is_moe_layer(i))
        return cls(
            name=name,
            hidden=h,
            layers=cfg.num_hidden_layers,
            mtp_layers=cfg.num_nextn_predict_layers,
            dense_layers=dense,
            heads=heads,
            kv_dim=cfg.kv_cache_dim,
            kv_lora=cfg.kv_lora_rank,
            qk_dim=cfg.qk_head_dim,
            qk_nope=cfg.qk_nope_head_dim,
            v_dim=cfg.v_head_dim,
            attn_proj_params=q + kv_a + o,
            attn_absorb_params=absorb,
            expert_params=3 * h * cfg.moe_intermediate_size,
            dense_mlp_params=3 * h * cfg.intermediate_size,
            routed_experts=cfg.n_routed_experts or 0,
            shared_experts=cfg.n_shared_experts or 0,
            top_k=cfg.num_experts_per_tok or 0,
            vocab=cfg.vocab_size,
            q_lora=cfg.q_lora_rank or 0,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelShapes:
        """Parse a config.json (or checkpoint directory) into shapes."""
        return cls.from_config(ModelConfig.from_file(path), name=Path(path).name)

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers

    @property
    def head_params(self) -> int:
        return self.vocab * self.hidden

    def kv_bytes_per_token(self, dtype_bytes: int = BF16, include_mtp: bool = True) -> int:
        """KV cache bytes one token occupies across all layers (latent + rope key)."""
        layers = self.layers + (self.mtp_layers if include_mtp else 0)
        return layers * self.kv_dim * dtype_bytes

    def weight_bytes(self, linear_bytes: float = INT8, experts: float | None = None) -> float:
        """Weight bytes: big matmuls at ``linear_bytes``, the rest BF16.

        ``experts`` is how many expert MLPs (routed and shared) each MoE layer holds: by default
        all of them, the whole model; a rank of an expert-parallel instance holds its share and
        every other weight replicated.
        """
        if experts is None:
            experts = self.routed_experts + self.shared_experts
        layers = self.layers + self.mtp_layers
        moe = self.moe_layers + self.mtp_layers
        per_layer = self.attn_proj_params * linear_bytes + self.attn_absorb_params * BF16
        return (layers * per_layer + moe * experts * self.expert_params * linear_bytes
                + self.dense_layers * self.dense_mlp_params * linear_bytes
                + 2 * self.head_params * BF16)

    def attn_decode_flops(self, context: float) -> float:
        """Absorbed-MLA attention FLOPs for one query token over ``context`` cached tokens."""
        return 2.0 * self.heads * context * (self.kv_dim + self.kv_lora)

    def attn_prefill_flops(self, context: float) -> float:
        """Non-absorbed (MHA-form) attention FLOPs for one query token over ``context`` keys."""
        return 2.0 * self.heads * context * (self.qk_dim + self.v_dim)


def default_model_path() -> Path:
    """DeepSeek-R1's config.json (shipped in ``matrixinfer/assets/model-configs``)."""
    for path in DEFAULT_MODEL_CANDIDATES:
        if path.exists():
            return path
    raise FileNotFoundError(
        "DeepSeek-R1 config.json not found at "
        + " or ".join(str(p) for p in DEFAULT_MODEL_CANDIDATES)
        + "; pass --model PATH"
    )


def deepseek_r1() -> ModelShapes:
    """Shapes of DeepSeek-R1 (the paper's model), read from its published config.json."""
    return ModelShapes.from_file(default_model_path())
