"""The pure pieces of a decoder layer: norm, RoPE, partial attention and its merge, gated MLP.

Legend: T tokens, Tq query tokens, Tk key tokens, H query heads, Hkv KV heads,
G = H / Hkv query heads per KV head, hd head dim, D hidden, I MLP width.
Every function computes on the array module of its inputs (numpy or cupy).
"""
from __future__ import annotations

import math

import numpy as np

from .. import kernels
from ..kernels import matmul
from .config import RopeConfig


def array_module(x):
    """numpy or cupy, whichever owns `x`."""
    mod = type(x).__module__
    if mod.startswith("cupy"):
        import cupy
        return cupy
    return np


def rms_norm(x, weight, eps):
    """x * weight / rms(x), over the last dim, in float32."""
    if kernels.on_cpu(x):
        return kernels.rms_norm_rows(x, weight, eps)          # one compiled call, any number of rows
    xp = array_module(x)
    var = (x * x).sum(axis=-1, keepdims=True) / x.shape[-1]     # xp.mean's result, without its per-call overhead
    return x * (1.0 / xp.sqrt(var + eps)) * weight


def silu(x):
    """x * sigmoid(x), into one new array (a prefill's MLP activations are megabytes)."""
    xp = array_module(x)
    out = xp.negative(x)
    with np.errstate(over="ignore"):          # exp(-x) = inf for x < -88: x / inf = -0, right
        xp.exp(out, out=out)
    out += 1
    return xp.divide(x, out, out=out)


def gated_mlp(x, w_gate_up, w_down):
    """down(silu(gate(x)) * up(x)), gate and up stacked in one (2I, D) matrix.  (T, D) -> (T, D)

    Weights of any layout (kernels.formats); `matmul(x, W)` is x @ W.T.
    """
    h = matmul(x, w_gate_up)                                                 # (T, 2I)
    width = w_gate_up.shape[0] // 2
    if kernels.on_cpu(h):
        return matmul(kernels.gated_silu(h, width), w_down)                    # compiled: exp vectorised
    return matmul(silu(h[:, :width]) * h[:, width:], w_down)


# -- rotary position embedding ---------------------------------------------------------

def rope_inv_freq(rope: RopeConfig, head_dim: int):
    """The rotation frequency of each pair of dims, after linear or llama3 scaling.  (hd/2,)"""
    inv_freq = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if rope.type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.type == "llama3":
        # Stretch long wavelengths by `factor`, keep short ones, blend in between (Llama 3.1).
        low_wavelen = rope.original_max_position / rope.low_freq_factor
        high_wavelen = rope.original_max_position / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor)
        blended = (1 - smooth) * inv_freq / rope.factor + smooth * inv_freq
        inv_freq = np.where(wavelen > low_wavelen, inv_freq / rope.factor,
                            np.where(wavelen < high_wavelen, inv_freq, blended))
    return inv_freq.astype(np.float32)


def rope_cos_sin(inv_freq, positions):
    """cos and sin for each position, halves repeated as Hugging Face's rotate_half expects.  (T, hd)"""
    angles = positions.astype(np.float32)[:, None] * inv_freq[None, :]    # (T, hd/2)
    xp = array_module(angles)
    angles = xp.concatenate([angles, angles], axis=-1)                     # (T, hd)
    return xp.cos(angles), xp.sin(angles)


def apply_rope(x, cos, sin):
    """Rotate each head of x by its token's position.  x (T, heads, hd), cos/sin (T, hd)"""
    if kernels.on_cpu(x):
        return kernels.rope_rows(x, cos, sin)                 # one compiled call, any number of rows
    xp = array_module(x)
    half = x.shape[-1] // 2
    rotated = xp.concatenate([-x[..., half:], x[..., :half]], axis=-1)     # rotate_half
    return x * cos[:, None, :] + rotated * sin[:, None, :]


# -- attention, built from partials ----------------------------------------------------

def attention_partial(q, k, v, q_pos, k_pos, scale, window=None):
    """Causal attention of q over one block of keys, with the log-sum-exp needed to merge blocks.

    q (Tq, H, hd), k and v (Hkv, Tk, hd), q_pos (Tq,), k_pos (Tk,) global positions.
    A query sees a key when k_pos <= q_pos (and q_pos - k_pos < window, if a window is set).
    Returns out (Tq, H, hd), normalised over this block, and lse (Tq, H); a query that sees
    no key in the block gets out 0 and lse -inf, so merging ignores it.
    """
    xp = array_module(q)
    tq, n_heads, hd = q.shape
    n_kv = k.shape[0]
    g = n_heads // n_kv
    visible = k_pos[None, :] <= q_pos[:, None]                                       # (Tq, Tk)
    if window is not None:
        visible &= (q_pos[:, None] - k_pos[None, :]) < window
    sees_all = k.shape[1] > 0 and bool(visible.all())    # e.g. every decode step: no mask, no empty rows
    if sees_all:
        fused = kernels.attend_all_keys(q, k, v, scale)  # a decode step on the CPU: one compiled call
        if fused is not None:
            return fused
    # Scores are Tk times larger than q, so scale q, and work on the scores in place: a
    # 512-token prefill's attention took 60 ms per layer with a new array per step, 32 without.
    qg = (q * scale).reshape(tq, n_kv, g, hd).transpose(1, 2, 0, 3).reshape(n_kv, g * tq, hd)  # (Hkv, G*Tq, hd)
    scores = (qg @ k.transpose(0, 2, 1)).reshape(n_kv, g, tq, -1)                   # (Hkv, G, Tq, Tk)
    if kernels.on_cpu(scores):                          # mask, max, exp and sum in one compiled pass
        row_max, total = kernels.masked_softmax(scores, q_pos, k_pos, window)       # (Hkv, G, Tq, 1) each
    else:
        row_max, total = _softmax_in_place(scores, visible, sees_all)
    probs = scores                                                                  # (Hkv, G, Tq, Tk)
    out = (probs.reshape(n_kv, g * tq, -1) @ v).reshape(n_kv, g, tq, hd)            # (Hkv, G, Tq, hd)
    with np.errstate(divide="ignore"):                  # a query that sees no key: total 0, lse -inf
        out = out / xp.where(total > 0, total, xp.float32(1))
        lse = xp.log(total[..., 0]) + row_max[..., 0]                                # (Hkv, G, Tq)
    out = out.transpose(2, 0, 1, 3).reshape(tq, n_heads, hd)
    lse = lse.transpose(2, 0, 1).reshape(tq, n_heads)
    return out, lse


def _softmax_in_place(scores, visible, sees_all):
    """scores -> exp(scores - row max) in place, masked keys 0.  -> row max (0 where no key is
    visible) and row sum, each (..., 1)."""
    xp = array_module(scores)
    if not sees_all:
        scores += xp.where(visible, xp.float32(0), xp.float32(-xp.inf))             # masked: -inf
    row_max = scores.max(axis=-1, keepdims=True) if scores.shape[-1] else xp.full(scores.shape[:-1] + (1,), -xp.inf, scores.dtype)
    safe_max = row_max if sees_all else xp.where(xp.isfinite(row_max), row_max, xp.float32(0))
    scores -= safe_max
    xp.exp(scores, out=scores)
    return safe_max, scores.sum(axis=-1, keepdims=True)


def merge_partials(outs, lses):
    """Combine attention over disjoint key blocks: softmax-weight each block by its lse.

    outs: list of (Tq, H, hd), lses: list of (Tq, H)  ->  out (Tq, H, hd), lse (Tq, H).
    Numerically stable; a block with lse -inf contributes nothing.
    """
    xp = array_module(outs[0])
    if len(outs) == 1:
        return outs[0], lses[0]
    lse_stack = xp.stack(lses)                                   # (B, Tq, H)
    top = lse_stack.max(axis=0)
    top = xp.where(xp.isfinite(top), top, 0.0)
    weights = xp.exp(lse_stack - top)                            # (B, Tq, H)
    total = weights.sum(axis=0)
    out = sum(w[..., None] * o for w, o in zip(weights, outs))
    with np.errstate(divide="ignore"):
        out = out / xp.where(total > 0, total, 1.0)[..., None]
        lse = xp.log(total) + top
    return out, lse


def blockwise_attention(q, k, v, q_pos, k_pos, scale, window=None, block=128, key_block=512):
    """attention_partial in tiles of `block` queries x up to `key_block` keys, merged by log-sum-exp.

    Same result as one attention_partial call, but scores take O(block x key_block) memory
    instead of O(Tq x Tk) (4 MB for 16 heads), and each query tile only meets the keys it can
    see: with keys in position order (a local cache, a sequence shard), the span up to its last
    query (and back to its window), so a causal prefill skips nearly half the scores; in any
    other order, the key tiles of which it sees at least one.
    128 x 512 measured (16/8 heads, hd 64, 2 threads, compiled softmax) against the 256 x 256
    tiles before it: a 512-token prefill's attention 18-20 against 23-25 ms per layer, 2048
    tokens 149-187 against 177-284 ms (fewer masked scores computed; fewer merges).
    q (Tq, H, hd), k and v (Hkv, Tk, hd) -> out (Tq, H, hd), lse (Tq, H).
    """
    xp = array_module(q)
    if q.shape[0] * k.shape[1] <= block * key_block:     # e.g. a decode step over up to 65536 keys: one call
        return attention_partial(q, k, v, q_pos, k_pos, scale, window)
    spans = _key_spans(k_pos, window, key_block)
    outs, lses = [], []
    for i in range(0, q.shape[0], block):
        qb, pb = q[i:i + block], q_pos[i:i + block]
        parts = [attention_partial(qb, k[:, j:end], v[:, j:end], pb, k_pos[j:end], scale, window)
                 for j, end in spans(int(pb.min()), int(pb.max()))]
        if not parts:                       # nothing visible: zeros and -inf, as attention_partial gives
            parts = [(xp.zeros_like(qb), xp.full(qb.shape[:2], -xp.inf, qb.dtype))]
        out, lse = merge_partials([p[0] for p in parts], [p[1] for p in parts])
        outs.append(out)
        lses.append(lse)
    return xp.concatenate(outs), xp.concatenate(lses)


def _key_spans(k_pos, window, key_block):
    """-> spans(q_lo, q_hi): the [j, end) key ranges, at most key_block long, that queries at
    positions q_lo .. q_hi need (each holds at least one key some query of them sees)."""
    k_pos = np.asarray(k_pos.get() if hasattr(k_pos, "get") else k_pos)      # positions: small, host-side
    n = len(k_pos)
    if bool(np.all(k_pos[1:] >= k_pos[:-1])):                                  # in order: one span
        def spans(q_lo, q_hi):
            end = int(np.searchsorted(k_pos, q_hi, "right"))                   # keys at <= q_hi
            start = 0 if window is None else int(np.searchsorted(k_pos, q_lo - window, "right"))
            return [(j, min(j + key_block, end)) for j in range(start, end, key_block)]
        return spans
    tiles = [(j, min(j + key_block, n)) for j in range(0, n, key_block)]
    first = [int(k_pos[j:end].min()) for j, end in tiles]
    last = [int(k_pos[j:end].max()) for j, end in tiles]

    def spans(q_lo, q_hi):
        return [tile for tile, lo, hi in zip(tiles, first, last)
                if lo <= q_hi and (window is None or hi > q_lo - window)]
    return spans
