"""The decoder-only transformer forward, written once over `xp` and the strategy seams.

Legend: N tokens of the batch (all sequences flattened), B sequences, D hidden,
H / Hkv query / KV heads held by this rank, hd head dim, V vocabulary rows held here.
Head counts come from the weight shapes, so a tensor-parallel rank runs this same code
on its slices.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .. import kernels
from ..kernels import matmul
from .config import ModelConfig
from .layers import apply_rope, array_module, gated_mlp, rms_norm, rope_cos_sin, rope_inv_freq
from .moe import moe_mlp
from .seams import LOCAL, Seams


@dataclass
class Batch:
    """The new tokens of one step for several sequences, flattened.

    tokens (N,) and positions (N,) global positions; sequence b owns the slice
    offsets[b]:offsets[b+1].
    """
    seq_ids: list
    tokens: np.ndarray
    positions: np.ndarray
    offsets: list

    def segments(self):
        """(seq_id, lo, hi) for each sequence."""
        return [(s, self.offsets[i], self.offsets[i + 1]) for i, s in enumerate(self.seq_ids)]

    @classmethod
    def build(cls, seqs):
        """From [(seq_id, token_ids, first_position), ...]."""
        tokens, positions, offsets = [], [], [0]
        for _, ids, start in seqs:
            tokens.extend(ids)
            positions.extend(range(start, start + len(ids)))
            offsets.append(len(tokens))
        return cls([s[0] for s in seqs], np.asarray(tokens, np.int64),
                   np.asarray(positions, np.int64), offsets)


@dataclass
class Weights:
    """One rank's weights, structured: globals plus one dict per layer (see io.names;
    q/k/v and gate/up are fused at load time by io.loader.fuse_projections).
    A pipeline stage holds a run of layers from `first_layer`, and None for the ends it lacks."""
    embed: object                      # (V, D) vocabulary rows held here; None after the first stage
    norm: object                       # (D,); None before the last stage
    lm_head: object                    # (V, D); the embedding itself when tied; None before the last stage
    layers: list = field(default_factory=list)
    vocab_start: int = 0               # global id of the first row of embed / lm_head
    first_layer: int = 0               # global index of layers[0]

    def arrays(self) -> list:
        """Every weight held (each once), any layout."""
        seen, found = set(), []

        def walk(obj):
            if isinstance(obj, dict):
                for v in obj.values():
                    walk(v)
            elif hasattr(obj, "nbytes") and id(obj) not in seen:
                seen.add(id(obj))
                found.append(obj)
        walk({"embed": self.embed, "norm": self.norm, "lm_head": self.lm_head,
              "layers": {i: d for i, d in enumerate(self.layers)}})
        return found

    def has_low_bit(self) -> bool:
        return any(kernels.is_low_bit(w) for w in self.arrays())

    def nbytes(self) -> int:
        """Bytes held, in each weight's own layout (what a rank's memory really holds)."""
        return sum(int(w.nbytes) for w in self.arrays())


class Transformer:
    """Runs the forward of one rank: its weights, its seams, and its KV cache."""

    def __init__(self, cfg: ModelConfig, weights: Weights, seams: Seams = LOCAL, moe_stats=None):
        self.cfg = cfg
        self.weights = weights
        self.seams = seams
        self.moe_stats = moe_stats
        self.xp = array_module(weights.arrays()[0])
        self.inv_freq = rope_inv_freq(cfg.rope, cfg.head_dim)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)

    def forward(self, batch: Batch, cache) -> object:
        """Final hidden states after the last norm.  -> (N, D); None on a pipeline stage before the last."""
        w, xp = self.weights, self.xp
        positions = xp.asarray(batch.positions)
        # The first pipeline stage (or the only one) embeds; a later stage receives the previous one's output.
        x = self.seams.stage_input(lambda: self.seams.embed(w.embed, xp.asarray(batch.tokens)), positions)  # (N, D)
        cos, sin = rope_cos_sin(xp.asarray(self.inv_freq), positions)
        for i, layer in enumerate(w.layers, start=w.first_layer):
            x = x + self.attention(i, layer, rms_norm(x, layer["attn_norm"], self.cfg.rms_norm_eps),
                                   batch, cache, cos, sin)
            x = x + self.mlp(i, layer, rms_norm(x, layer["mlp_norm"], self.cfg.rms_norm_eps))
        x = self.seams.stage_output(x)          # None on a stage before the last: x went on to the next
        return None if x is None else rms_norm(x, w.norm, self.cfg.rms_norm_eps)

    def logits(self, hidden):
        """Logits over the vocabulary rows held here.  (N, D) -> (N, V)"""
        return matmul(hidden, self.weights.lm_head)

    def attention(self, i, layer, x, batch, cache, cos, sin):
        cfg, hd, n = self.cfg, self.cfg.head_dim, x.shape[0]
        qkv = matmul(x, layer["wqkv"])                                                  # (N, (H + 2 Hkv) hd)
        if cfg.qkv_bias:
            qkv = qkv + layer["bqkv"]
        nq, nk, _ = layer["qkv_sizes"]
        q, k, v = qkv[:, :nq], qkv[:, nq:nq + nk], qkv[:, nq + nk:]                 # (N, H*hd), (N, Hkv*hd) x2
        if cfg.qk_norm == "full":                                                   # OLMoE: over the whole projection
            q = self._full_norm(q, layer["q_norm"], cfg.n_heads * hd, "q")
            k = self._full_norm(k, layer["k_norm"], cfg.n_kv_heads * hd, "k")
        q, k, v = q.reshape(n, -1, hd), k.reshape(n, -1, hd), v.reshape(n, -1, hd)  # (N, H, hd), (N, Hkv, hd)
        if cfg.qk_norm == "head":                                                   # Qwen3: per head
            q = rms_norm(q, layer["q_norm"], cfg.rms_norm_eps)
            k = rms_norm(k, layer["k_norm"], cfg.rms_norm_eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = self.seams.attend(i, q, k, v, batch, cache, self.scale, cfg.sliding_window)  # (N, H, hd)
        return self.seams.attention_out(matmul(out.reshape(n, -1), layer["wo"]))   # (N, D)

    def mlp(self, i, layer, x):
        if "router" in layer:
            y = moe_mlp(x, layer, self.cfg.moe, self.seams, self.moe_stats, i)
        else:
            y = gated_mlp(x, layer["w_gate_up"], layer["w_down"])
        return self.seams.mlp_out(y)

    def _full_norm(self, x, weight, full_width, projection):
        """RMSNorm over a projection ("q" or "k") whose columns may be split over ranks.  (N, cols) -> (N, cols)"""
        xp = array_module(x)
        sum_sq = self.seams.heads_sum((x * x).sum(axis=-1, keepdims=True), projection)   # (N, 1)
        return x * (1.0 / xp.sqrt(sum_sq / full_width + self.cfg.rms_norm_eps)) * weight
