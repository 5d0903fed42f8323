"""Model configuration parsed from a Hugging Face ``config.json`` (the one source of model facts).

Both the runtime and the simulator read model dimensions through :class:`ModelConfig`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM")


class ConfigError(ValueError):
    """A config.json that cannot describe a supported model."""


@dataclass
class ModelConfig:
    """DeepSeek-V2/V3 family dimensions, with the checkpoint's field names.

    Attributes:
        architecture: ``DeepseekV3ForCausalLM`` or ``DeepseekV2ForCausalLM``.
        vocab_size: tokenizer vocabulary size (rows of the embedding and the head).
        hidden_size: model width.
        intermediate_size: hidden width of the dense MLP layers.
        moe_intermediate_size: hidden width of one routed (or shared) expert.
        num_hidden_layers: transformer blocks, not counting MTP modules.
        num_attention_heads: MLA query heads.
        q_lora_rank: rank of the query down-projection; None means a direct q_proj.
        kv_lora_rank: width of the compressed KV latent (what the KV cache stores, with the rope key).
        qk_nope_head_dim: per-head query/key dims without rotary embedding.
        qk_rope_head_dim: per-head decoupled rotary dims (one shared rotary key per token).
        v_head_dim: per-head value dims.
        n_routed_experts: routed experts per MoE layer (None: dense model).
        n_shared_experts: shared experts per MoE layer (fused into one MLP of n x width).
        num_experts_per_tok: routed experts chosen per token (top-k).
        first_k_dense_replace: the first k layers use the dense MLP.
        moe_layer_freq: a layer >= first_k_dense_replace is MoE when ``idx % freq == 0``.
        n_group / topk_group: group-limited routing (choose topk_group of n_group expert groups).
        norm_topk_prob: renormalise the chosen experts' weights to sum to one.
        routed_scaling_factor: multiplier on the routed experts' weights.
        scoring_func: ``sigmoid`` (V3) or ``softmax`` (V2).
        topk_method: ``noaux_tc`` (V3), ``greedy`` or ``group_limited_greedy`` (V2).
        rms_norm_eps: RMSNorm epsilon.
        rope_theta: RoPE base.
        rope_scaling: YaRN parameters dict (``factor``, ``mscale``, ``mscale_all_dim``, ...) or None.
        max_position_embeddings: longest context the model accepts.
        num_nextn_predict_layers: MTP modules stored after the main layers.
        tie_word_embeddings: whether the head shares the embedding matrix.
        bos_token_id / eos_token_id: special token ids (eos may be a list).
        quantization_config: the checkpoint's quantization block (FP8 block scales), or None.
        torch_dtype: the checkpoint's stored dtype name.
        raw: the full parsed config.json, for fields not modelled here.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int | None = None
    n_shared_experts: int | None = None
    num_experts_per_tok: int | None = None
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    num_nextn_predict_layers: int = 0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    quantization_config: dict[str, Any] | None = None
    torch_dtype: str = "bfloat16"
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def is_v3(self) -> bool:
        return self.architecture == "DeepseekV3ForCausalLM"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values cached per token per layer: the latent plus the shared rotary key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        if isinstance(self.eos_token_id, list):
            return list(self.eos_token_id)
        return [self.eos_token_id]

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether block ``layer_idx`` (MTP blocks included) uses routed experts."""
        return (
            self.n_routed_experts is not None
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config.json") -> ModelConfig:
        archs = data.get("architectures") or []
        arch = archs[0] if archs else {
            "deepseek_v3": "DeepseekV3ForCausalLM",
            "deepseek_v2": "DeepseekV2ForCausalLM",
        }.get(data.get("model_type", ""), "")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"{source}: unsupported architecture {arch or data.get('model_type')!r}; "
                f"expected one of {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        required = (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
            "v_head_dim",
        )
        missing = [k for k in required if data.get(k) is None]
        if missing:
            raise ConfigError(f"{source}: missing required field(s) {', '.join(missing)}")
        rope_scaling = data.get("rope_scaling")
        # transformers 5 writes rope settings under rope_parameters (rope_type "default" = none).
        params = data.get("rope_parameters")
        if rope_scaling is None and isinstance(params, dict) and params.get("rope_type") == "yarn":
            rope_scaling = dict(params)
        if isinstance(rope_scaling, dict):
            kind = rope_scaling.get("type", rope_scaling.get("rope_type"))
            if kind not in ("yarn", None, "default"):
                raise ConfigError(f"{source}: rope_scaling type {kind!r} is not supported (yarn only)")
            if kind in (None, "default"):
                rope_scaling = None
        rope_theta = data.get("rope_theta")
        if rope_theta is None and isinstance(params, dict):
            rope_theta = params.get("rope_theta")
        defaults_v3 = arch == "DeepseekV3ForCausalLM"
        return cls(
            architecture=arch,
            vocab_size=int(data["vocab_size"]),
            hidden_size=int(data["hidden_size"]),
            intermediate_size=int(data["intermediate_size"]),
            moe_intermediate_size=int(data.get("moe_intermediate_size") or data["intermediate_size"]),
            num_hidden_layers=int(data["num_hidden_layers"]),
            num_attention_heads=int(data["num_attention_heads"]),
            q_lora_rank=data.get("q_lora_rank"),
            kv_lora_rank=int(data["kv_lora_rank"]),
            qk_nope_head_dim=int(data["qk_nope_head_dim"]),
            qk_rope_head_dim=int(data["qk_rope_head_dim"]),
            v_head_dim=int(data["v_head_dim"]),
            n_routed_experts=data.get("n_routed_experts"),
            n_shared_experts=data.get("n_shared_experts"),
            num_experts_per_tok=data.get("num_experts_per_tok"),
            first_k_dense_replace=int(data.get("first_k_dense_replace", 0) or 0),
            moe_layer_freq=int(data.get("moe_layer_freq", 1) or 1),
            n_group=int(data.get("n_group", 1) or 1),
            topk_group=int(data.get("topk_group", 1) or 1),
            norm_topk_prob=bool(data.get("norm_topk_prob", defaults_v3)),
            routed_scaling_factor=float(data.get("routed_scaling_factor", 1.0) or 1.0),
            scoring_func=data.get("scoring_func", "sigmoid" if defaults_v3 else "softmax"),
            topk_method=data.get("topk_method", "noaux_tc" if defaults_v3 else "greedy"),
            rms_norm_eps=float(data.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(data.get("max_position_embeddings", 4096)),
            num_nextn_predict_layers=int(data.get("num_nextn_predict_layers", 0) or 0),
            tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
            bos_token_id=data.get("bos_token_id"),
            eos_token_id=data.get("eos_token_id"),
            quantization_config=data.get("quantization_config"),
            torch_dtype=str(data.get("torch_dtype", data.get("dtype", "bfloat16"))),
            raw=data,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Parse ``path`` (a config.json, or a checkpoint directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"{path}: no such file (a checkpoint needs config.json)") from exc
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(data, source=str(path))


@dataclass(frozen=True)
class EngineConfig:
    """Settings of one serving engine instance (the ``matrixinfer serve``/``worker`` flags are
    generated from these fields by :mod:`matrixinfer.cli_args`).

    Attributes:
        model: checkpoint directory (default: the built-in model).
        served_model_name: the id clients pass as ``model`` (default: the directory's name).
        device: ``cpu``, ``cuda`` or ``cuda:N`` (default: cuda when available).
        dtype: runtime dtype (default: bfloat16 on CUDA, float32 on CPU).
        block_size: tokens per KV block.
        kv_cache_memory: bytes for the KV cache; overrides ``kv_cache_fraction`` when set.
        kv_cache_fraction: fraction of available memory (host RAM on CPU, free GPU memory after
            the weights on CUDA) given to the KV cache.
        kv_cache_dtype: ``auto`` stores latents in the runtime dtype; ``int8`` stores them as INT8 with
            per-token scales (2x the tokens of a bfloat16 cache, 4x of float32; PyTorch attention only).
        max_num_seqs: most sequences running at once.
        max_num_batched_tokens: token budget per step (chunked prefill splits longer prompts).
        max_model_len: longest prompt + output (default: the model's max_position_embeddings).
        enable_prefix_caching: share KV blocks between requests with a common prefix.
        cache_namespace: namespace mixed into prefix hashes (default: the served model name).
        store_generated_kv: PDC: decode instances also store the KV blocks they generate in the
            EMS context cache (by default only prompt blocks are stored, as in the reference design).
        speculative: speculative decoding method: ``mtp`` drafts with the checkpoint's
            multi-token-prediction module and verifies the drafts in one forward pass (default: off).
        num_speculative_tokens: draft tokens per step with --speculative (more than one runs the
            checkpoint's first MTP module recursively on its own output).
        speculative_max_batch: speculate only in steps with at most this many decoding sequences
            (default: decided per step from step costs measured at start-up and while serving, and the
            measured acceptance; 0: never).
        ep: expert-parallel ranks of this instance: every rank runs attention for its own requests
            (DP attention) and holds a share of the routed experts (EP MoE); 1 is one process.
        dispatch_dtype: dtype of the tokens dispatched to the expert ranks (int8: per-token INT8 with
            its scale, half the bytes of bf16); the combine returns the model's dtype.
        ep_timeout: seconds a rank waits in a collective before it declares the instance failed.
        nnodes: hosts the EP ranks are spread over (--ep divided evenly; rank 0 is on node 0).
        node_rank: this host's index among --nnodes (node 0 serves the API).
        master_addr: address of node 0 where the ranks meet (torchrun's MASTER_ADDR).
        master_port: port of that meeting point (default: a free port; required with --nnodes > 1).
        redundant_experts: extra routed-expert slots spread over the EP ranks (--ep must divide the
            experts + this), holding copies of hot experts; a token goes to one copy.
        eplb_interval: steps between live expert rebalances of an EP instance (each MoE layer
            re-placed from the load routed since the last one, moving few experts; 0: never).
        eplb_target: busiest rank's expert load over the mean that a live rebalance aims for.
        microbatches: 2 splits each forward pass of an EP instance (--ep >= 2) into two
            microbatches, so that one's dispatch/combine is in flight while the other computes
            (the reference design's two-microbatch pipeline); 1 runs the batch whole.
        cpu_bind: CPU engines: pin the engine thread's OpenMP threads to CPUs, one each. ``auto``
            pins where the engine's threads take every core the process may use (the colocated
            engine; engines that share a host's cores are left unpinned), ``none`` never, and a
            list (``0,1``, ``0-3``) pins thread i to the i-th CPU listed.
    """

    model: str | None = None
    served_model_name: str | None = None
    device: str | None = None
    dtype: str | None = field(default=None, metadata={"choices": ["float32", "bfloat16", "float16"]})
    block_size: int = 16
    kv_cache_memory: int | None = None
    kv_cache_fraction: float = 0.05
    kv_cache_dtype: str = field(default="auto", metadata={"choices": ["auto", "int8"]})
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 1024
    max_model_len: int | None = None
    enable_prefix_caching: bool = field(default=True, metadata={"flag": "--no-prefix-caching"})
    cache_namespace: str | None = None
    store_generated_kv: bool = field(default=False, metadata={"flag": "--store-decode-kv"})
    speculative: str | None = field(default=None, metadata={"choices": ["mtp"]})
    num_speculative_tokens: int = 1
    speculative_max_batch: int | None = None
    ep: int = 1
    dispatch_dtype: str = field(default="fp32", metadata={"choices": ["fp32", "bf16", "int8"]})
    ep_timeout: float = 20.0
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    redundant_experts: int = 0
    eplb_interval: int = 0
    eplb_target: float = 1.05
    microbatches: int = field(default=1, metadata={"choices": [1, 2]})
    cpu_bind: str = "auto"

    def __post_init__(self) -> None:
        if self.ep < 1 or self.nnodes < 1 or self.ep % self.nnodes:
            raise ValueError(f"ep ({self.ep}) must be a positive multiple of nnodes ({self.nnodes})")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} is outside 0..{self.nnodes - 1}")
        if self.dispatch_dtype not in ("fp32", "bf16", "int8"):
            raise ValueError(f"dispatch_dtype must be fp32, bf16 or int8, got {self.dispatch_dtype!r}")
        if self.ep_timeout <= 0:
            raise ValueError(f"ep_timeout must be positive, got {self.ep_timeout}")
        if self.ep > 1 and self.speculative is not None:
            raise ValueError("speculative decoding is not supported with ep > 1 (the MTP passes would break the "
                             "ranks' lockstep)")
        if self.redundant_experts < 0 or self.eplb_interval < 0:
            raise ValueError(f"redundant_experts ({self.redundant_experts}) and eplb_interval ({self.eplb_interval}) "
                             f"must be >= 0")
        if self.microbatches not in (1, 2):
            raise ValueError(f"microbatches must be 1 or 2, got {self.microbatches}")
        if not self.eplb_target >= 1.0:
            raise ValueError(f"eplb_target is the busiest rank's load over the mean: >= 1.0, got {self.eplb_target}")
        if self.nnodes > 1 and self.master_port is None:
            raise ValueError("--master-port is required with --nnodes > 1 (every node must meet at the same port)")
        if self.speculative not in (None, "mtp"):
            raise ValueError(f"speculative must be 'mtp' or unset, got {self.speculative!r}")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be at least 1, got {self.num_speculative_tokens}")
        if self.speculative_max_batch is not None and self.speculative_max_batch < 0:
            raise ValueError(f"speculative_max_batch must be >= 0, got {self.speculative_max_batch}")
        if self.kv_cache_dtype not in ("auto", "int8"):
            raise ValueError(f"kv_cache_dtype must be 'auto' or 'int8', got {self.kv_cache_dtype!r}")
        from matrixinfer.engine.cpu_affinity import check_setting

        check_setting(self.cpu_bind)
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be a positive number of bytes, got {self.kv_cache_memory}")
        if not 0 < self.kv_cache_fraction <= 1:
            raise ValueError(f"kv_cache_fraction must be in (0, 1], got {self.kv_cache_fraction}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")


@dataclass(frozen=True)
class ServeConfig:
    """Settings of a deployment on one host: the API server and, in PDC mode, how many instances
    of each pool the launcher starts (``matrixinfer serve`` flags, generated from these fields).

    Attributes:
        host: bind address of the API, the router's control port and EMS servers (default: loopback only).
        port: HTTP port of the API.
        api_key: require 'Authorization: Bearer KEY' on /v1 (default: $MATRIXINFER_API_KEY).
        log_level: uvicorn and logging level.
        colocated: one process, one engine (no P/D disaggregation).
        num_prefill: prefill instances (PDC mode).
        num_decode: decode instances (PDC mode).
        num_ems: EMS memory-pool servers (PDC mode; 0 disables the pool).
        ems_capacity: DRAM per EMS server, e.g. 4G.
        router_port: control port where workers join (default: --port + 1).
        reserve_timeout: seconds a decode instance holds blocks for a KV transfer that does not arrive.
        frozen_after: seconds an instance may stay silent (it reports its load every 0.2 s) before the
            router stops routing to it and ends or retries its requests (stopped, hung, cut off).
        prefill_kv_cache_memory: KV cache bytes of each prefill instance (default: --kv-cache-memory).
        decode_kv_cache_memory: KV cache bytes of each decode instance (default: --kv-cache-memory).
        worker_threads: torch threads per worker process (default: the cores shared among workers).
        max_request_bytes: largest HTTP request body in bytes; larger ones are refused with 413.
        request_read_timeout: seconds a client has to send a whole request (headers and body) once it
            starts; a slower one is disconnected (a byte-at-a-time client would otherwise hold its
            connection forever).
        max_connections: open HTTP connections at most; more are closed as they arrive.
        secret_file: file (mode 0600) with the deployment secret that workers and EMS servers must prove
            (default: $MATRIXINFER_SECRET, then $MATRIXINFER_SECRET_FILE, else a new one in a private file).
        reasoning_parser: split chat answers into ``reasoning_content`` and ``content``
            (``deepseek-r1``: ``<think>...</think>``, as vLLM and SGLang do).
        protect_metrics: with --api-key, /metrics needs the key too (off by default, as in vLLM, so that
            scrapers without a bearer token keep working; /health and /version stay open).
        chat_template: a Jinja chat template file used instead of the checkpoint's.
        tool_call_parser: accept ``tools`` / ``tool_choice`` and return ``tool_calls`` (``deepseek``:
            DeepSeek-V3/R1 tool-call markup); without one, ``tools`` get a 400.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    log_level: str = "info"
    colocated: bool = False
    num_prefill: int = 1
    num_decode: int = 1
    num_ems: int = 1
    ems_capacity: str = "512M"
    router_port: int | None = None
    reserve_timeout: float = 30.0
    frozen_after: float = 10.0
    prefill_kv_cache_memory: int | None = None
    decode_kv_cache_memory: int | None = None
    worker_threads: int | None = None
    max_request_bytes: int = 16 << 20
    request_read_timeout: float = 30.0
    max_connections: int = 2048
    secret_file: str | None = None
    reasoning_parser: str | None = field(default=None, metadata={"choices": ["deepseek-r1"]})
    protect_metrics: bool = False
    chat_template: str | None = None
    tool_call_parser: str | None = field(default=None, metadata={"choices": ["deepseek"]})

    def __post_init__(self) -> None:
        # 0 local instances is valid: workers on other hosts join with `matrixinfer worker --router`
        if min(self.num_prefill, self.num_decode, self.num_ems) < 0:
            raise ValueError(f"instance counts cannot be negative (prefill {self.num_prefill}, "
                             f"decode {self.num_decode}, EMS {self.num_ems})")
        if self.reserve_timeout <= 0:
            raise ValueError(f"reserve_timeout must be positive, got {self.reserve_timeout}")
        if self.frozen_after <= 0:
            raise ValueError(f"frozen_after must be positive, got {self.frozen_after}")
        if self.request_read_timeout <= 0 or self.max_connections < 1:
            raise ValueError(f"request_read_timeout must be positive and max_connections at least 1, got "
                             f"{self.request_read_timeout} and {self.max_connections}")

    @property
    def control_port(self) -> int:
        return self.router_port if self.router_port is not None else self.port + 1
