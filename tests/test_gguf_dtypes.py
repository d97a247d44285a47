"""dtype="auto" on a GGUF file: F32/F16/BF16 as stored, Q8_0 as its own int8 blocks, the 4-bit and
K types requantized to Q8_0 int8; dtype="float32" still dequantizes everything."""
from __future__ import annotations

import numpy as np
import pytest

from daskllm import kernels
from daskllm.io.gguf import GGUFCheckpoint
from daskllm.io.loader import dtype_label, read_weights, resolve_dtype
from daskllm.parallel.build import rank_weight_bytes
from daskllm.parallel.compose import full_plan
from daskllm.parallel.local_mesh import InProcessReplica
from daskllm.parallel.mesh import Mesh
from daskllm.parallel.plan import format_plan, rank_slices
from daskllm.parallel.tensor import split_unit
from fixtures import gguf_models
from lossy import kl_and_agreement

RNG = np.random.default_rng(3)
TOKENS = [RNG.integers(0, 384, 33).tolist(), [7], RNG.integers(0, 384, 6).tolist()]


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    return lambda qtype: GGUFCheckpoint(gguf_models.write_gguf(out / f"tiny-{qtype}.gguf", qtype))


def logits(ckpt, mesh=Mesh(), dtype="auto"):
    with InProcessReplica(ckpt, mesh, options={"dtype": dtype}, timeout=300) as rep:
        return rep.logits(TOKENS)


@pytest.mark.parametrize("qtype, linear", [("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
                                           ("Q8_0", "int8"), ("Q4_0", "int8"), ("Q4_1", "int8"),
                                           ("Q4_K", "int8"), ("Q6_K", "int8")])
def test_auto_resolves_each_gguf_type(gguf, qtype, linear):
    ckpt = gguf(qtype)
    dtypes = resolve_dtype(ckpt, "auto")
    assert dtypes["layers.0.wq"] == dtypes["embed"] == linear
    assert dtypes["norm"] == dtypes["layers.0.attn_norm"] == "float32"
    assert set(resolve_dtype(ckpt, "float32").values()) == {"float32"}


@pytest.mark.parametrize("mesh", [Mesh(), Mesh(tp=2)])
def test_q8_0_auto_holds_the_files_blocks(gguf, mesh):
    """Every rank's int8 slice is the file's Q8_0 blocks, bit for bit (tp=2: block-aligned cuts)."""
    ckpt = gguf("Q8_0")
    options = {"dtype": "auto", "dtypes": resolve_dtype(ckpt, "auto")}
    plan = full_plan(ckpt.config, mesh, options)
    shapes = {n: ckpt.shape(n) for n in plan}
    for r in range(mesh.world_size):
        slices = rank_slices(plan, shapes, mesh.coords(r))
        held = read_weights(ckpt, slices, dtype="auto")
        for name in ("layers.0.wq", "layers.1.wo", "layers.0.w_down", "embed"):
            index = slices[name] or (slice(None), slice(None))
            _, raw = ckpt.raw_blocks(name, index)
            lo, hi, _ = index[1].indices(ckpt.shape(name)[1])
            stored = kernels.from_interleaved(raw, raw.shape[0], hi - lo)
            assert isinstance(held[name], kernels.Q8_0), name
            assert np.array_equal(held[name].qs, stored.qs) and np.array_equal(held[name].d, stored.d), name
        assert held["norm"].dtype == np.float32


@pytest.fixture(scope="module")
def int8_kl(gguf):
    """KL of issue 11's int8 against float32 on this model's F32 file: this 512-wide model is more
    sensitive than test_dtypes' ones (1.7e-3 nats mean here, against their 1e-3 bound)."""
    ckpt = gguf("F32")
    return kl_and_agreement(logits(ckpt, dtype="float32"), logits(ckpt, dtype="int8"), "F32 as int8")


@pytest.mark.parametrize("qtype", ["Q4_K", "Q4_1", "Q6_K"])
def test_requantized_auto_stays_close_to_the_dequantized_float32(gguf, int8_kl, qtype):
    """Requantizing a 4-bit/K type to Q8_0 moves the logits no more than int8 moves float32 weights:
    top-1 as test_dtypes asserts, KL(dequantized float32 || auto) within 1.25x of int8's on the F32
    file (mean and max) and under 0.1 nats anywhere."""
    ckpt = gguf(qtype)
    want, got = logits(ckpt, dtype="float32"), logits(ckpt)
    kl = kl_and_agreement(want, got, f"{qtype} auto")
    assert kl.mean() <= 1.25 * int8_kl.mean() and kl.max() <= 0.1, \
        f"{qtype}: KL mean {kl.mean():.2e} (int8 on F32: {int8_kl.mean():.2e}), max {kl.max():.2e}"
    assert kl.mean() > 0, "auto gave the float32 logits: the weights were not held as int8"


@pytest.mark.parametrize("qtype", ["Q4_K", "Q8_0"])
def test_tp2_auto_equals_tp1_auto(gguf, qtype):
    ckpt = gguf(qtype)
    want, got = logits(ckpt), logits(ckpt, Mesh(tp=2))
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * float(np.abs(w).max()))


def test_plan_and_bytes_report_the_resolved_dtype(gguf):
    ckpt = gguf("Q4_K")
    dtypes = resolve_dtype(ckpt, "auto")
    options = {"dtype": "auto", "dtypes": dtypes}
    assert split_unit(options) == kernels.BLOCK and split_unit({"dtype": "auto"}) == 1
    auto = rank_weight_bytes(ckpt, Mesh(tp=2), options)
    int8 = rank_weight_bytes(ckpt, Mesh(tp=2), {"dtype": "int8", "dtypes": resolve_dtype(ckpt, "int8")})
    f32 = rank_weight_bytes(ckpt, Mesh(tp=2), {"dtype": "float32", "dtypes": resolve_dtype(ckpt, "float32")})
    assert auto == int8 and all(a < f / 3 for a, f in zip(auto, f32))
    text = format_plan(full_plan(ckpt.config, Mesh(tp=2), options), dtypes)
    lines = {line.split()[0]: line for line in text.splitlines()}
    assert lines["layers.0.wq"].endswith("int8") and lines["norm"].endswith("float32")
    assert dtype_label("auto", dtypes) == "auto: float32, int8" and dtype_label("int8", dtypes) == "int8"


def test_shipped_q8_0_slices_keep_the_files_blocks(gguf):
    """ship_weights=True sends the client's dequantized float32 slices; requantizing llama.cpp's Q8_0
    blocks gives them back unchanged (d = 127 d / 127, q = round(d q / d)), as a rank with the file reads."""
    from daskllm.io.loader import ShippedShards, read_rank_shards
    ckpt = gguf("Q8_0")
    slices = {"layers.0.w_down": (slice(None), slice(128, 256)), "layers.1.wq": None}
    shipped = ShippedShards(ckpt.config, {n: ckpt.shape(n) for n in slices}, read_rank_shards(ckpt, slices))
    got = read_weights(shipped, slices, dtype="auto", dtypes=resolve_dtype(ckpt, "auto"))
    want = read_weights(ckpt, slices, dtype="auto")
    for name in slices:
        assert np.array_equal(got[name].qs, want[name].qs) and np.array_equal(got[name].d, want[name].d), name
