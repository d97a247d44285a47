"""ModelConfig: the architecture read from a Hugging Face config.json, checked once."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

DENSE_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
MOE_ARCHITECTURES = {
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "OlmoeForCausalLM": "olmoe",
}
SUPPORTED = {**DENSE_ARCHITECTURES, **MOE_ARCHITECTURES}
ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModelError(ValueError):
    """The checkpoint asks for something daskllm does not implement (never approximated)."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"          # default | linear | llama3
    factor: float = 1.0            # linear and llama3: how much the context was stretched
    low_freq_factor: float = 1.0   # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position: int = 8192  # llama3 only: the pre-training context

    def __post_init__(self):
        if self.type not in ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope type {self.type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
        if self.factor <= 0:
            raise ValueError(f"rope scaling factor must be > 0, got {self.factor}")


@dataclass(frozen=True)
class MoeConfig:
    n_experts: int
    top_k: int                      # experts chosen per token
    intermediate_size: int          # hidden width of one expert
    norm_topk_prob: bool            # renormalise the chosen experts' weights to sum to 1
    shared_intermediate_size: int = 0   # Qwen2-MoE shared expert (0 = none)
    sparse_layers: tuple = ()       # indices of layers whose MLP is a MoE

    def __post_init__(self):
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"experts per token ({self.top_k}) must be in 1..{self.n_experts} (num_experts)")


@dataclass(frozen=True)
class ModelConfig:
    family: str                     # llama | mistral | qwen2 | qwen3 | mixtral | qwen2_moe | qwen3_moe | olmoe
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int                 # == n_heads: MHA; 1: MQA; else GQA
    head_dim: int
    intermediate_size: int          # dense MLP width
    max_position: int               # longest sequence the model accepts
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_embeddings: bool = False
    qkv_bias: bool = False          # Qwen2 family
    qk_norm: str = "none"           # none | head (Qwen3: RMSNorm per head) | full (OLMoE: over the whole projection)
    sliding_window: int | None = None   # None: full causal attention
    moe: MoeConfig | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple = ()

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"attention heads ({self.n_heads}) must be a multiple of KV heads ({self.n_kv_heads})")
        if self.qk_norm not in ("none", "head", "full"):
            raise ValueError(f"qk_norm must be none, head or full, got {self.qk_norm!r}")
        for name in ("vocab_size", "hidden_size", "n_layers", "head_dim", "max_position"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def group_size(self) -> int:
        """Query heads sharing one KV head."""
        return self.n_heads // self.n_kv_heads

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer in self.moe.sparse_layers

    def with_(self, **changes) -> "ModelConfig":
        return replace(self, **changes)

    # -- reading Hugging Face configs -------------------------------------------------

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        """Build from the dict of a Hugging Face config.json (transformers 4 or 5 keys)."""
        archs = hf.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED:
            raise UnsupportedModelError(
                f"architecture {arch!r} is not supported; supported: {', '.join(sorted(SUPPORTED))}")
        family = SUPPORTED[arch]
        n_heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        head_dim = hf.get("head_dim") or hidden // n_heads
        n_layers = hf["num_hidden_layers"]
        return cls(
            family=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=head_dim,
            intermediate_size=hf.get("intermediate_size") or 0,
            max_position=hf.get("max_position_embeddings", 2048),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope=_rope_from_hf(hf),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=family in ("qwen2", "qwen2_moe") or bool(hf.get("attention_bias", False)),
            qk_norm={"qwen3": "head", "qwen3_moe": "head", "olmoe": "full"}.get(family, "none"),
            sliding_window=_sliding_window_from_hf(hf, family),
            moe=_moe_from_hf(hf, family, n_layers),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=_as_tuple(hf.get("eos_token_id")),
        )

    @classmethod
    def from_file(cls, path) -> "ModelConfig":
        path = Path(path)
        with open(path) as f:
            return cls.from_hf(json.load(f))


def _as_tuple(value) -> tuple:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _rope_from_hf(hf: dict) -> RopeConfig:
    # transformers 5 folds theta and scaling into `rope_parameters`; 4 has rope_theta + rope_scaling.
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if hf.get("partial_rotary_factor", merged.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedModelError("partial rotary embeddings (partial_rotary_factor != 1) are not supported")
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    return RopeConfig(
        theta=float(theta),
        type=rope_type,
        factor=float(merged.get("factor", 1.0)),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position=int(merged.get("original_max_position_embeddings", 8192)),
    )


def _sliding_window_from_hf(hf: dict, family: str) -> int | None:
    window = hf.get("sliding_window")
    if family in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe"):
        if not hf.get("use_sliding_window", False):
            return None
        # Qwen applies the window only to some layers (max_window_layers): not one mask for all.
        raise UnsupportedModelError(
            f"{family} with use_sliding_window=true (per-layer sliding windows) is not supported")
    if window is None or window >= hf.get("max_position_embeddings", 0):
        return None   # a window as long as the context changes nothing
    return int(window)


def _moe_from_hf(hf: dict, family: str, n_layers: int) -> MoeConfig | None:
    if family not in MOE_ARCHITECTURES.values():
        return None
    n_experts = hf.get("num_local_experts") or hf.get("num_experts")
    top_k = hf["num_experts_per_tok"]
    if family == "mixtral":
        return MoeConfig(n_experts, top_k, hf["intermediate_size"], norm_topk_prob=True,
                         sparse_layers=tuple(range(n_layers)))
    step = hf.get("decoder_sparse_step", 1) or 1
    dense_only = set(hf.get("mlp_only_layers") or ())
    sparse = tuple(i for i in range(n_layers) if i not in dense_only and (i + 1) % step == 0)
    return MoeConfig(
        n_experts, top_k, hf.get("moe_intermediate_size") or hf["intermediate_size"],
        norm_topk_prob=bool(hf.get("norm_topk_prob", family == "qwen3_moe")),
        shared_intermediate_size=hf.get("shared_expert_intermediate_size", 0) if family == "qwen2_moe" else 0,
        sparse_layers=sparse,
    )
