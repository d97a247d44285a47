"""Sequence parallelism (ring, allgather, ulysses) against the single-rank reference, in-process."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_allclose

from daskllm.io.checkpoint import Checkpoint
from daskllm.model.forward import Batch
from daskllm.model.runner import Work
from daskllm.parallel.local_mesh import InProcessReplica
from daskllm.parallel.mesh import Mesh, MeshError
from daskllm.parallel.sequence import check, zigzag

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
LENGTHS = (1, 7, 100, 1000)
NEW_TOKENS = 3
TOL = dict(rtol=1e-5, atol=3e-5)
HAS_TP = importlib.util.find_spec("daskllm.parallel.tensor") is not None


def long_copy(root: Path, family: str, **changes) -> Checkpoint:
    """A copy of a golden checkpoint with max_position_embeddings 2048 (weights are position-free)."""
    path = root / family
    if not path.exists():
        shutil.copytree(GOLDEN / family, path)
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(max_position_embeddings=2048, **changes)
        (path / "config.json").write_text(json.dumps(cfg))
    return Checkpoint(path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("long")
    return {"llama": long_copy(root, "llama"), "llama_mha_tied": long_copy(root, "llama_mha_tied"),
            "mistral_window": long_copy(root / "w", "mistral", sliding_window=16)}


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(7)
    return [rng.integers(3, 384, n).tolist() for n in LENGTHS]


_REFERENCE = {}


def reference(ckpt, prompts):
    """(logits, greedy tokens) of the single-rank reference, computed once per checkpoint."""
    key = str(ckpt.path)
    if key not in _REFERENCE:
        with InProcessReplica(ckpt, Mesh()) as ref:
            _REFERENCE[key] = ref.logits(prompts), ref.generate(prompts, NEW_TOKENS)
    return _REFERENCE[key]


def assert_same(got, want, what):
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, f"{what}: sequence {i} shape {g.shape} != {w.shape}"
        for t in range(0, len(w), max(1, len(w) // 50)):
            assert_allclose(g[t], w[t], **TOL, err_msg=f"{what}: sequence {i} (length {len(w)}), token {t}")
        assert_allclose(g, w, **TOL, err_msg=f"{what}: sequence {i} (length {len(w)})")


MESHES = [("ring", 2, "llama"), ("ring", 4, "llama"), ("allgather", 2, "llama"),
          ("allgather", 4, "llama_mha_tied"), ("ulysses", 2, "llama"), ("ulysses", 4, "llama_mha_tied"),
          ("ring", 2, "llama_mha_tied"), ("ring", 4, "mistral_window"), ("ulysses", 2, "mistral_window")]


@pytest.mark.parametrize("variant,sp,model", MESHES)
def test_prefill_and_decode_match_reference(ckpts, prompts, variant, sp, model):
    """Lengths 1, 7, 100, 1000 in one batch: all logits, then greedy decode steps."""
    ref_logits, ref_tokens = reference(ckpts[model], prompts)
    with InProcessReplica(ckpts[model], Mesh(sp=sp), options={"sp_variant": variant}) as rep:
        assert_same(rep.logits(prompts), ref_logits, f"{model} sp={sp} {variant}")
        assert rep.generate(prompts, NEW_TOKENS) == ref_tokens, f"{model} sp={sp} {variant}: greedy tokens differ"


def test_golden_logits_of_transformers():
    """The split forward also matches transformers' own logits on the golden tokens."""
    from safetensors.numpy import load_file
    golden = load_file(str(GOLDEN / "qwen3" / "golden.safetensors"))
    tokens = [golden[f"tokens_{i}"].tolist() for i in range(4)]
    with InProcessReplica(Checkpoint(GOLDEN / "qwen3"), Mesh(sp=2), options={"sp_variant": "ring"}) as rep:
        got = rep.logits(tokens)
    scale = max(np.abs(golden[f"logits_{i}"]).max() for i in range(4))
    for i in range(4):
        assert_allclose(got[i], golden[f"logits_{i}"], rtol=0, atol=1e-5 * scale, err_msg=f"case {i}")


def last_logits(rep, work):
    """Logits of the last new token of each Work item, from rank 0 (the step's forward, sampling aside)."""
    def run(r):
        runner = rep.runners[r]
        batch = runner.model.seams.local_batch(Batch.build([(w.seq, w.tokens, w.start) for w in work]))
        hidden = runner.model.forward(batch, runner.cache)
        return runner.model.logits(runner.model.seams.last_hidden(hidden, batch, list(range(len(work)))))
    return rep._all(run)[0]


def chunked_steps(prompts):
    """Continuous batching: chunks starting after 0, short chunks, new prompts and decodes mixed."""
    a, b, c = prompts[2], prompts[3][:300], prompts[1]
    return [
        [Work(0, tuple(a[:38]), 0), Work(1, tuple(b[:2]), 0)],
        [Work(0, tuple(a[38:41]), 38), Work(1, tuple(b[2:260]), 2), Work(2, tuple(c[:5]), 0)],
        [Work(0, tuple(a[41:42]), 41), Work(1, tuple(b[260:]), 260), Work(2, tuple(c[5:6]), 5)],
        [Work(0, (5,), 42), Work(1, (6,), 300), Work(2, (7,), 6)],
    ]


@pytest.mark.parametrize("variant,sp,model", [("ring", 4, "llama_mha_tied"), ("allgather", 2, "llama"),
                                              ("ulysses", 4, "llama_mha_tied"), ("ring", 2, "mistral_window")])
def test_chunked_prefill_mixed_with_decode(ckpts, prompts, variant, sp, model):
    ckpt = ckpts[model]
    with InProcessReplica(ckpt, Mesh()) as ref, \
            InProcessReplica(ckpt, Mesh(sp=sp), options={"sp_variant": variant}) as rep:
        for s, work in enumerate(chunked_steps(prompts)):
            assert_allclose(last_logits(rep, work), last_logits(ref, work), **TOL,
                            err_msg=f"{model} sp={sp} {variant}, step {s}")


def test_split_cache_stays_balanced(ckpts):
    """Each rank caches only its tokens; decode steps spread the new entries evenly."""
    with InProcessReplica(ckpts["llama"], Mesh(sp=4)) as rep:
        rep.step([Work(0, tuple(range(3, 53)), 0)])
        for t in range(50, 71):
            rep.step([Work(0, (9,), t)])
        lengths = [r.cache.length(0, layer) for r in rep.runners for layer in (0, 1)]
    assert sum(lengths[::2]) == 71, lengths
    assert max(lengths) - min(lengths) <= 2, lengths


def test_zigzag_assignment():
    for n, p in [(8, 2), (7, 2), (100, 4), (1000, 4), (5, 4), (4, 4), (33, 3)]:
        shares = zigzag(n, p)
        together = np.sort(np.concatenate(shares))
        assert together.tolist() == list(range(n)), (n, p)
        assert all(np.all(np.diff(s) > 0) for s in shares), (n, p)
        assert max(map(len, shares)) - min(map(len, shares)) <= 1, (n, p, list(map(len, shares)))
        work = [int((s + 1).sum()) for s in shares]               # keys seen under the causal mask
        contiguous = [int((s + 1).sum()) for s in np.array_split(np.arange(n), p)]
        if n >= 25 * p:
            assert max(work) / min(work) < 1.1 < max(contiguous) / min(contiguous), (n, p, work, contiguous)
    assert [s.tolist() for s in zigzag(8, 2)] == [[0, 1, 6, 7], [2, 3, 4, 5]]


def test_check_refuses_bad_ulysses_and_variant(ckpts):
    cfg = ckpts["llama"].config                                    # 4 heads, 2 KV heads
    with pytest.raises(MeshError, match=r"4 attention heads and 2 KV heads.*sp=4.*'ring'"):
        check(cfg, Mesh(sp=4), {"sp_variant": "ulysses"})
    with pytest.raises(MeshError, match="sp_variant 'zigzag' is not one of"):
        check(cfg, Mesh(sp=2), {"sp_variant": "zigzag"})
    check(cfg, Mesh(sp=4), {"sp_variant": "ring"})
    check(cfg, Mesh(sp=2), {"sp_variant": "ulysses"})


@pytest.mark.skipif(not HAS_TP, reason="daskllm/parallel/tensor.py does not exist yet")
@pytest.mark.parametrize("variant,model", [("ring", "llama"), ("ulysses", "llama_mha_tied")])
def test_with_tensor_parallelism(ckpts, prompts, variant, model):
    ref_logits, ref_tokens = reference(ckpts[model], prompts)
    with InProcessReplica(ckpts[model], Mesh(tp=2, sp=2), options={"sp_variant": variant}) as rep:
        assert_same(rep.logits(prompts), ref_logits, f"{model} tp=2 sp=2 {variant}")
        assert rep.generate(prompts, NEW_TOKENS) == ref_tokens, f"{model} tp=2 sp=2 {variant}"


def test_tp_head_split_refused_for_ulysses(ckpts):
    with pytest.raises(MeshError, match=r"2 attention heads and 1 KV heads per tensor-parallel rank"):
        check(ckpts["llama"].config, Mesh(tp=2, sp=2), {"sp_variant": "ulysses"})


@pytest.mark.parametrize("mesh", [Mesh(sp=2), Mesh(sp=2, ep=2)], ids=str)
def test_moe_model(prompts, mesh):
    """A Mixtral checkpoint, alone and with its experts spread over the sp ranks (ep=2)."""
    ckpt = Checkpoint(GOLDEN / "mixtral")
    short = [p[:n] for p, n in zip(prompts, (1, 7, 100, 200))]
    with InProcessReplica(ckpt, Mesh()) as ref:
        want, want_tokens = ref.logits(short), ref.generate(short, NEW_TOKENS)
    with InProcessReplica(ckpt, mesh, options={"sp_variant": "ring"}) as rep:
        assert_same(rep.logits(short), want, f"mixtral {mesh}")
        assert rep.generate(short, NEW_TOKENS) == want_tokens, f"mixtral {mesh}: greedy tokens differ"
