"""Matrix products with weights held at their own size: float32, 16-bit, or Q8_0 int8 blocks.

The model calls `matmul(x, w)` for x @ W.T (and `take_rows` for an embedding lookup);
this package picks the kernel by the weight's layout (kernels.formats) and the rows of x:
  float32, CPU       2 to F32_ROWS rows (batched decode): a numba kernel reading W once
                     (kernels.cpu.matvec_f32; OpenBLAS's sgemm packs W and ran 2-3x slower
                     at 2-8 rows); one row, or more: BLAS
  float32, GPU       cuBLAS (CuPy)
  16-bit, Q8_0, CPU  few rows (decode, <= DECODE_ROWS): numba kernels read the low-bit
                     weight once, no float32 copy of the matrix (kernels.cpu);
                     many rows (prefill): tiles of up to TILE_BYTES of float32 dequantized
                     (one thread) into a reused buffer, multiplied by BLAS, so it stays near
                     the GEMM rate
  16-bit, Q8_0, GPU  the matrix dequantized to float32 on the device, then cuBLAS (CuPy)
Activations stay float32 on every path.
On NumPy float32 arrays (`on_cpu`) the pieces around the matmuls run compiled too:
  RMSNorm and RoPE, one call each (kernels.decode_cpu)
  the MLP's gated SiLU and attention's masked softmax, with an exp LLVM vectorises
  (kernels.softmax_cpu)
  at decode sizes (`decode_sized`), attention over the KV cache in one call (kernels.decode_cpu)
"""
from __future__ import annotations

import contextlib
import functools
import threading

import numpy as np

from .formats import (BLOCK, KINDS, Half, Q8_0, array_module, concat_rows, convert, dequantize,  # noqa: F401
                      dtype_name, from_interleaved, q8_0_from_blocks, quantize_q8_0, take_rows, to_device)

DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")
DECODE_ROWS = 4          # measured: at 8 rows the direct kernels are compute-bound and BLAS wins
F32_ROWS = 8             # float32's kernel still beat BLAS at 8 rows (46.9 against 63.9 ms: "Few rows")
# Prefill tile: 16 MiB of float32 (4096 rows of a 1024-wide matrix). Few, large BLAS calls:
# each call wakes and joins OpenBLAS's threads, and on a busy machine every join can wait for
# a descheduled thread. Measured on 12 matrices of the 207M Llama, 512 rows, load ~3.7:
# int8 / fp16 took 1.34 / 1.28x the float32 GEMM with 1024-row tiles, 1.02 / 1.01x with 4096.
TILE_BYTES = 16 << 20
SERIAL_BELOW = 1 << 18   # weights per call under which one thread beats starting numba's threads

# numba's parallel kernels: one at a time per process (its workqueue threading layer aborts
# on concurrent launches, and ranks sharing a process would oversubscribe the cores anyway).
_launch = threading.Lock()
_threads = None
_local = threading.local()


def is_low_bit(w) -> bool:
    return isinstance(w, (Half, Q8_0))


def set_threads(n: int):
    """Threads for the numba kernels of this process (a rank: its worker's threads)."""
    global _threads
    _threads = max(1, int(n))


def threads():
    """The threads set for this process's kernels (None: not set, numba's default)."""
    return _threads


def _cpu(parallel=True):
    from . import cpu       # numba compiles (or loads its cache) on first use only
    # numba's thread count is per calling thread; remember what this thread set, since
    # asking numba costs microseconds on each of a decode step's ~50 matmuls.
    if parallel and _threads is not None and getattr(_local, "threads", None) != _threads:
        import numba
        numba.set_num_threads(min(_threads, numba.config.NUMBA_NUM_THREADS))
        _local.threads = _threads
    return cpu


def tile_rows(k_cols: int) -> int:
    """Rows of a K-wide weight per prefill tile."""
    return max(64, TILE_BYTES // (4 * k_cols))


def _buffer(size: int) -> np.ndarray:
    """A float32 scratch buffer of at least `size` elements, reused by this thread."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.size < size:
        buf = _local.buf = np.empty(size, np.float32)
    return buf[:size]


def matmul(x, w):
    """x @ W.T for W (O, K) of any layout.  x (T, K) float32 -> (T, O) float32"""
    if not is_low_bit(w):
        if _few_rows_f32(x, w):
            return _matvec_f32(x, w)
        return x @ w.T
    xp = array_module(x)
    if xp is not np:
        return x @ dequantize(w).T                       # GPU: one matrix at a time, float32 cuBLAS
    x = np.ascontiguousarray(x, dtype=np.float32)
    t_rows, o_rows = x.shape[0], w.shape[0]
    out = np.empty((t_rows, o_rows), np.float32)
    if t_rows == 0:
        return out
    k_cols = w.shape[1]
    if t_rows <= DECODE_ROWS:
        if isinstance(w, Q8_0):
            _run_few_rows("matvec_q8_0", o_rows * k_cols, x, w.qs, w.d.view(np.uint16), out)
        else:
            _run_few_rows("matvec_half", o_rows * k_cols, x, w.bits, w.kind == "bfloat16", out)
        return out
    step = tile_rows(k_cols)
    for lo in range(0, o_rows, step):
        rows = min(step, o_rows - lo)
        tile = _buffer(rows * k_cols).reshape(rows, k_cols)                  # (R, K) float32
        # One thread: BLAS's threads run right after, and numba's spinning threads would slow them.
        cpu = _cpu(parallel=False)
        if isinstance(w, Q8_0):
            cpu.dequantize_rows_q8_0_serial(w.qs, w.d.view(np.uint16), lo, k_cols, tile)
        else:
            cpu.dequantize_rows_half_serial(w.bits, w.kind == "bfloat16", lo, tile)
        np.matmul(x, tile.T, out=out[:, lo:lo + rows])
    return out


def _few_rows_f32(x, w) -> bool:
    """A batched decode step's float32 matmul on NumPy arrays (2 to F32_ROWS rows), W row-major
    (io.loader holds it so). One row stays on BLAS's matrix-vector product, as fast as the
    kernel: a single sequence's first decode steps then meet no BLAS threads still spinning
    from its prefill (numba's kernel ran 60-90 ms instead of 31 for ~0.1 s after a prefill)."""
    return (type(x) is np.ndarray and type(w) is np.ndarray and 1 < x.shape[0] <= F32_ROWS
            and x.dtype == w.dtype == np.float32 and w.flags.c_contiguous)


def _matvec_f32(x, w):
    out = np.empty((x.shape[0], w.shape[0]), np.float32)
    _run_few_rows("matvec_f32", w.size, np.ascontiguousarray(x), w, out)
    return out


def _run_few_rows(kernel: str, weights: int, *args):
    """kernels.cpu.<kernel>(*args) over a matrix of `weights` entries: on numba's threads, one
    launch at a time; below SERIAL_BELOW its serial twin, on this thread alone."""
    parallel = weights >= SERIAL_BELOW
    with _launch if parallel else contextlib.nullcontext():
        cpu = _cpu(parallel)
        getattr(cpu, kernel if parallel else f"{kernel}_serial")(*args)


class _BlasThreads:
    """Limits BLAS to one thread around the steps whose matmuls numba runs (reused controller)."""
    controller = None

    @classmethod
    def one(cls):
        if cls.controller is None:
            from threadpoolctl import ThreadpoolController
            cls.controller = ThreadpoolController()
        return cls.controller.limit(limits=1, user_api="blas")


def decode_scope(weights_low_bit: bool, on_cpu_arrays: bool, rows: int):
    """Context for one step: BLAS on one thread when numba kernels run its matmuls (16-bit and
    int8 weights: up to DECODE_ROWS rows; NumPy float32 weights: 2 to F32_ROWS rows).

    Measured (DESIGN.md): OpenBLAS's and numba's threads both spin after their work, and a
    numba int8 step slowed from 6.6 ms to 122 ms with small BLAS calls beside it; with
    OpenBLAS on one thread around the step it ran in 6.8 ms.
    """
    numba_runs = (rows <= DECODE_ROWS if weights_low_bit else on_cpu_arrays and 1 < rows <= F32_ROWS)
    if numba_runs:
        return _BlasThreads.one()
    return contextlib.nullcontext()


def decode_sized(x) -> bool:
    """Whether x is a decode step's activation on the CPU: a float32 NumPy array of few rows."""
    return type(x) is np.ndarray and x.dtype == np.float32 and 0 < x.shape[0] <= DECODE_ROWS


@functools.cache
def _decode():
    from . import decode_cpu    # numba compiles (or loads its cache) on first use only
    return decode_cpu


def rms_norm_rows(x, weight, eps):
    return _decode().rms_norm_rows(x, weight, np.float32(eps))


def rope_rows(x, cos, sin):
    return _decode().rope_rows(x, cos, sin)


def _cache_buffer(a):
    """The C-contiguous (Hkv, capacity, hd) buffer that `a` is the first columns of, or None."""
    if a.flags.c_contiguous:
        return a
    base = a.base
    if (isinstance(base, np.ndarray) and base.ndim == 3 and base.flags.c_contiguous and base.dtype == a.dtype
            and base.shape[0] == a.shape[0] and base.shape[2] == a.shape[2] and base.strides == a.strides
            and base.ctypes.data == a.ctypes.data):
        return base
    return None


def attend_all_keys(q, k, v, scale):
    """Attention of a decode step's query rows over keys they all see, in one compiled call.

    q (T, H, hd), k and v (Hkv, n, hd): the KV cache's views, or any C-contiguous arrays.
    -> (out (T, H, hd), lse (T, H)), or None where this does not apply (the NumPy path runs).
    """
    if not decode_sized(q):
        return None
    keys, values = _cache_buffer(k), _cache_buffer(v)
    if keys is None or values is None:
        return None
    out = np.empty(q.shape, np.float32)
    lse = np.empty(q.shape[:2], np.float32)
    return (out, lse) if attend_cached(q, keys, values, k.shape[1], scale, out, lse) else None


def attend_cached(q, keys, values, n, scale, out, lse=None) -> bool:
    """attend_all_keys over the first n entries of the KV cache's own (Hkv, capacity, hd) buffers,
    into out (T, H, hd) (and lse (T, H) if given); False, nothing written, where it does not apply."""
    if not (decode_sized(q) and n > 0 and keys.dtype == values.dtype == np.float32
            and keys.flags.c_contiguous and values.flags.c_contiguous and out.flags.c_contiguous):
        return False
    lse = np.empty(q.shape[:2], np.float32) if lse is None else lse
    _decode().attend_stored(q, keys, values, n, np.float32(scale), out, lse)
    return True


def on_cpu(x) -> bool:
    """Whether x is a float32 NumPy array (not CuPy): the compiled elementwise kernels apply."""
    return type(x) is np.ndarray and x.dtype == np.float32


@functools.cache
def _softmax():
    from . import softmax_cpu   # numba compiles (or loads its cache) on first use only
    return softmax_cpu


def gated_silu(h, width: int):
    """silu(h[:, :width]) * h[:, width:] in one compiled pass.  h (T, 2I) float32 -> (T, I)"""
    h = np.ascontiguousarray(h)
    out = np.empty((h.shape[0], width), np.float32)
    _softmax().gated_silu(h, width, out)
    return out


def masked_softmax(scores, q_pos, k_pos, window):
    """scores (..., Tq, Tk) C-contiguous float32 -> exp(score - row max) in place over the keys
    each query sees (layers.attention_partial's rule), 0 elsewhere.
    -> (row max, row sum), each (..., Tq, 1); both 0 for a query that sees no key."""
    if not scores.flags.c_contiguous:
        raise ValueError("masked_softmax works in place: scores must be C-contiguous")
    n_q, n_k = scores.shape[-2:]
    rows = scores.reshape(int(np.prod(scores.shape[:-2])), n_q, n_k)      # (B, Tq, Tk), a view
    top = np.empty(rows.shape[:2], np.float32)
    total = np.empty(rows.shape[:2], np.float32)
    _softmax().masked_softmax(rows, np.asarray(q_pos, np.int64), np.asarray(k_pos, np.int64),
                              -1 if window is None else int(window), top, total)
    return top.reshape(scores.shape[:-1] + (1,)), total.reshape(scores.shape[:-1] + (1,))


def weight_bytes(shape: tuple, dtype: str) -> int:
    """Bytes a (out, in) matrix (or a vector) takes in memory as `dtype`."""
    n = int(np.prod(shape))
    if dtype == "int8" and len(shape) == 2:
        nb = -(-shape[1] // BLOCK)
        return shape[0] * nb * (BLOCK + 2)
    return n * {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 4}[dtype]
