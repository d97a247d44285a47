"""kernels/: the 16-bit and Q8_0 layouts, and every matmul path against float32 math on the same weights."""
from __future__ import annotations

import threading

import ml_dtypes
import numpy as np
import pytest
from numpy.testing import assert_allclose

from daskllm import kernels
from daskllm.kernels import formats

RNG = np.random.default_rng(7)


def _matrix(out, cols, scale=0.1):
    return (scale * RNG.standard_normal((out, cols))).astype(np.float32)


def test_q8_0_blocks_follow_llama_cpp():
    w = _matrix(3, 80)                         # two whole blocks and a partial one (16 columns)
    w[1, :32] = 0.0                            # an all-zero block: scale 0, values 0
    q = kernels.quantize_q8_0(w)
    assert q.qs.shape == (3, 96) and q.d.shape == (3, 3) and q.shape == (3, 80)
    assert q.qs.dtype == np.int8 and q.d.dtype == np.float16
    assert not q.qs[:, 80:].any(), "the partial block's padding must be zeros"
    assert q.d[1, 0] == 0 and not q.qs[1, :32].any()
    blocks = np.zeros((3, 96), np.float32)
    blocks[:, :80] = w
    amax = np.abs(blocks.reshape(3, 3, 32)).max(axis=2)
    assert_allclose(q.d.astype(np.float32), (amax / 127).astype(np.float16).astype(np.float32))
    assert np.abs(q.qs).max() == 127                                  # the block maximum maps to +-127
    back = kernels.dequantize(q)
    step = np.repeat(q.d.astype(np.float32), 32, axis=1)[:, :80]
    # half a step from rounding, plus up to 127 x the float16 rounding of the scale (2^-11 relative)
    assert np.all(np.abs(back - w) <= (0.5 + 127 * 2.0**-11) * step + 1e-7), "error beyond half a step"


def test_q8_0_from_blocks_and_from_gguf_bytes():
    q = kernels.quantize_q8_0(_matrix(4, 64))
    same = kernels.q8_0_from_blocks(q.qs.copy(), q.d.copy(), 64)
    assert_allclose(kernels.dequantize(same), kernels.dequantize(q))
    # GGUF stores each block as {float16 d, int8 qs[32]}: 34 bytes, blocks of a row in order.
    raw = bytearray()
    for o in range(4):
        for b in range(2):
            raw += q.d[o, b].tobytes() + q.qs[o, 32 * b:32 * (b + 1)].tobytes()
    g = kernels.from_interleaved(np.frombuffer(bytes(raw), np.uint8), 4, 64)
    assert np.array_equal(g.qs, q.qs) and np.array_equal(g.d, q.d)


def test_layouts_refuse_wrong_arrays():
    with pytest.raises(ValueError, match=r"Q8_0 values must be int8 \(2, 64\) for 40 columns"):
        kernels.q8_0_from_blocks(np.zeros((2, 32), np.int8), np.zeros((2, 2), np.float16), 40)
    with pytest.raises(ValueError, match=r"Q8_0 scales must be float16 \(2, 1\)"):
        kernels.q8_0_from_blocks(np.zeros((2, 32), np.int8), np.zeros((2, 1), np.float32), 32)
    with pytest.raises(ValueError, match="uint16 bits"):
        formats.Half(np.zeros((2, 2), np.float32), "bfloat16")
    with pytest.raises(ValueError, match="16-bit kind"):
        formats.Half(np.zeros((2, 2), np.uint16), "float8")
    with pytest.raises(OverflowError, match="does not fit float16 .max 65504.; use dtype='bfloat16'"):
        kernels.convert(np.full((2, 2), 1e5, np.float32), "float16")


def test_half_layouts_round_like_numpy():
    w = _matrix(5, 40)
    w[0, :4] = [1e-6, -3e-7, 6e-8, -0.0]                                  # float16 subnormals and -0
    for kind in ("bfloat16", "float16"):
        h = kernels.convert(w, kind)
        want = w.astype(ml_dtypes.bfloat16 if kind == "bfloat16" else np.float16).astype(np.float32)
        assert np.array_equal(kernels.dequantize(h), want), kind
        assert h.nbytes == w.size * 2


@pytest.mark.parametrize("native", [True, False])
def test_16_bit_weights_widen_exactly_for_every_finite_value(native, monkeypatch):
    """The kernels widen 16-bit weights in registers (kernels.cpu._bf16, _f16): every finite bit
    pattern, subnormals and -0 included, must give numpy's float32 bit for bit; `native` False
    is the shift-and-scale float16 path for a CPU without a conversion instruction."""
    import numba

    from daskllm.kernels import cpu
    monkeypatch.setattr(cpu, "_NATIVE_HALF", native)         # read when a kernel is compiled

    @numba.njit
    def widen(bits, is_bf16, out):                            # compiled fresh: sees `native`
        for k in range(bits.shape[0]):
            out[k] = cpu._bf16(bits[k]) if is_bf16 else cpu._f16(bits[k])

    every = np.arange(1 << 16, dtype=np.uint16)
    for kind, view in (("bfloat16", ml_dtypes.bfloat16), ("float16", np.float16)):
        want = every.view(view).astype(np.float32)
        bits = every[np.isfinite(want)]
        got = np.empty(bits.shape, np.float32)
        widen(bits, kind == "bfloat16", got)
        assert np.array_equal(got.view(np.uint32), want[np.isfinite(want)].view(np.uint32)), kind
        if native:                                            # the cached kernels, as matmul calls them
            tile = np.empty((1, bits.size), np.float32)
            cpu.dequantize_rows_half_serial(bits[None, :], kind == "bfloat16", 0, tile)
            assert np.array_equal(tile[0].view(np.uint32), got.view(np.uint32)), kind


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "int8"])
@pytest.mark.parametrize("rows", [1, 3, 5, 300])                # decode kernel (<= 4 rows) and prefill tiles
@pytest.mark.parametrize("cols", [64, 100])                     # whole blocks, and a partial last block
def test_matmul_equals_float32_math_on_the_same_weights(dtype, rows, cols, monkeypatch):
    monkeypatch.setattr(kernels, "TILE_BYTES", 1024 * 4 * cols)    # 1024-row tiles: a small test matrix
    out = kernels.tile_rows(cols) + 77                             # two prefill tiles, the second partial
    w = kernels.convert(_matrix(out, cols), dtype)
    x = RNG.standard_normal((rows, cols)).astype(np.float32)
    want = x.astype(np.float64) @ kernels.dequantize(w).astype(np.float64).T
    got = kernels.matmul(x, w)
    assert got.dtype == np.float32 and got.shape == (rows, out)
    assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max(), err_msg=f"{dtype} rows={rows}")


@pytest.mark.parametrize("o_rows,k_cols", [(6, 32), (7, 33), (1029, 300)])   # serial; a remainder; parallel
def test_float32_matmul_of_decode_rows_is_exact_to_float32_round_off(o_rows, k_cols):
    """2 to F32_ROWS rows go through the numba kernel (four output rows at a time, the rest one
    by one), one row and more rows through BLAS; all against float64."""
    w = _matrix(o_rows, k_cols)
    assert (o_rows * k_cols >= kernels.SERIAL_BELOW) == (o_rows == 1029)
    for t_rows in range(1, kernels.F32_ROWS + 2):
        x = RNG.standard_normal((t_rows, k_cols)).astype(np.float32)
        exact = x.astype(np.float64) @ w.T.astype(np.float64)
        got = kernels.matmul(x, w)
        assert got.dtype == np.float32 and got.shape == (t_rows, o_rows)
        assert_allclose(got, exact, rtol=1e-5, atol=1e-5 * np.abs(exact).max(), err_msg=f"{t_rows} rows")
    x, column_major = RNG.standard_normal((3, k_cols)).astype(np.float32), np.asfortranarray(w)
    assert np.array_equal(kernels.matmul(x, column_major), x @ column_major.T)   # not row-major: BLAS


def test_blas_keeps_one_thread_exactly_where_numba_runs_a_steps_matmuls():
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads():
        return min(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas")

    def inside(*scope):
        with kernels.decode_scope(*scope):
            return blas_threads()
    with threadpool_limits(2, user_api="blas"):      # whatever an earlier test left
        if blas_threads() < 2:
            pytest.skip("this BLAS runs one thread at most here: nothing to hold back")
        rows, f32_rows = kernels.DECODE_ROWS, kernels.F32_ROWS
        assert inside(False, True, 2) == inside(False, True, f32_rows) == 1  # float32, batched decode
        assert inside(True, True, 1) == inside(True, False, rows) == 1      # 16-bit / int8 decode
        assert inside(False, True, 1) == 2                                  # float32, one row: BLAS
        assert inside(True, True, rows + 1) == 2                            # 16-bit / int8: BLAS tiles
        assert inside(False, True, f32_rows + 1) == 2                       # prefill
        assert inside(False, False, 2) == 2                                 # GPU float32
        assert blas_threads() == 2                                          # each scope let go


@pytest.mark.parametrize("threads,row_major", [(None, True), (2, True), (1, False)])
def test_float32_weights_are_held_in_the_layout_their_ranks_read_fastest(threads, row_major, monkeypatch):
    from daskllm.io.loader import as_matmul_layout
    monkeypatch.setattr(kernels, "_threads", threads)
    w = _matrix(6, 32)
    held = {"w": w, "router": np.asfortranarray(w), "half": kernels.convert(w, "bfloat16")}
    as_matmul_layout(held)
    assert np.array_equal(held["w"], w)
    assert held["w"].flags.c_contiguous == row_major and held["w"].flags.f_contiguous == (not row_major)
    assert held["router"].flags.f_contiguous and type(held["half"]) is kernels.Half    # left as they were


def test_matmul_of_no_rows():
    w = _matrix(6, 32)
    assert kernels.matmul(np.zeros((0, 32), np.float32), w).shape == (0, 6)
    assert kernels.matmul(np.zeros((0, 32), np.float32), kernels.convert(w, "int8")).shape == (0, 6)


def test_rows_and_concatenation_keep_the_layout():
    a, b = _matrix(4, 48), _matrix(2, 48)
    for dtype in ("bfloat16", "float16", "int8"):
        wa, wb = kernels.convert(a, dtype), kernels.convert(b, dtype)
        both = kernels.concat_rows([wa, wb])
        assert type(both) is type(wa) and both.shape == (6, 48)
        assert np.array_equal(kernels.dequantize(both), np.concatenate([kernels.dequantize(wa), kernels.dequantize(wb)]))
        ids = np.array([3, 0, 3])
        assert np.array_equal(kernels.take_rows(wa, ids), kernels.dequantize(wa)[ids])
        assert kernels.weight_bytes((4, 48), dtype) == wa.nbytes


def test_two_threads_at_once_get_their_own_results():
    """Ranks of an in-process mesh call the kernels from several threads."""
    ws = [kernels.convert(_matrix(700, 96), d) for d in ("int8", "bfloat16")]
    xs = [RNG.standard_normal((n, 96)).astype(np.float32) for n in (1, 9)]
    want = {(i, j): xs[j] @ kernels.dequantize(w).T for i, w in enumerate(ws) for j in range(2)}
    errors = []

    def work(i):
        for _ in range(20):
            for j in range(2):
                got = kernels.matmul(xs[j], ws[i])
                if not np.allclose(got, want[i, j], rtol=1e-4, atol=1e-4):
                    errors.append((i, j))
    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors


# -- a decode step's per-layer pieces (kernels.decode_cpu) against the NumPy path ----------

def _numpy_path(monkeypatch):
    """Make layers.* take their NumPy path (what the GPU runs, through CuPy)."""
    monkeypatch.setattr(kernels, "decode_sized", lambda x: False)
    monkeypatch.setattr(kernels, "on_cpu", lambda x: False)


@pytest.mark.parametrize("shape", [(1, 96), (3, 4, 32), (4, 1000), (37, 5, 32)])      # decode and prefill rows
def test_compiled_rms_norm_equals_the_numpy_path(shape, monkeypatch):
    from daskllm.model.layers import rms_norm
    x = RNG.standard_normal(shape).astype(np.float32)
    weight = RNG.standard_normal(shape[-1]).astype(np.float32)
    assert kernels.on_cpu(x)
    got = rms_norm(x, weight, 1e-6)
    _numpy_path(monkeypatch)
    assert got.shape == x.shape and got.dtype == np.float32
    assert_allclose(got, rms_norm(x, weight, 1e-6), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows", [3, 40])                                          # decode and prefill
def test_compiled_rope_equals_the_numpy_path_on_a_strided_view(rows, monkeypatch):
    from daskllm.model.layers import apply_rope, rope_cos_sin, rope_inv_freq
    from daskllm.model.config import RopeConfig
    qkv = RNG.standard_normal((rows, 8 * 16 + 16)).astype(np.float32)
    q = qkv[:, :8 * 16].reshape(rows, 8, 16)                    # a column slice: not C-contiguous
    cos, sin = rope_cos_sin(rope_inv_freq(RopeConfig(), 16), RNG.integers(0, 4000, rows))
    got = apply_rope(q, cos, sin)
    _numpy_path(monkeypatch)
    assert_allclose(got, apply_rope(q, cos, sin), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows,heads,kv_heads,stored", [(1, 16, 8, 40), (2, 9, 3, 1), (4, 4, 4, 700)])
def test_decode_attention_over_the_kv_cache_equals_the_numpy_path(rows, heads, kv_heads, stored, monkeypatch):
    from daskllm.model.cache import KVCache
    from daskllm.model.layers import attention_partial
    cache = KVCache(1)
    cache.append(0, "s", RNG.standard_normal((kv_heads, stored, 32)).astype(np.float32),
                 RNG.standard_normal((kv_heads, stored, 32)).astype(np.float32), np.arange(stored))
    k, v, k_pos = cache.view(0, "s")
    assert not k.flags.c_contiguous or stored == k.base.shape[1]   # a view of the cache's buffer
    q = RNG.standard_normal((rows, heads, 32)).astype(np.float32)
    q_pos = np.arange(stored, stored + rows)
    assert kernels.attend_all_keys(q, k, v, 0.2) is not None        # the compiled path takes it
    out, lse = attention_partial(q, k, v, q_pos, k_pos, 0.2)
    _numpy_path(monkeypatch)
    want_out, want_lse = attention_partial(q, k, v, q_pos, k_pos, 0.2)
    assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
    assert_allclose(lse, want_lse, rtol=1e-6, atol=1e-5)


def test_decode_attention_leaves_masked_and_foreign_views_to_numpy():
    k = RNG.standard_normal((2, 10, 8)).astype(np.float32)
    q = RNG.standard_normal((1, 4, 8)).astype(np.float32)
    assert kernels.attend_all_keys(q, k[:, 2:], k[:, 2:], 1.0) is None      # not the buffer's first columns
    assert kernels.attend_all_keys(q, k[:, :, :4], k[:, :, :4], 1.0) is None  # a cut head dim
    assert kernels.attend_all_keys(q, k[:, :0], k[:, :0], 1.0) is None       # no keys
    many = RNG.standard_normal((kernels.DECODE_ROWS + 1, 4, 8)).astype(np.float32)
    assert kernels.attend_all_keys(many, k, k, 1.0) is None                  # a prefill


def test_compiled_exp_is_within_two_float32_ulps():
    from daskllm.kernels import softmax_cpu
    x = np.linspace(-87.3, 88.3, 1_000_001).astype(np.float32)
    got = np.empty_like(x)
    softmax_cpu.exp_into(x, got)
    want = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got - want) / want) <= 2 * 2.0**-23 / 2 * 1.01      # 2 ulps (NumPy's own: ~3)
    tiny = np.array([-88.0, -100.0, -1e30], np.float32)
    softmax_cpu.exp_into(tiny, got[:3])
    assert np.all((got[:3] >= 0) & (got[:3] < 1.3e-38)), "underflow must give ~0, not garbage"


def test_prefill_gated_mlp_equals_the_numpy_path(monkeypatch):
    from daskllm.model.layers import gated_mlp
    x = RNG.standard_normal((37, 48)).astype(np.float32)
    w_gate_up, w_down = _matrix(2 * 70, 48, scale=1.0), _matrix(48, 70)
    w_gate_up[:3] *= 200                        # gates far beyond exp's range: silu -> 0 or the gate itself
    assert kernels.on_cpu(x)
    got = gated_mlp(x, w_gate_up, w_down)
    assert np.isfinite(got).all()
    _numpy_path(monkeypatch)
    assert_allclose(got, gated_mlp(x, w_gate_up, w_down), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["causal", "window", "sees-nothing", "no-keys", "shuffled"])
def test_prefill_attention_softmax_equals_the_numpy_path(case, monkeypatch):
    from daskllm.model.layers import attention_partial
    tq, tk, window = 24, 40, None
    q_pos, k_pos = np.arange(16, 16 + tq), np.arange(tk)
    if case == "window":
        window = 7
    elif case == "sees-nothing":                # the first queries come before every key of this block
        k_pos = np.arange(20, 20 + tk)
    elif case == "no-keys":
        tk, k_pos = 0, np.arange(0)
    elif case == "shuffled":                    # ring and zigzag blocks: positions in any order
        k_pos = RNG.permutation(60)[:tk]
    q = RNG.standard_normal((tq, 6, 16)).astype(np.float32)
    k, v = (RNG.standard_normal((3, tk, 16)).astype(np.float32) for _ in range(2))
    out, lse = attention_partial(q, k, v, q_pos, k_pos, 0.25, window)
    _numpy_path(monkeypatch)
    want_out, want_lse = attention_partial(q, k, v, q_pos, k_pos, 0.25, window)
    assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
    assert np.array_equal(np.isneginf(lse), np.isneginf(want_lse))            # who sees nothing
    assert_allclose(lse[np.isfinite(lse)], want_lse[np.isfinite(want_lse)], rtol=1e-6, atol=1e-5)
    if case == "sees-nothing":
        assert np.isneginf(lse[:4]).all() and not out[:4].any()


def test_masked_softmax_refuses_a_copy_it_would_work_on():
    scores = np.zeros((2, 4, 6), np.float32)[:, :, ::2]
    with pytest.raises(ValueError, match="C-contiguous"):
        kernels.masked_softmax(scores, np.arange(4), np.arange(3), None)
