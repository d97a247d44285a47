"""The single-rank reference against transformers' golden logits and greedy tokens (dense families)."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import DENSE, golden_dir, load_golden

from daskllm.io.checkpoint import Checkpoint
from daskllm.parallel.local_mesh import InProcessReplica
from daskllm.parallel.mesh import Mesh


@pytest.mark.parametrize("family", DENSE)
def test_reference_matches_transformers(family):
    golden = load_golden(family)
    with InProcessReplica(Checkpoint(golden_dir(family)), Mesh()) as rep:
        for i in range(4):
            tokens, expected = golden[f"tokens_{i}"].tolist(), golden[f"logits_{i}"]
            got = rep.logits([tokens])[0]
            scale = np.abs(expected).max()
            np.testing.assert_allclose(got / scale, expected / scale, atol=1e-4, rtol=0,
                                       err_msg=f"{family} case {i} ({len(tokens)} tokens)")
            greedy = rep.generate([tokens], len(golden[f"greedy_{i}"]))[0]
            assert greedy == golden[f"greedy_{i}"].tolist(), f"{family} case {i}: greedy tokens differ"


def test_batch_of_different_lengths_equals_one_at_a_time():
    golden = load_golden("qwen2")
    seqs = [golden[f"tokens_{i}"].tolist() for i in range(4)]
    with InProcessReplica(Checkpoint(golden_dir("qwen2")), Mesh()) as rep:
        together = rep.logits(seqs)
        for i, seq in enumerate(seqs):
            np.testing.assert_allclose(together[i], golden[f"logits_{i}"], atol=1e-4 * np.abs(golden[f"logits_{i}"]).max(),
                                       err_msg=f"sequence {i} in a batch")
        batched = rep.generate(seqs, 6)
        for i, seq in enumerate(seqs):
            assert batched[i] == golden[f"greedy_{i}"].tolist()[:6], f"sequence {i}: batched greedy differs"
