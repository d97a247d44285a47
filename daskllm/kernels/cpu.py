"""CPU kernels (numba) for decode's few rows (float32, 16-bit and Q8_0 weights), and tiles for BLAS.

Legend: T rows of x (tokens), K input width, O output rows of W, nb = ceil(K / 32) blocks.

Decode (few rows): `matvec_*` read each weight once, widen it in registers and multiply;
output rows are spread over numba's threads. float32 has one too (`matvec_f32`): OpenBLAS's
sgemm packs W for 2-8 rows and ran 3x slower than a single row (benchmarks/README.md, "Few
rows"). One flat loop over k from 0 per output row, the Q8_0 block scale read as s[k >> 5] (a nested 32-element block loop, or a loop over a
sub-range, compiled into gathers and ran at a fraction of the bandwidth). Each 16-bit weight
becomes float32 inside the multiply loop (`_bf16`, `_f16`: LLVM widens 8 at a time, with
F16C's vcvtph2ps for float16), with no float32 row written in between.
Measured on the 207M Llama's matrices, one thread, AMD EPYC (AVX2), weights in cache:
widening inside the loop took bf16 from 6.2 to 10.9 and fp16 from 3.1 to 13.2 Gweights/s
(a widened row buffer, and fp16 widened by shifts and a multiply, cost the difference);
Q8_0 scales converted by vcvtph2ps instead of by shifts took int8 from 8.5 to 12.5.
Prefill (many rows): `dequantize_rows_*` write a tile of W as float32 into a reused
buffer, and BLAS multiplies it (kernels.matmul does the tiling).
All kernels are nogil (two ranks in one process may run them at once) and cached on disk.
Each comes twice: `parallel` (output rows over numba's threads) and `serial` (one thread,
for small matrices, where starting threads costs more than the work).
"""
from __future__ import annotations

import platform
import types

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba import types as nbtypes
from numba.extending import intrinsic

_OPTS = dict(nogil=True, cache=True, fastmath=True)
_CHUNK = 16            # output rows per task: enough work per task, enough tasks per thread


def _native_half() -> bool:
    """Whether LLVM turns a float16 -> float32 conversion into an instruction here (x86 F16C,
    any AArch64) rather than a call into a runtime library the JIT may not have."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return True
    if machine in ("x86_64", "amd64"):
        import llvmlite.binding as llvm
        return bool(llvm.get_host_cpu_features().get("f16c"))
    return False


_NATIVE_HALF = _native_half()
_I32, _F32 = ir.IntType(32), ir.FloatType()


@intrinsic
def _bf16(typingctx, bits):
    """bfloat16 bits (uint16) -> float32: the bits are the float32's top half."""
    def codegen(context, builder, signature, args):
        wide = builder.shl(builder.zext(args[0], _I32), ir.Constant(_I32, 16))
        return builder.bitcast(wide, _F32)
    return nbtypes.float32(nbtypes.uint16), codegen


@intrinsic
def _f16(typingctx, bits):
    """float16 bits (uint16) -> float32, exactly (subnormals too)."""
    def codegen(context, builder, signature, args):
        if _NATIVE_HALF:
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), _F32)
        # No conversion instruction: magnitude shifted into float32 place, times 2^112
        # (half exponent bias 15 -> float 127); subnormals come out right, inf/nan do not.
        h = builder.zext(args[0], _I32)
        mag = builder.shl(builder.and_(h, ir.Constant(_I32, 0x7FFF)), ir.Constant(_I32, 13))
        sign = builder.shl(builder.and_(h, ir.Constant(_I32, 0x8000)), ir.Constant(_I32, 16))
        value = builder.bitcast(builder.or_(mag, sign), _F32)
        return builder.fmul(value, ir.Constant(_F32, 5.192296858534828e33))
    return nbtypes.float32(nbtypes.uint16), codegen


def _matvec_q8_0(x, qs, d16, out):
    """out = x @ W.T for W in Q8_0.  x (T, K) f32, qs (O, nb*32) i8, d16 (O, nb) u16 -> out (T, O) f32."""
    t_rows, k_cols = x.shape
    o_rows, nb = d16.shape
    n_chunks = (o_rows + _CHUNK - 1) // _CHUNK
    for c in prange(n_chunks):
        s = np.empty(nb, np.float32)
        for o in range(c * _CHUNK, min(o_rows, (c + 1) * _CHUNK)):
            d = d16[o]
            for b in range(nb):
                s[b] = _f16(d[b])
            q = qs[o]
            for t in range(t_rows):
                xt = x[t]
                acc = np.float32(0.0)
                for k in range(k_cols):
                    acc += xt[k] * np.float32(q[k]) * s[k >> 5]
                out[t, o] = acc


def _matvec_half(x, bits, is_bf16, out):
    """out = x @ W.T for 16-bit W.  x (T, K) f32, bits (O, K) u16 -> out (T, O) f32."""
    t_rows, k_cols = x.shape
    o_rows = bits.shape[0]
    n_chunks = (o_rows + _CHUNK - 1) // _CHUNK
    for c in prange(n_chunks):
        for o in range(c * _CHUNK, min(o_rows, (c + 1) * _CHUNK)):
            w = bits[o]
            for t in range(t_rows):
                xt = x[t]
                acc = np.float32(0.0)
                if is_bf16:                       # one loop per kind: no branch inside the loop
                    for k in range(k_cols):
                        acc += xt[k] * _bf16(w[k])
                else:
                    for k in range(k_cols):
                        acc += xt[k] * _f16(w[k])
                out[t, o] = acc


def _matvec_f32(x, w, out):
    """out = x @ W.T for float32 W, row-major.  x (T, K) f32, w (O, K) f32 -> out (T, O) f32.

    Four output rows at a time: each x[t, k] loaded once feeds four independent sums, which
    LLVM vectorises and keeps in registers (one row at a time ran at a third of the bandwidth)."""
    t_rows, k_cols = x.shape
    o_rows = w.shape[0]
    n_chunks = (o_rows + _CHUNK - 1) // _CHUNK
    for c in prange(n_chunks):
        o, end = c * _CHUNK, min(o_rows, (c + 1) * _CHUNK)
        while o + 4 <= end:
            w0, w1, w2, w3 = w[o], w[o + 1], w[o + 2], w[o + 3]
            for t in range(t_rows):
                xt = x[t]
                a0 = a1 = a2 = a3 = np.float32(0.0)
                for k in range(k_cols):
                    xk = xt[k]
                    a0 += xk * w0[k]
                    a1 += xk * w1[k]
                    a2 += xk * w2[k]
                    a3 += xk * w3[k]
                out[t, o], out[t, o + 1], out[t, o + 2], out[t, o + 3] = a0, a1, a2, a3
            o += 4
        while o < end:                              # the last rows of a matrix whose O is not a multiple of 4
            wo = w[o]
            for t in range(t_rows):
                xt = x[t]
                acc = np.float32(0.0)
                for k in range(k_cols):
                    acc += xt[k] * wo[k]
                out[t, o] = acc
            o += 1


def _dequantize_rows_q8_0(qs, d16, lo, k_cols, buf):
    """Rows lo .. lo + len(buf) of a Q8_0 W as float32 into buf (R, K)."""
    nb = d16.shape[1]
    for r in prange(buf.shape[0]):
        s = np.empty(nb, np.float32)
        d = d16[lo + r]
        for b in range(nb):
            s[b] = _f16(d[b])
        q = qs[lo + r]
        dst = buf[r]
        for k in range(k_cols):
            dst[k] = np.float32(q[k]) * s[k >> 5]


def _dequantize_rows_half(bits, is_bf16, lo, buf):
    """Rows lo .. lo + len(buf) of a 16-bit W as float32 into buf (R, K)."""
    k_cols = buf.shape[1]
    for r in prange(buf.shape[0]):
        w = bits[lo + r]
        dst = buf[r]
        if is_bf16:
            for k in range(k_cols):
                dst[k] = _bf16(w[k])
        else:
            for k in range(k_cols):
                dst[k] = _f16(w[k])


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
matvec_f32, matvec_f32_serial = _both(_matvec_f32)
dequantize_rows_q8_0, dequantize_rows_q8_0_serial = _both(_dequantize_rows_q8_0)
dequantize_rows_half, dequantize_rows_half_serial = _both(_dequantize_rows_half)
