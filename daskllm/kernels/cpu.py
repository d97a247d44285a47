"""CPU kernels (numba) that read 16-bit and Q8_0 weights directly, and tiles for BLAS.

Legend: T rows of x (tokens), K input width, O output rows of W, nb = ceil(K / 32) blocks.

Decode (few rows): `matvec_*` read each weight once, widen it in registers and multiply;
output rows are spread over numba's threads. Written as measured on a 2-core AVX-512
machine (see DESIGN.md, Weights): one flat loop over k from 0 with the block scale read
as s[k >> 5] (a nested 32-element loop or a loop over a sub-range ran at a fraction of the
bandwidth); 16-bit rows widened by shifts into a per-chunk float32 row, then dotted.
Prefill (many rows): `dequantize_rows_*` write a tile of W as float32 into a reused
buffer, and BLAS multiplies it (kernels.matmul does the tiling).
All kernels are nogil (two ranks in one process may run them at once) and cached on disk.
Each comes twice: `parallel` (output rows over numba's threads) and `serial` (one thread,
for small matrices, where starting threads costs more than the work).
"""
from __future__ import annotations

import types

import numpy as np
from numba import njit, prange

_OPTS = dict(nogil=True, cache=True, fastmath=True)
_CHUNK = 16            # output rows per task: enough work per task, enough tasks per thread


@njit(**_OPTS, inline="always")
def _f16_scales(d16, s):
    """float16 bits (nb,) -> float32 (nb,) in s: magnitude shifted into float32 place, times 2^112."""
    u = s.view(np.uint32)
    for b in range(d16.shape[0]):
        h = np.uint32(d16[b])
        u[b] = ((h & np.uint32(0x7FFF)) << np.uint32(13)) | ((h & np.uint32(0x8000)) << np.uint32(16))
    for b in range(d16.shape[0]):
        s[b] = s[b] * np.float32(5.192296858534828e33)      # 2^112: half exponent bias 15 -> float 127


def _matvec_q8_0(x, qs, d16, out):
    """out = x @ W.T for W in Q8_0.  x (T, K) f32, qs (O, nb*32) i8, d16 (O, nb) u16 -> out (T, O) f32."""
    t_rows, k_cols = x.shape
    o_rows, nb = d16.shape
    n_chunks = (o_rows + _CHUNK - 1) // _CHUNK
    for c in prange(n_chunks):
        s = np.empty(nb, np.float32)
        for o in range(c * _CHUNK, min(o_rows, (c + 1) * _CHUNK)):
            _f16_scales(d16[o], s)
            q = qs[o]
            for t in range(t_rows):
                xt = x[t]
                acc = np.float32(0.0)
                for k in range(k_cols):
                    acc += xt[k] * np.float32(q[k]) * s[k >> 5]
                out[t, o] = acc


@njit(**_OPTS, inline="always")
def _widen(bits, row, is_bf16):
    """16-bit bits (K,) -> float32 (K,) in row."""
    u = row.view(np.uint32)
    if is_bf16:
        for k in range(bits.shape[0]):
            u[k] = np.uint32(bits[k]) << np.uint32(16)
    else:
        for k in range(bits.shape[0]):
            h = np.uint32(bits[k])
            u[k] = ((h & np.uint32(0x7FFF)) << np.uint32(13)) | ((h & np.uint32(0x8000)) << np.uint32(16))
        for k in range(bits.shape[0]):
            row[k] = row[k] * np.float32(5.192296858534828e33)


def _matvec_half(x, bits, is_bf16, out):
    """out = x @ W.T for 16-bit W.  x (T, K) f32, bits (O, K) u16 -> out (T, O) f32."""
    t_rows, k_cols = x.shape
    o_rows = bits.shape[0]
    n_chunks = (o_rows + _CHUNK - 1) // _CHUNK
    for c in prange(n_chunks):
        row = np.empty(k_cols, np.float32)
        for o in range(c * _CHUNK, min(o_rows, (c + 1) * _CHUNK)):
            _widen(bits[o], row, is_bf16)
            for t in range(t_rows):
                xt = x[t]
                acc = np.float32(0.0)
                for k in range(k_cols):
                    acc += xt[k] * row[k]
                out[t, o] = acc


def _dequantize_rows_q8_0(qs, d16, lo, k_cols, buf):
    """Rows lo .. lo + len(buf) of a Q8_0 W as float32 into buf (R, K)."""
    nb = d16.shape[1]
    for r in prange(buf.shape[0]):
        s = np.empty(nb, np.float32)
        _f16_scales(d16[lo + r], s)
        q = qs[lo + r]
        dst = buf[r]
        for k in range(k_cols):
            dst[k] = np.float32(q[k]) * s[k >> 5]


def _dequantize_rows_half(bits, is_bf16, lo, buf):
    """Rows lo .. lo + len(buf) of a 16-bit W as float32 into buf (R, K)."""
    for r in prange(buf.shape[0]):
        _widen(bits[lo + r], buf[r], is_bf16)


def _both(fn):
    """(parallel, serial) compilations of one kernel body (prange is range in the serial one).

    The serial one is a copy under another name: numba's disk cache is keyed by the function's
    name and line, and two compilations of one function would overwrite each other's entry.
    """
    serial = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__,
                                fn.__closure__)
    serial.__qualname__ = fn.__qualname__ + "_serial"
    return njit(**_OPTS, parallel=True)(fn), njit(**_OPTS)(serial)


matvec_q8_0, matvec_q8_0_serial = _both(_matvec_q8_0)
matvec_half, matvec_half_serial = _both(_matvec_half)
dequantize_rows_q8_0, dequantize_rows_q8_0_serial = _both(_dequantize_rows_q8_0)
dequantize_rows_half, dequantize_rows_half_serial = _both(_dequantize_rows_half)
