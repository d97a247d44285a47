"""Write small random Hugging Face checkpoints (config.json + safetensors) of shapes the fixtures lack.

Llama (dense) or Qwen2-MoE (biases, routed experts and a shared expert), with any head
counts and widths, so tensor-parallel tests can cut heads, MLPs and vocabularies unevenly.
Weights are N(0, scale^2), norm weights 1 + 0.1 N(0, 1), routers N(0, 0.3^2).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file


def write_checkpoint(path, *, family="llama", hidden=48, layers=2, heads=6, kv_heads=3, head_dim=None,
                     intermediate=100, vocab=385, tie=False, experts=4, top_k=2, expert_width=50,
                     shared_width=70, seed=0, dtype=np.float32, scale=0.1, max_position=512) -> Path:
    """Write the checkpoint into directory `path` (created) and return it.

    family: "llama" or "qwen2_moe" (every layer sparse, q/k/v biases, shared expert).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hd = head_dim or hidden // heads
    rng = np.random.default_rng(seed)

    def mat(*shape):
        return (scale * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)

    def norm(n):
        return (1 + 0.1 * rng.standard_normal(n, dtype=np.float32)).astype(dtype)

    def mlp(prefix, width):
        return {f"{prefix}.gate_proj.weight": mat(width, hidden), f"{prefix}.up_proj.weight": mat(width, hidden),
                f"{prefix}.down_proj.weight": mat(hidden, width)}

    moe = family == "qwen2_moe"
    t = {"model.embed_tokens.weight": mat(vocab, hidden), "model.norm.weight": norm(hidden)}
    if not tie:
        t["lm_head.weight"] = mat(vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": norm(hidden), p + "post_attention_layernorm.weight": norm(hidden),
                  p + "self_attn.q_proj.weight": mat(heads * hd, hidden),
                  p + "self_attn.k_proj.weight": mat(kv_heads * hd, hidden),
                  p + "self_attn.v_proj.weight": mat(kv_heads * hd, hidden),
                  p + "self_attn.o_proj.weight": mat(hidden, heads * hd)})
        if moe:
            t.update({p + "self_attn.q_proj.bias": mat(heads * hd), p + "self_attn.k_proj.bias": mat(kv_heads * hd),
                      p + "self_attn.v_proj.bias": mat(kv_heads * hd),
                      p + "mlp.gate.weight": (0.3 / scale * mat(experts, hidden)).astype(dtype),
                      p + "mlp.shared_expert_gate.weight": mat(1, hidden)})
            for e in range(experts):
                t.update(mlp(f"{p}mlp.experts.{e}", expert_width))
            t.update(mlp(p + "mlp.shared_expert", shared_width))
        else:
            t.update(mlp(p + "mlp", intermediate))
    save_file(t, str(path / "model.safetensors"))

    config = {"architectures": ["Qwen2MoeForCausalLM" if moe else "LlamaForCausalLM"],
              "model_type": family, "hidden_size": hidden, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": hd,
              "intermediate_size": intermediate, "vocab_size": vocab, "max_position_embeddings": max_position,
              "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": tie,
              "bos_token_id": 0, "eos_token_id": 1}
    if moe:
        config.update({"num_experts": experts, "num_experts_per_tok": top_k, "moe_intermediate_size": expert_width,
                       "shared_expert_intermediate_size": shared_width, "norm_topk_prob": False,
                       "decoder_sparse_step": 1, "mlp_only_layers": [], "use_sliding_window": False,
                       "qkv_bias": True})
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return path
