"""Tensor parallelism: every tp mesh gives the single-rank logits, tokens and samples, in-process."""
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_allclose
from safetensors.numpy import load_file

from daskllm.io.checkpoint import Checkpoint
from daskllm.model.sampling import SamplingParams
from daskllm.parallel import tensor
from daskllm.parallel.compose import check, full_plan
from daskllm.parallel.local_mesh import InProcessReplica
from daskllm.parallel.mesh import Mesh, MeshError
from daskllm.parallel.plan import Replicated, Split, format_plan, rank_slices
from tp_checkpoints import write_checkpoint  # tests/ is on sys.path (pytest prepend import mode)

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
FAMILIES = sorted(p.name for p in GOLDEN.iterdir() if (p / "config.json").exists())
NEW_TOKENS = 6
SAMPLING = [SamplingParams(0.8, 0, 1.0, seed=11),           # plain: Gumbel-max over the whole vocabulary
            SamplingParams(0.7, 20, 0.9, seed=12),          # top-k then top-p
            SamplingParams(1.3, 0, 0.95, seed=13)]          # top-p alone (may need every logit)


def run(checkpoint, mesh, prompts, params=SamplingParams()):
    """(logits of each prompt, tokens generated after each prompt) on one replica."""
    with InProcessReplica(checkpoint, mesh) as replica:
        return replica.logits(prompts), replica.generate(prompts, NEW_TOKENS, params)


def assert_same(got, want, what):
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, f"{what}: sequence {i} shape {g.shape} != {w.shape}"
        tol = 1e-5 * float(np.abs(w).max())
        for t in range(len(w)):
            assert_allclose(g[t], w[t], rtol=1e-5, atol=tol, err_msg=f"{what}: sequence {i} token {t}")


@pytest.fixture(scope="module")
def references():
    """Single-rank logits and greedy tokens per fixture family, computed once."""
    cache = {}

    def get(family):
        if family not in cache:
            ckpt = Checkpoint(GOLDEN / family)
            golden = load_file(str(GOLDEN / family / "golden.safetensors"))
            prompts = [golden[f"tokens_{i}"].tolist() for i in (2, 0, 1)]     # lengths 33, 1, 6
            greedy = [golden[f"greedy_{i}"][:NEW_TOKENS].tolist() for i in (2, 0, 1)]
            cache[family] = (ckpt, prompts, greedy, *run(ckpt, Mesh(), prompts))
        return cache[family]
    return get


@pytest.mark.parametrize("tp", [2, 3, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_fixture_matches_single_rank(references, family, tp):
    ckpt, prompts, golden_greedy, ref_logits, ref_tokens = references(family)
    assert ref_tokens == golden_greedy, f"{family}: the single-rank reference drifted from transformers"
    logits, tokens = run(ckpt, Mesh(tp=tp), prompts)
    assert_same(logits, ref_logits, f"{family} tp={tp}")
    assert tokens == ref_tokens, f"{family} tp={tp}: greedy tokens differ"


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """6 heads / 3 KV heads, vocabulary 385, MLP 100: nothing but the heads divides by 3 or 6."""
    return Checkpoint(write_checkpoint(tmp_path_factory.mktemp("uneven"), seed=1))


@pytest.fixture(scope="module")
def uneven_moe(tmp_path_factory):
    """Qwen2-MoE shape with experts of width 50 and a shared expert of 70, vocabulary 385."""
    return Checkpoint(write_checkpoint(tmp_path_factory.mktemp("uneven_moe"), family="qwen2_moe", seed=2))


PROMPTS = [list(range(5, 45)), [7], [300, 384, 2, 150, 99, 1, 0]]    # ids at both ends of the vocabulary


@pytest.mark.parametrize("tp", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("which", ["uneven", "uneven_moe"])
def test_uneven_cuts_match_single_rank(request, which, tp):
    ckpt = request.getfixturevalue(which)
    ref_logits, ref_tokens = run(ckpt, Mesh(), PROMPTS)
    logits, tokens = run(ckpt, Mesh(tp=tp), PROMPTS)
    assert_same(logits, ref_logits, f"{which} tp={tp}")
    assert tokens == ref_tokens, f"{which} tp={tp}: greedy tokens differ"


@pytest.mark.parametrize("params", SAMPLING, ids=["plain", "top_k_top_p", "top_p"])
def test_seeded_sampling_matches_single_rank(uneven, params):
    _, want = run(uneven, Mesh(), PROMPTS, params)
    for tp in (3, 6):
        _, got = run(uneven, Mesh(tp=tp), PROMPTS, params)
        assert got == want, f"tp={tp} {params}: sampled tokens differ"


def _rank_bytes(ckpt, mesh):
    with InProcessReplica(ckpt, mesh) as replica:
        return [r.model.weights.nbytes() for r in replica.runners]


def _replicated_bytes(ckpt, plan):
    return sum(4 * int(np.prod(ckpt.shape(n))) for n, s in plan.items() if isinstance(s, Replicated))


def test_rank_holds_its_share_of_the_weights(uneven):
    llama = Checkpoint(GOLDEN / "llama")
    (single,) = _rank_bytes(llama, Mesh())
    norms = _replicated_bytes(llama, full_plan(llama.config, Mesh(tp=2)))
    assert norms < 0.01 * single
    for r, got in enumerate(_rank_bytes(llama, Mesh(tp=2))):    # every width divides by 2: exact
        assert got == (single - norms) // 2 + norms, f"llama tp=2 rank {r}: {got} bytes of {single}"

    (single,) = _rank_bytes(uneven, Mesh())
    replicated = _replicated_bytes(uneven, full_plan(uneven.config, Mesh(tp=3)))
    per_rank = _rank_bytes(uneven, Mesh(tp=3))
    for r, got in enumerate(per_rank):
        assert got <= 1.02 * (single - replicated) / 3 + replicated, f"uneven tp=3 rank {r}: {got} of {single}"
    assert sum(per_rank) == single + 2 * replicated, "the shards do not add up to the whole model"


def test_plan_is_printable_and_cuts_kv_heads_with_their_queries():
    cfg = Checkpoint(GOLDEN / "olmoe").config            # 4 heads, 2 KV heads, full q/k norm
    plan = full_plan(cfg, Mesh(tp=4))
    text = format_plan(plan)
    assert all(name in text for name in plan)
    assert plan["layers.0.wk"] == Split(0, "tp", (16, 16), repeat=2)
    assert plan["layers.0.k_norm"] == plan["layers.0.wk"] and plan["layers.0.q_norm"] == plan["layers.0.wq"]
    assert plan["layers.0.wo"] == Split(1, "tp", (16, 16, 16, 16))
    assert plan["layers.0.router"] == Replicated() and plan["layers.0.attn_norm"] == Replicated()
    for r in range(4):      # rank r's query head r (group size 2) uses KV head r * 2 // 4
        (rows, _) = rank_slices({"wk": plan["layers.0.wk"]}, {"wk": (32, 64)}, {"tp": r})["wk"]
        assert (rows.start, rows.stop) == (16 * (r * 2 // 4), 16 * (r * 2 // 4) + 16), f"rank {r}"
    qwen3 = Checkpoint(GOLDEN / "qwen3").config           # per-head norms stay whole
    assert full_plan(qwen3, Mesh(tp=2))["layers.0.q_norm"] == Replicated()


@pytest.mark.parametrize("heads, kv, tp, message", [
    (4, 2, 5, "tp (5) exceeds the attention heads (4) of this llama model: tensor parallelism splits "
              "whole heads, so each rank needs at least one; use tp <= 4"),
    (4, 2, 3, None),
    (6, 3, 2, None),
    (9, 3, 4, None),
    (8, 4, 8, None),
    (8, 2, 8, None),
])
def test_check_refuses_only_what_cannot_be_split(heads, kv, tp, message):
    cfg = Checkpoint(GOLDEN / "llama").config.with_(n_heads=heads, n_kv_heads=kv, head_dim=8)
    if message is None:
        check(cfg, Mesh(tp=tp), {})
        return
    with pytest.raises(MeshError) as e:
        check(cfg, Mesh(tp=tp), {})
    assert str(e.value) == message


@pytest.mark.parametrize("heads, kv, tp, want", [
    (9, 3, 2, [(6, 2), (3, 1)]),                 # SmolLM2 at tp=2: whole GQA groups, 2 + 1
    (9, 3, 3, [(3, 1)] * 3),
    (4, 2, 3, [(1, 1), (1, 1), (2, 1)]),         # KV head 0 on ranks 0 and 1, KV head 1 on rank 2
    (9, 3, 4, [(2, 1), (1, 1), (3, 1), (3, 1)]),
    (8, 2, 8, [(1, 1)] * 8),
])
def test_heads_split_by_whole_groups(heads, kv, tp, want):
    cfg = Checkpoint(GOLDEN / "llama").config.with_(n_heads=heads, n_kv_heads=kv, head_dim=8)
    assert tensor.rank_heads(cfg, tp) == want
    q_spec, kv_spec = tensor.head_specs(cfg, tp)
    for r, (q, k) in enumerate(want):
        lo, hi = q_spec.bounds(r)
        klo, khi = kv_spec.bounds(r)
        assert (hi - lo, khi - klo) == (8 * q, 8 * k), f"rank {r}"
        g = heads // kv                       # the rank's query heads use exactly its KV heads
        assert (lo // 8) // g == klo // 8 and (hi // 8 - 1) // g == khi // 8 - 1, f"rank {r}"
    assert "rank 1: " + f"{want[1][0]} query + {want[1][1]} KV heads" in tensor.describe_heads(cfg, tp)


def test_plan_shows_the_uneven_split():
    cfg = Checkpoint(GOLDEN / "llama").config.with_(n_heads=9, n_kv_heads=3, head_dim=8)
    plan = full_plan(cfg, Mesh(tp=2))
    assert str(plan["layers.0.wq"]) == "Split(dim=0, axis='tp', sizes=[48, 24])"
    assert str(plan["layers.0.wk"]) == "Split(dim=0, axis='tp', sizes=[16, 8])"
    assert str(plan["layers.0.wo"]) == "Split(dim=1, axis='tp', sizes=[48, 24])"
    plan3 = full_plan(Checkpoint(GOLDEN / "llama").config, Mesh(tp=3))      # 4 heads / 2 KV heads
    assert str(plan3["layers.0.wk"]) == "Split(dim=0, axis='tp', sizes=[16, 16], repeat=[2, 1])"


def test_refused_before_any_rank_is_built():
    with pytest.raises(MeshError, match=r"tp \(5\) exceeds the attention heads \(4\)"):
        InProcessReplica(Checkpoint(GOLDEN / "llama"), Mesh(tp=5))
    assert tensor.valid_tp(Checkpoint(GOLDEN / "llama_mqa_linear").config) == [1, 2, 3, 4]


@pytest.mark.cluster
def test_llm_on_a_cluster_matches_transformers(client):
    """OLMoE at tp=4 (replicated KV heads, split full q/k norms, split experts) on 4 worker processes."""
    from daskllm import LLM
    golden = load_file(str(GOLDEN / "olmoe" / "golden.safetensors"))
    prompts = [golden[f"tokens_{i}"].tolist() for i in range(4)]
    with LLM(GOLDEN / "olmoe", tp=4, client=client) as llm:
        assert "Split(dim=0, axis='tp', sizes=[16, 16], repeat=2)" in llm.plan()
        outs = llm.generate(prompts, max_new_tokens=10, ignore_eos=True)
        logits = llm.logits(prompts)
        reduces = [s["tp"]["all_reduce"]["calls"] for s in llm.comm_stats()]
    for i, out in enumerate(outs):
        assert out.token_ids == golden[f"greedy_{i}"].tolist(), f"case {i}"
        scale = float(np.abs(golden[f"logits_{i}"]).max())
        assert_allclose(logits[i] / scale, golden[f"logits_{i}"] / scale, atol=1e-5, err_msg=f"case {i}")
    assert len(set(reduces)) == 1 and reduces[0] > 0, f"all-reduce calls per rank: {reduces}"
