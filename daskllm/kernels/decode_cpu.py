"""Small per-layer pieces in compiled code (numba): RMSNorm and RoPE, and a decode step's attention.

Legend: T rows (a decode step: one per sequence), D width, H query heads, Hkv KV heads,
G = H / Hkv, hd head dim, n keys stored.

At decode sizes each NumPy operation works on a few thousand numbers, so its ~1 us of call
overhead, not the arithmetic, sets the time: RMSNorm is 6 operations (10 us for one 1024-wide
row), RoPE 5 (10 us for 16 heads), and attention a dozen plus a batched matmul per KV head
(~50-110 us for 16/8 heads over 40 keys), paid by every layer of every step. Here each is one
call (1.5 us, 1.5 us, 15-40 us on the same shapes, AMD EPYC, one thread). The arithmetic is
the NumPy path's, in float32; only the order of additions differs (float32 round-off).
RMSNorm and RoPE serve a prefill too: one pass instead of NumPy's 5-6 over megabytes
(512 rows of the 207M Llama: RMSNorm 0.78 -> 0.14 ms, RoPE of q and k 3.4 -> 0.9 ms).

One thread, no parallel launch: the work per call is microseconds, less than waking numba's
threads. nogil, so ranks sharing a process may run them at once. Cached on disk.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

_OPTS = dict(nogil=True, cache=True, fastmath=True)


@njit(**_OPTS)
def rms_norm_rows(x, weight, eps):
    """x * weight / rms(x) over the last dim.  x (..., D) float32, weight (D,) -> (..., D)"""
    rows = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
    out = np.empty_like(rows)
    width = rows.shape[1]
    for r in range(rows.shape[0]):
        total = np.float32(0.0)
        for i in range(width):
            total += rows[r, i] * rows[r, i]
        inv = np.float32(1.0) / np.float32(math.sqrt(total / width + eps))
        for i in range(width):
            out[r, i] = rows[r, i] * inv * weight[i]
    return out.reshape(x.shape)


@njit(**_OPTS)
def rope_rows(x, cos, sin):
    """Each head of x rotated by its row's angles, as layers.apply_rope (rotate_half).

    x (T, heads, hd), cos and sin (T, hd) with halves repeated -> (T, heads, hd)
    """
    rows, heads, hd = x.shape
    half = hd // 2
    out = np.empty((rows, heads, hd), np.float32)
    for t in range(rows):
        for h in range(heads):
            for d in range(half):
                a, b = x[t, h, d], x[t, h, d + half]
                out[t, h, d] = a * cos[t, d] - b * sin[t, d]
                out[t, h, d + half] = b * cos[t, d + half] + a * sin[t, d + half]
    return out


@njit(**_OPTS)
def attend_stored(q, keys, values, n, scale, out, lse):
    """Softmax attention of q over the first n stored keys, all visible (no mask).

    q (T, H, hd); keys and values (Hkv, capacity, hd) C-contiguous, of which [:, :n] is
    used (the KV cache's buffer itself: contiguous rows let the head-dim loops vectorize);
    n >= 1 -> out (T, H, hd) normalised, lse (T, H) the log-sum-exp of the scaled scores.
    """
    rows, n_heads, hd = q.shape
    group = n_heads // keys.shape[0]
    scores = np.empty(n, np.float32)
    acc = np.empty(hd, np.float32)
    for t in range(rows):
        for h in range(n_heads):
            kv = h // group
            top = np.float32(-np.inf)
            for j in range(n):
                s = np.float32(0.0)
                for d in range(hd):
                    s += q[t, h, d] * keys[kv, j, d]
                s *= scale
                scores[j] = s
                top = max(top, s)
            total = np.float32(0.0)
            acc[:] = 0.0
            for j in range(n):
                p = np.float32(math.exp(scores[j] - top))
                total += p
                for d in range(hd):
                    acc[d] += p * values[kv, j, d]
            for d in range(hd):
                out[t, h, d] = acc[d] / total
            lse[t, h] = math.log(total) + top
