"""Mixture-of-experts MLP: router, top-k choice, experts, shared expert (Mixtral, Qwen-MoE, OLMoE).

Legend: N tokens, D hidden, E experts, A active experts per token, I expert width.
"""
from __future__ import annotations

import numpy as np

from .layers import array_module, gated_mlp


def route(x, router_weight, top_k, norm_topk_prob):
    """Choose each token's experts.  x (N, D), router (E, D) -> ids (N, A) int64, weights (N, A) float32.

    All supported families take softmax over all E router logits, keep the A largest
    probabilities, and (norm_topk_prob) rescale them to sum to 1 (Mixtral always does).
    """
    xp = array_module(x)
    logits = x @ router_weight.T                                   # (N, E)
    logits = logits - logits.max(axis=-1, keepdims=True)
    probs = xp.exp(logits)
    probs /= probs.sum(axis=-1, keepdims=True)
    ids = xp.argsort(-probs, axis=-1, kind="stable")[:, :top_k]    # (N, A), highest first
    weights = xp.take_along_axis(probs, ids, axis=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return ids.astype(np.int64), weights.astype(np.float32)


def run_expert(weights, x):
    """One expert (a gated MLP) on the tokens routed to it.  (n, D) -> (n, D)"""
    return gated_mlp(x, weights["w_gate"], weights["w_up"], weights["w_down"])


def combine_local(x, expert_ids, expert_weights, experts, run=run_expert):
    """sum_a weight[n, a] * expert[ids[n, a]](x[n]) over the experts held in `experts`.

    Tokens routed to an expert that `experts` does not hold contribute nothing here
    (expert parallelism sums the contributions of all ranks).
    """
    xp = array_module(x)
    out = xp.zeros_like(x)
    for e, weights in experts.items():
        token_idx, slot = xp.nonzero(expert_ids == e)               # tokens that chose expert e
        if token_idx.shape[0] == 0:
            continue
        y = run(weights, x[token_idx])                               # (n_e, D)
        out[token_idx] += expert_weights[token_idx, slot][:, None] * y
    return out


def tokens_per_expert(expert_ids, n_experts):
    """How many (token, slot) pairs chose each expert.  (N, A) -> (E,) int64"""
    xp = array_module(expert_ids)
    return xp.bincount(expert_ids.reshape(-1), minlength=n_experts).astype(np.int64)


def moe_mlp(x, layer_params, moe_cfg, seams, stats=None, layer=None):
    """The MoE block: routed experts (through the `experts` seam) plus the optional shared expert."""
    ids, weights = route(x, layer_params["router"], moe_cfg.top_k, moe_cfg.norm_topk_prob)
    if stats is not None:
        stats.record_routing(layer, ids, moe_cfg.n_experts)
    out = seams.experts(x, ids, weights, layer_params["experts"], run_expert)
    shared = layer_params.get("shared")
    if shared is not None:
        gate = x @ layer_params["shared_gate"].T                     # (N, 1)
        out = out + (1.0 / (1.0 + array_module(x).exp(-gate))) * run_expert(shared, x)
    return out
