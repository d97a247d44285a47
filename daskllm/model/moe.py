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
    return gated_mlp(x, weights["w_gate_up"], weights["w_down"])


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


class ExpertLoad:
    """Tokens routed to each expert, per MoE layer, per step: what one rank's router chose.

    `record_routing` is called by moe_mlp once per MoE layer per forward, layers in
    increasing order; a layer seen again starts a new step (or call `next_step`). The
    last `keep_steps` steps are kept, plus running totals since the last `reset`.
    Every rank counts the tokens its router sees: all tokens with ep alone or tp, its
    own tokens with sp (sum the sp ranks of one tp index for the replica's load).
    Legend: S steps kept, L MoE layers seen, E experts.

    Example
    -------
    >>> load = ExpertLoad(n_layers=2, n_experts=4)
    >>> load.record_routing(0, np.array([[0, 1], [1, 2]]), 4)
    >>> load.as_dict()["total"]
    [[1, 2, 1, 0]]
    """

    def __init__(self, n_layers: int | None = None, n_experts: int = 0, keep_steps: int = 256):
        self.n_layers = n_layers              # informative only: layers appear as they are recorded
        self.n_experts = n_experts            # known up front, so an idle rank reports the right width
        self.keep_steps = keep_steps          # history bound: a long-running rank stays small
        self.reset()

    def reset(self):
        self.steps = []                        # [{layer: (E,) int64}], oldest first, at most keep_steps
        self.totals = {}                       # {layer: (E,) int64} since the last reset
        self._open = False                     # the last step may still get layers

    def next_step(self):
        """Close the current step: the next record starts a new one."""
        self._open = False

    def record_routing(self, layer, ids, n_experts):
        """Count the experts chosen in `layer`.  ids (N, A) expert ids, any array module."""
        ids = ids.get() if hasattr(ids, "get") else np.asarray(ids)
        counts = np.bincount(ids.reshape(-1), minlength=n_experts).astype(np.int64)   # (E,)
        self.n_experts = n_experts
        if not self._open or layer in self.steps[-1]:
            self.steps.append({})
            del self.steps[:-self.keep_steps]
            self._open = True
        self.steps[-1][layer] = counts
        self.totals[layer] = self.totals.get(layer, 0) + counts

    def as_dict(self, steps: bool = True) -> dict:
        """Plain data (ints and lists): layers (L,), total (L, E), steps (S, L, E), zeros where absent.

        steps=False leaves the per-step history out (what a once-a-second reader needs)."""
        layers = sorted(self.totals)
        zero = [0] * self.n_experts
        out = {"n_experts": self.n_experts, "layers": layers, "total": [self.totals[i].tolist() for i in layers]}
        if steps:
            out["steps"] = [[s[i].tolist() if i in s else zero for i in layers] for s in self.steps]
        return out


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
