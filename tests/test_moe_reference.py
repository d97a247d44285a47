"""The single-rank MoE reference against transformers' golden logits, and the ExpertLoad counts."""
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from safetensors.numpy import load_file

from daskllm.io.checkpoint import Checkpoint
from daskllm.model.moe import ExpertLoad
from daskllm.model.runner import Work
from daskllm.parallel.build import build_runner
from daskllm.parallel.compose import full_plan
from daskllm.parallel.local_mesh import InProcessReplica
from daskllm.parallel.mesh import Mesh

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]


def golden_cases(family):
    g = load_file(GOLDEN / family / "golden.safetensors")
    return [(g[f"tokens_{i}"].tolist(), g[f"logits_{i}"], g[f"greedy_{i}"].tolist()) for i in range(4)]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_logits_and_greedy_match_transformers(family):
    cases = golden_cases(family)
    with InProcessReplica(Checkpoint(GOLDEN / family), Mesh()) as rep:
        logits = rep.logits([tokens for tokens, _, _ in cases])
        greedy = rep.generate([tokens for tokens, _, _ in cases], 10)
    for i, (tokens, expected, expected_greedy) in enumerate(cases):
        scale = np.abs(expected).max()
        assert_allclose(logits[i] / scale, expected / scale, rtol=0, atol=1e-4,
                        err_msg=f"{family} case {i} ({len(tokens)} tokens): logits / max|logit|")
        assert greedy[i] == expected_greedy, f"{family} case {i}: greedy tokens"


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_expert_load_counts_every_choice(family):
    ckpt = Checkpoint(GOLDEN / family)
    moe = ckpt.config.moe
    load = ExpertLoad(ckpt.config.n_layers, moe.n_experts)
    runner = build_runner(ckpt, full_plan(ckpt.config, Mesh()), moe_stats=load)
    prompts = [t for t, _, _ in golden_cases(family)[1:3]]                 # 6 and 33 tokens
    runner.step([Work(i, tuple(p), 0) for i, p in enumerate(prompts)])  # prefill: 39 tokens
    runner.step([Work(i, (5,), len(p)) for i, p in enumerate(prompts)])  # decode: 2 tokens
    data = load.as_dict()
    assert data["n_experts"] == moe.n_experts
    assert data["layers"] == list(moe.sparse_layers)
    for step, n_tokens in zip(data["steps"], (39, 2)):
        for layer, counts in zip(data["layers"], step):
            assert len(counts) == moe.n_experts
            assert sum(counts) == n_tokens * moe.top_k, f"{family} layer {layer}: {counts}"
    assert len(data["steps"]) == 2
    assert_array_equal(np.sum(data["steps"], axis=0), data["total"], err_msg="totals = sum of steps")


def test_expert_load_keeps_bounded_history():
    load = ExpertLoad(n_experts=2, keep_steps=3)
    ids = np.array([[0, 1]])
    for _ in range(5):
        load.record_routing(0, ids, 2)
        load.record_routing(2, ids, 2)
    data = load.as_dict()
    assert data["layers"] == [0, 2]
    assert len(data["steps"]) == 3
    assert data["total"] == [[5, 5], [5, 5]]
    load.next_step()
    load.record_routing(2, ids, 2)                     # explicit step boundary, partial step
    assert load.as_dict()["steps"][-1] == [[0, 0], [1, 1]]
