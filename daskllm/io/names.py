"""The one table from Hugging Face tensor names to ours, and the shape each tensor must have.

Our names: embed, norm, lm_head, and per layer i `layers.{i}.<part>` with parts
attn_norm, mlp_norm, wq wk wv wo, bq bk bv, q_norm k_norm, w_gate w_up w_down (dense MLP),
router, experts.{e}.w_gate|w_up|w_down, shared.w_gate|w_up|w_down, shared_gate.
Matrices keep the checkpoint's (out, in) layout.
"""
from __future__ import annotations

import re

from ..model.config import ModelConfig

# (Hugging Face pattern, our name); {i} is the layer, {e} the expert.
HF_TO_OURS = [
    (r"model\.embed_tokens\.weight", "embed"),
    (r"model\.norm\.weight", "norm"),
    (r"lm_head\.weight", "lm_head"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "layers.{i}.attn_norm"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "layers.{i}.mlp_norm"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", "layers.{i}.wq"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", "layers.{i}.wk"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", "layers.{i}.wv"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", "layers.{i}.wo"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.bias", "layers.{i}.bq"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.bias", "layers.{i}.bk"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.bias", "layers.{i}.bv"),
    (r"model\.layers\.(\d+)\.self_attn\.q_norm\.weight", "layers.{i}.q_norm"),
    (r"model\.layers\.(\d+)\.self_attn\.k_norm\.weight", "layers.{i}.k_norm"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", "layers.{i}.w_gate"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", "layers.{i}.w_up"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "layers.{i}.w_down"),
    # Mixtral names its MoE block and expert matrices differently (w1 gate, w3 up, w2 down).
    (r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight", "layers.{i}.router"),
    (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w1\.weight", "layers.{i}.experts.{e}.w_gate"),
    (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w3\.weight", "layers.{i}.experts.{e}.w_up"),
    (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w2\.weight", "layers.{i}.experts.{e}.w_down"),
    (r"model\.layers\.(\d+)\.mlp\.gate\.weight", "layers.{i}.router"),
    (r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.gate_proj\.weight", "layers.{i}.experts.{e}.w_gate"),
    (r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.up_proj\.weight", "layers.{i}.experts.{e}.w_up"),
    (r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.down_proj\.weight", "layers.{i}.experts.{e}.w_down"),
    (r"model\.layers\.(\d+)\.mlp\.shared_expert\.gate_proj\.weight", "layers.{i}.shared.w_gate"),
    (r"model\.layers\.(\d+)\.mlp\.shared_expert\.up_proj\.weight", "layers.{i}.shared.w_up"),
    (r"model\.layers\.(\d+)\.mlp\.shared_expert\.down_proj\.weight", "layers.{i}.shared.w_down"),
    (r"model\.layers\.(\d+)\.mlp\.shared_expert_gate\.weight", "layers.{i}.shared_gate"),
]
_COMPILED = [(re.compile(p + r"\Z"), ours) for p, ours in HF_TO_OURS]

# Tensors a checkpoint may carry that inference does not use.
IGNORED = [re.compile(p) for p in (r".*rotary_emb\.inv_freq\Z",)]


def hf_to_ours(hf_name: str) -> str | None:
    """Our name for a Hugging Face tensor name, or None if the table has no entry."""
    for pattern, ours in _COMPILED:
        m = pattern.match(hf_name)
        if m:
            groups = m.groups()
            return ours.format(i=groups[0] if groups else "", e=groups[1] if len(groups) > 1 else "")
    return None


def ours_to_hf(ours: str, family: str) -> str | None:
    """The Hugging Face name a checkpoint of `family` uses for our tensor `ours` (for messages)."""
    numbers = re.findall(r"\d+", ours)
    for pattern, template in HF_TO_OURS:
        if ("block_sparse_moe" in pattern) != (family == "mixtral") and ("experts" in ours or "router" in ours):
            continue
        filled = template.format(i=numbers[0] if numbers else "", e=numbers[1] if len(numbers) > 1 else "")
        if filled == ours:
            hf = pattern
            for n in numbers[: pattern.count("(")]:
                hf = hf.replace(r"(\d+)", n, 1)
            return hf.replace("\\.", ".")
    return None


def is_ignored(hf_name: str) -> bool:
    return any(p.match(hf_name) for p in IGNORED)


def expected_shapes(cfg: ModelConfig) -> dict:
    """Every tensor the model needs, by our name, with its full (unsplit) shape."""
    d, hd, v = cfg.hidden_size, cfg.head_dim, cfg.vocab_size
    q_out, kv_out = cfg.n_heads * hd, cfg.n_kv_heads * hd
    shapes = {"embed": (v, d), "norm": (d,)}
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (v, d)
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes.update({p + "attn_norm": (d,), p + "mlp_norm": (d,),
                       p + "wq": (q_out, d), p + "wk": (kv_out, d), p + "wv": (kv_out, d), p + "wo": (d, q_out)})
        if cfg.qkv_bias:
            shapes.update({p + "bq": (q_out,), p + "bk": (kv_out,), p + "bv": (kv_out,)})
        if cfg.qk_norm == "head":
            shapes.update({p + "q_norm": (hd,), p + "k_norm": (hd,)})
        elif cfg.qk_norm == "full":
            shapes.update({p + "q_norm": (q_out,), p + "k_norm": (kv_out,)})
        if cfg.is_moe_layer(i):
            m = cfg.moe
            shapes[p + "router"] = (m.n_experts, d)
            for e in range(m.n_experts):
                shapes.update(_mlp_shapes(f"{p}experts.{e}.", d, m.intermediate_size))
            if m.shared_intermediate_size:
                shapes.update(_mlp_shapes(p + "shared.", d, m.shared_intermediate_size))
                shapes[p + "shared_gate"] = (1, d)
        else:
            shapes.update(_mlp_shapes(p, d, cfg.intermediate_size))
    return shapes


def _mlp_shapes(prefix, d, width):
    return {prefix + "w_gate": (width, d), prefix + "w_up": (width, d), prefix + "w_down": (d, width)}
