"""Every family through the real runtime (rank actors on worker processes, TCP between them):
tensor- and expert-parallel meshes give transformers' greedy tokens, and meshes combine."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import DENSE, MOE, golden_dir, load_golden
from tp_checkpoints import write_checkpoint

from daskllm import LLM

pytestmark = pytest.mark.cluster


def _golden_prompts(family):
    golden = load_golden(family)
    return [golden[f"tokens_{i}"].tolist() for i in range(4)], [golden[f"greedy_{i}"].tolist() for i in range(4)]


@pytest.mark.parametrize("family", DENSE + MOE)
def test_tp2_on_workers_gives_the_golden_tokens(client, family):
    prompts, expected = _golden_prompts(family)
    with LLM(golden_dir(family), tp=2, client=client) as llm:
        assert [o.token_ids for o in llm.generate(prompts, max_new_tokens=10, ignore_eos=True)] == expected


@pytest.mark.parametrize("family", MOE)
def test_ep2_on_workers_gives_the_golden_tokens(client, family):
    prompts, expected = _golden_prompts(family)
    with LLM(golden_dir(family), ep=2, client=client) as llm:
        assert [o.token_ids for o in llm.generate(prompts, max_new_tokens=10, ignore_eos=True)] == expected
        loads = llm.expert_load()
        assert len(loads) == 2 and all(np.asarray(load["total"]).sum() > 0 for load in loads)


def test_uneven_tp3_and_a_combined_mesh_match_one_rank(client, tmp_path):
    path = write_checkpoint(tmp_path / "uneven", heads=6, kv_heads=3, intermediate=100, vocab=385)
    prompts = [[5, 6, 7, 8, 9], list(range(40, 70))]
    with LLM(path, client=client) as single:
        expected = single.generate(prompts, max_new_tokens=8, ignore_eos=True)
        reference = single.logits([prompts[1]])[0]
    with LLM(path, tp=3, client=client) as llm:
        assert [o.token_ids for o in llm.generate(prompts, max_new_tokens=8, ignore_eos=True)] == \
            [o.token_ids for o in expected]
        np.testing.assert_allclose(llm.logits([prompts[1]])[0], reference, rtol=0,
                                   atol=1e-5 * np.abs(reference).max(), err_msg="tp=3 logits")
    moe = write_checkpoint(tmp_path / "moe", family="qwen2_moe", heads=4, kv_heads=2, hidden=32, experts=6)
    with LLM(moe, client=client) as single:
        expected = [o.token_ids for o in single.generate(prompts, max_new_tokens=8, ignore_eos=True)]
    with LLM(moe, dp=2, tp=2, ep=2, client=client) as llm:      # 2 replicas x (tp=2 = ep=2): all 4 workers
        assert [o.token_ids for o in llm.generate(prompts, max_new_tokens=8, ignore_eos=True)] == expected
    with LLM(moe, tp=2, sp=2, ep=4, client=client) as llm:
        assert [o.token_ids for o in llm.generate(prompts, max_new_tokens=8, ignore_eos=True)] == expected


def test_seeded_sampling_on_tp2_and_sp2_equals_one_rank(client):
    prompts = [[3, 4, 5, 6], list(range(20, 57))]
    kwargs = dict(max_new_tokens=12, temperature=0.9, top_k=40, top_p=0.9, seed=123, ignore_eos=True)
    with LLM(golden_dir("qwen2"), client=client) as single:
        expected = [o.token_ids for o in single.generate(prompts, **kwargs)]
    for axes in (dict(tp=2), dict(sp=2), dict(tp=2, sp=2)):
        with LLM(golden_dir("qwen2"), client=client, **axes) as llm:
            assert [o.token_ids for o in llm.generate(prompts, **kwargs)] == expected, axes


def test_runs_of_decode_steps_give_the_tokens_of_single_steps(client):
    """A run (daskllm.decode-steps): the ranks feed their own tokens; tp=2 ranks must agree on
    each, seeded sampling included, and a sequence that meets its eos mid-run stops there."""
    import dask
    prompts = [[3, 4, 5, 6], list(range(20, 57))]
    sampled = dict(max_new_tokens=12, temperature=0.9, top_k=40, seed=7, ignore_eos=True)
    results = {}
    for steps in (1, 5):
        with dask.config.set({"daskllm.decode-steps": steps}), LLM(golden_dir("llama"), tp=2, client=client) as llm:
            greedy = [o.token_ids for o in llm.generate(prompts, max_new_tokens=12, ignore_eos=True)]
            # eos: a token that first comes 3rd or later in one prompt's greedy tokens (it ends that
            # one mid-run; the other goes on unless it meets it too)
            row, at = next((r, i) for r, toks in enumerate(greedy) for i in range(2, 12) if toks[i] not in toks[:i])
            llm.eos_ids = (greedy[row][at],)
            stopped = llm.generate(prompts, max_new_tokens=12)
            results[steps] = (greedy, [o.token_ids for o in llm.generate(prompts, **sampled)],
                              [(o.token_ids, o.finish_reason) for o in stopped])
    assert results[5] == results[1]
    greedy, _, stopped = results[5]
    assert stopped[row] == (greedy[row][:at + 1], "eos")
