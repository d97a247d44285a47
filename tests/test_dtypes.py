"""Weights at their own size: every family x dtype against float32 math on the same weights, every mesh
against the single rank of the same dtype, int8 against float32, 16-bit against transformers; refusals."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from numpy.testing import assert_allclose
from safetensors.numpy import save_file

from conftest import DENSE, MOE, golden_dir, load_golden
from lossy import kl_and_agreement
from daskllm import kernels
from daskllm.io.checkpoint import Checkpoint
from daskllm.io.loader import read_weights, target_dtype
from daskllm.parallel.build import check_weights_fit, format_rank_bytes, rank_weight_bytes
from daskllm.parallel.compose import check
from daskllm.parallel.local_mesh import InProcessReplica
from daskllm.parallel.mesh import Mesh, MeshError
from tp_checkpoints import write_checkpoint

FAMILIES = DENSE + MOE + ["llama_fp16", "llama_bf16"]
DTYPES = ["auto", "bfloat16", "float16", "int8"]
CASES = (2, 0, 1)                               # prompt lengths 33, 1, 6


def prompts(family):
    golden = load_golden(family)
    return [golden[f"tokens_{i}"].tolist() for i in CASES]


def logits(ckpt, dtype, mesh=Mesh(), family=None):
    with InProcessReplica(ckpt, mesh, options={"dtype": dtype}, timeout=300) as rep:
        return rep.logits(prompts_of[family or ckpt.path.name])


prompts_of = {f: prompts(f) for f in FAMILIES}


def rounded_checkpoint(src: Checkpoint, dtype: str, out) -> Checkpoint:
    """A float32 copy of `src` whose linear weights went through `dtype` and back (the same weights)."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(src.path / "config.json", out / "config.json")
    tensors = {}
    for ours, (_, hf_name, shape, _) in src.entries.items():
        array = src.read(ours, None, None)
        target = target_dtype(ours, shape, np.dtype(array.dtype).name, dtype)
        tensors[hf_name] = (kernels.dequantize(kernels.convert(array, target)) if array.ndim == 2
                            else np.asarray(array, np.float32))
    save_file(tensors, str(out / "model.safetensors"))
    return Checkpoint(out)


def assert_close(got, want, rel, what):
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, f"{what}: prompt {i} shape {g.shape} != {w.shape}"
        assert_allclose(g, w, rtol=0, atol=rel * float(np.abs(w).max()), err_msg=f"{what}: prompt {i}")


@pytest.fixture(scope="module")
def single_rank():
    """Single-rank logits per (family, dtype), computed once."""
    cache = {}

    def get(family, dtype):
        if (family, dtype) not in cache:
            cache[family, dtype] = logits(Checkpoint(golden_dir(family)), dtype)
        return cache[family, dtype]
    return get


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_float32_math_on_the_same_weights(single_rank, family, dtype, tmp_path):
    """The kernels change how weights are held and read, not the math: 1e-4 of max|logit|."""
    reference = rounded_checkpoint(Checkpoint(golden_dir(family)), dtype, tmp_path / "rounded")
    assert_close(single_rank(family, dtype), logits(reference, "float32", family=family), 1e-4, f"{family} {dtype}")


@pytest.mark.parametrize("family", ["llama_fp16", "llama_bf16"])
def test_16_bit_checkpoints_match_transformers(single_rank, family):
    """auto keeps the 16-bit weights; activations stay float32.

    Against transformers' float32 forward of the same 16-bit weights: float32 round-off
    only, 1e-5 of max|logit|. Against transformers running in the 16-bit dtype itself
    (activations rounded to 16 bits after every op, unit round-off u = 2^-11 for float16,
    2^-8 for bfloat16): within 16 u of max|logit| (measured: 6 u float16, 3.7 u bfloat16).
    """
    golden, got = load_golden(family), single_rank(family, "auto")
    u = 2.0 ** -11 if family == "llama_fp16" else 2.0 ** -8
    assert_close(got, [golden[f"logits_{i}"] for i in CASES], 1e-5, f"{family} vs transformers float32")
    assert_close(got, [golden[f"native_{i}"] for i in CASES], 16 * u, f"{family} vs transformers 16-bit")


@pytest.mark.parametrize("family", DENSE + MOE)
def test_int8_stays_close_to_float32(single_rank, family):
    """int8 (Q8_0) against the float32 model on every position of the golden prompts.

    These tiny random models have near-flat distributions (top-1 leads top-2 by as little as
    1e-3), so top-1 is asserted where float32's lead exceeds 0.1 logit (int8 moves logits by
    up to ~0.03 here), and on at least 90% of all positions; KL(float32 || int8) is at most
    1e-3 nats on average and 0.1 nats at any position (MoE routing may flip on a token).
    """
    want, got = single_rank(family, "float32"), single_rank(family, "int8")
    kl = kl_and_agreement(want, got, f"{family} int8")
    assert kl.mean() <= 1e-3 and kl.max() <= 0.1, f"{family}: KL mean {kl.mean():.2e}, max {kl.max():.2e}"


MESHES = [Mesh(tp=2), Mesh(sp=2), Mesh(tp=2, sp=2)]
MOE_MESHES = [Mesh(ep=2), Mesh(tp=2, ep=2), Mesh(sp=2, ep=2)]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "int8"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "llama_mha_tied", "mixtral", "qwen2_moe", "olmoe"])
def test_every_mesh_gives_the_single_rank_logits_of_its_dtype(single_rank, family, dtype):
    ckpt = Checkpoint(golden_dir(family))
    want = single_rank(family, dtype)
    for mesh in MESHES + (MOE_MESHES if ckpt.config.moe else []):
        assert_close(logits(ckpt, dtype, mesh), want, 1e-5, f"{family} {dtype} {mesh}")


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """Widths that cut into a partial int8 block: MLP 100 (3 blocks + 4), experts 50, shared 70."""
    base = tmp_path_factory.mktemp("uneven")
    dense = write_checkpoint(base / "dense", hidden=64, heads=6, kv_heads=3, head_dim=32, intermediate=100,
                             vocab=385)
    moe = write_checkpoint(base / "moe", family="qwen2_moe", hidden=64, heads=4, kv_heads=2, head_dim=32,
                           expert_width=50, shared_width=70, vocab=385)
    return {"dense": Checkpoint(dense), "moe": Checkpoint(moe)}


@pytest.mark.parametrize("which, mesh", [("dense", Mesh(tp=3)), ("dense", Mesh(tp=3, sp=2)),
                                         ("moe", Mesh(tp=2)), ("moe", Mesh(tp=2, ep=2))])
@pytest.mark.parametrize("dtype", ["int8", "bfloat16"])
def test_uneven_cuts_keep_whole_int8_blocks(uneven, which, mesh, dtype, tmp_path):
    ckpt = uneven[which]
    toks = [[5, 17, 300, 2, 9, 77, 1], [3]]
    with InProcessReplica(ckpt, Mesh(), options={"dtype": dtype}, timeout=300) as rep:
        want = rep.logits(toks)
    with InProcessReplica(ckpt, mesh, options={"dtype": dtype}, timeout=300) as rep:
        got = rep.logits(toks)
        runner_bytes = [r.memory()["weights_bytes"] for r in rep.runners]
    assert_close(got, want, 1e-5, f"{which} {dtype} {mesh}")
    reference = rounded_checkpoint(ckpt, dtype, tmp_path / "rounded")
    with InProcessReplica(reference, Mesh()) as rep:
        assert_close(want, rep.logits(toks), 1e-4, f"{which} {dtype} single rank vs float32 math")
    # what each rank holds is exactly what the headers say it will (the KV budget and plan() use this)
    assert runner_bytes == rank_weight_bytes(ckpt, mesh, {"dtype": dtype})


def test_slices_are_read_in_their_stored_dtype_and_held_small():
    ckpt = Checkpoint(golden_dir("llama_bf16_sharded"))
    read = []
    original = ckpt.read

    def spy(name, index=None, dtype=np.float32):
        read.append(dtype)
        return original(name, index, dtype)
    ckpt.read = spy
    weights = read_weights(ckpt, {n: None for n in ckpt.entries}, dtype="auto")
    assert read and all(d is None for d in read), "every tensor must be read as stored, not as float32"
    assert isinstance(weights["layers.0.wq"], kernels.formats.Half) and weights["layers.0.wq"].kind == "bfloat16"
    assert weights["layers.0.attn_norm"].dtype == np.float32
    held = sum(w.nbytes for w in weights.values())
    assert held <= 0.55 * 4 * sum(np.prod(ckpt.shape(n)) for n in ckpt.entries)


def test_router_and_shared_gate_stay_float32():
    ckpt = Checkpoint(golden_dir("qwen2_moe"))
    names = ["layers.0.router", "layers.0.shared_gate", "layers.0.experts.3.w_down", "embed", "lm_head" if
             "lm_head" in ckpt.entries else "embed"]
    weights = read_weights(ckpt, {n: None for n in names}, dtype="int8")
    assert weights["layers.0.router"].dtype == np.float32 and weights["layers.0.shared_gate"].dtype == np.float32
    assert isinstance(weights["layers.0.experts.3.w_down"], kernels.Q8_0)
    assert isinstance(weights["embed"], kernels.Q8_0)


def test_bytes_per_rank_follow_the_dtype():
    ckpt = Checkpoint(golden_dir("llama"))
    f32, bf16, int8 = (rank_weight_bytes(ckpt, Mesh(tp=2), {"dtype": d}) for d in ("float32", "bfloat16", "int8"))
    norms = 4 * sum(np.prod(ckpt.shape(n)) for n in ckpt.entries if len(ckpt.shape(n)) == 1)
    for r in range(2):
        assert bf16[r] - norms == pytest.approx((f32[r] - norms) / 2)
    # int8 cuts the MLP width 96 in whole blocks (64 | 32): the ranks differ, their sum does not
    assert sum(int8) - 2 * norms == pytest.approx((sum(f32) - 2 * norms) * 34 / 128)    # 34 bytes per 32 weights
    assert int8[0] > int8[1]
    assert "rank 1: " in format_rank_bytes(int8, "int8") and "(int8)" in format_rank_bytes(int8, "int8")


# -- refusals ---------------------------------------------------------------------------

def test_int8_refuses_a_tp_that_cuts_a_block_of_wo():
    cfg = Checkpoint(golden_dir("llama")).config                  # 4 heads of 16: 2 heads per rank at tp=2
    check(cfg, Mesh(tp=2), {"dtype": "int8"})
    with pytest.raises(MeshError, match=r"dtype int8 at tp=4: a rank's slice of the attention output "
                                        r"projection \(wo\) would be 16 input columns \(1 heads x 16\)"):
        check(cfg, Mesh(tp=4), {"dtype": "int8"})
    check(cfg, Mesh(tp=4), {"dtype": "bfloat16"})                # 16-bit cuts anywhere


def test_int8_refuses_more_ranks_than_blocks_of_the_mlp(uneven):
    cfg = uneven["dense"].config.with_(intermediate_size=64)
    with pytest.raises(MeshError, match=r"dtype int8 at tp=3: the MLP width 64 is only 2 int8 block\(s\) of 32, "
                                        r"fewer than the 3 tensor-parallel ranks"):
        check(cfg, Mesh(tp=3), {"dtype": "int8"})
    with pytest.raises(MeshError, match="the expert width 50 is only 2 int8 block"):
        check(uneven["moe"].config, Mesh(tp=4), {"dtype": "int8"})


def test_a_refused_mesh_builds_no_rank():
    with pytest.raises(MeshError, match="dtype int8 at tp=4"):
        InProcessReplica(Checkpoint(golden_dir("llama")), Mesh(tp=4), options={"dtype": "int8"})


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, bfloat16, float16, int8, got 'int4'"):
        read_weights(Checkpoint(golden_dir("llama")), {"norm": None}, dtype="int4")


def test_float16_refuses_weights_beyond_its_range(tmp_path):
    path = write_checkpoint(tmp_path / "big", hidden=64, heads=2, kv_heads=1, head_dim=32, intermediate=64)
    from safetensors.numpy import load_file
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = 1e5
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(OverflowError, match=r"layers.1.w_up: a weight of magnitude 100000 does not fit float16"):
        InProcessReplica(Checkpoint(path), Mesh(), options={"dtype": "float16"})


def test_weights_that_do_not_fit_a_worker_are_refused():
    with pytest.raises(ValueError, match=r"dtype 'float32': rank 1 of each replica would hold 0.10 GiB of weights, "
                                         r"but its worker has a memory limit of 0.05 GiB; use a smaller weight dtype "
                                         r"\(int8 would need 0.03 GiB\)"):
        check_weights_fit([2**26, 0.1 * 2**30], [2**30, 0.05 * 2**30], "float32", [2**24, 0.03 * 2**30])
    check_weights_fit([2**26], [0], "float32")                     # unknown memory: not checked


def test_gguf_q8_0_blocks_survive_int8_exactly(tmp_path):
    """A GGUF Q8_0 file held as int8: re-quantizing its dequantized blocks gives the stored blocks back
    (d = 127 d / 127, q = round(d q / d)), so the logits are the float32 ones; its raw blocks map onto
    kernels' Q8_0 layout without arithmetic."""
    from fixtures import gguf_models
    from daskllm.io.gguf import GGUFCheckpoint
    ckpt = GGUFCheckpoint(gguf_models.write_gguf(tmp_path / "tiny-Q8_0.gguf", "Q8_0"))
    _, raw = ckpt.raw_blocks("layers.0.w_up")
    rows, cols = ckpt.shape("layers.0.w_up")
    stored = kernels.from_interleaved(raw, rows, cols)
    held = read_weights(ckpt, {"layers.0.w_up": None}, dtype="int8")["layers.0.w_up"]
    assert np.array_equal(held.qs, stored.qs) and np.array_equal(held.d, stored.d)
    toks = [[1, 5, 9, 200, 3], [7]]
    with InProcessReplica(ckpt, Mesh(), timeout=300) as rep:
        want = rep.logits(toks)
    with InProcessReplica(ckpt, Mesh(tp=2), options={"dtype": "int8"}, timeout=300) as rep:
        assert_close(rep.logits(toks), want, 1e-5, "GGUF Q8_0 as int8, tp=2")
