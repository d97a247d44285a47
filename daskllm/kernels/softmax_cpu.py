"""The exponentials of a step in compiled code (numba): the MLP's gated SiLU, attention's softmax.

Legend: T tokens, I MLP width, B score rows per query (heads), Tq queries, Tk keys.

NumPy's float32 exp runs at 1.5-6 ns per number on this project's AVX2 hosts (measured,
NumPy 2.4), and a 512-token prefill of the 207M Llama takes 30 million of them: 50 M for
attention's softmax, 17 M for SiLU. So a 1.7 s prefill spent 0.4 s outside its GEMMs, most
of it in exp and in the passes around it (mask, max, subtract, sum, divide), each one pass
over megabytes. Here `_exp` is Cephes' expf (the polynomial NumPy's SIMD loop uses too),
which LLVM vectorises: 0.3-0.4 ns per number, relative error ~1e-7, and each kernel does its
passes over a row while it is in cache.

The exp is written so that the compiler may not reassociate it (the ln 2 reduction in two
parts only holds in the order written): the kernels take fastmath flags without `reassoc`,
and sums are reduced in a separate helper that may reorder (float32 round-off only).
Serial and nogil: a prefill's BLAS threads run right before and after. Cached on disk.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit
from numba import types as nbtypes
from numba.extending import intrinsic

_OPTS = dict(nogil=True, cache=True, fastmath=True)
_LOWEST = np.float32(-3.4028235e38)      # below every score; finite, as the fast-math flags require
_I32 = ir.IntType(32)


@intrinsic
def _pow2(typingctx, n):
    """2 ** n as float32 for an integer -126 <= n <= 127: n + 127 placed in the exponent bits."""
    def codegen(context, builder, signature, args):
        biased = builder.add(args[0], ir.Constant(_I32, 127))
        return builder.bitcast(builder.shl(biased, ir.Constant(_I32, 23)), ir.FloatType())
    return nbtypes.float32(nbtypes.int32), codegen


@intrinsic
def _fma(typingctx, a, b, c):
    """a * b + c rounded once (llvm.fma): fast-math may reorder + and *, but not this."""
    def codegen(context, builder, signature, args):
        return builder.fma(*args)
    return nbtypes.float32(nbtypes.float32, nbtypes.float32, nbtypes.float32), codegen


@intrinsic
def _max(typingctx, a, b):
    """The larger of two float32 (llvm.maxnum): LLVM vectorises a running max of it, not of
    Python's max (measured 0.1 against 0.4 ns a number)."""
    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.FloatType(), [ir.FloatType(), ir.FloatType()])
        return builder.call(builder.module.declare_intrinsic("llvm.maxnum", [ir.FloatType()], fnty), args,
                            fastmath=("fast",))
    return nbtypes.float32(nbtypes.float32, nbtypes.float32), codegen


@njit(**_OPTS)
def _exp(x):
    """e ** x in float32 (Cephes expf): x = n ln2 + r, |r| <= ln2 / 2, e^r by a degree-7 polynomial."""
    x = min(max(x, np.float32(-87.3)), np.float32(88.3))      # 2 ** n stays a normal float32
    n = np.floor(x * np.float32(1.44269504088896341) + np.float32(0.5))
    r = _fma(n, np.float32(-0.693359375), x)                   # x - n ln2, ln2 in two parts
    r = _fma(n, np.float32(2.12194440e-4), r)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    return (p * (r * r) + r + np.float32(1.0)) * _pow2(np.int32(n))


@njit(**_OPTS)
def _row_sum(row):
    total = np.float32(0.0)
    for j in range(row.size):           # indexed: `for value in row` does not vectorise
        total += row[j]
    return total


@njit(**_OPTS)
def exp_into(x, out):
    """out = e ** x, elementwise.  x and out C-contiguous float32 of one size."""
    flat_x, flat_out = x.reshape(-1), out.reshape(-1)
    for i in range(flat_x.size):
        flat_out[i] = _exp(flat_x[i])


@njit(**_OPTS)
def gated_silu(h, width, out):
    """out = silu(gate) * up for h = [gate | up].  h (T, 2I) float32, width I, out (T, I)."""
    for t in range(h.shape[0]):
        row, dst = h[t], out[t]
        for i in range(width):              # two loops: with the division in this one, it did not vectorise
            dst[i] = _exp(-row[i])
        for i in range(width):
            dst[i] = row[i] / (np.float32(1.0) + dst[i]) * row[width + i]


@njit(**_OPTS)
def masked_softmax(scores, q_pos, k_pos, window, top, total):
    """Each score row to exp(score - row max) in place, over the keys its query sees.

    scores (B, Tq, Tk) C-contiguous float32; a query at q_pos[t] sees a key at k_pos[j] when
    k_pos[j] <= q_pos[t] and (window <= 0 or q_pos[t] - k_pos[j] < window); a score it does not
    see becomes 0. -> top (B, Tq) the row max (0 for a row that sees nothing), total (B, Tq)
    the row sum (0 for a row that sees nothing).
    """
    n_rows, n_q, n_k = scores.shape
    keep = np.empty(n_k, np.float32)          # 1 where query t sees key j, else 0: shared by its B rows
    for t in range(n_q):
        seen = 0
        for j in range(n_k):
            sees = k_pos[j] <= q_pos[t] and (window <= 0 or q_pos[t] - k_pos[j] < window)
            keep[j] = 1.0 if sees else 0.0
            seen += sees
        for b in range(n_rows):
            row = scores[b, t]
            row_max = _LOWEST
            for j in range(n_k):
                row_max = _max(row_max, row[j] if keep[j] > 0 else _LOWEST)
            for j in range(n_k):
                row[j] = _exp(row[j] - row_max) * keep[j]
            top[b, t] = row_max if seen else 0.0
            total[b, t] = _row_sum(row)
