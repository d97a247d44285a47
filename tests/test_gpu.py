"""The GPU path: the same ranks on CuPy arrays give the NumPy reference (needs an NVIDIA GPU)."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import golden_dir, load_golden

from daskllm.io.checkpoint import Checkpoint
from daskllm.model.sampling import SamplingParams
from daskllm.parallel.local_mesh import InProcessReplica
from daskllm.parallel.mesh import Mesh

cupy = pytest.importorskip("cupy", reason="the GPU path needs CuPy and an NVIDIA GPU; run on a GPU machine")
pytestmark = pytest.mark.gpu

MESHES = [dict(), dict(tp=2), dict(tp=4), dict(sp=2), dict(tp=2, sp=2), dict(ep=2), dict(tp=2, ep=2)]


@pytest.mark.parametrize("axes", MESHES, ids=str)
@pytest.mark.parametrize("family", ["llama", "qwen3", "mixtral", "olmoe"])
def test_cupy_ranks_match_the_numpy_reference(family, axes):
    cfg = Checkpoint(golden_dir(family)).config
    if axes.get("ep") and cfg.moe is None:
        pytest.skip("ep needs a MoE model")
    golden = load_golden(family)
    seqs = [golden[f"tokens_{i}"].tolist() for i in range(4)]
    with InProcessReplica(Checkpoint(golden_dir(family)), Mesh(**axes), xp=cupy) as rep:
        for i, got in enumerate(rep.logits(seqs)):
            want = golden[f"logits_{i}"]
            scale = np.abs(want).max()
            np.testing.assert_allclose(got / scale, want / scale, atol=1e-4, err_msg=f"{family} {axes} seq {i}")
        assert rep.generate(seqs, 10) == [golden[f"greedy_{i}"].tolist() for i in range(4)]
        sampled = rep.generate(seqs[:2], 6, SamplingParams(0.8, top_p=0.9, seed=3))
    with InProcessReplica(Checkpoint(golden_dir(family)), Mesh(**axes)) as cpu:
        assert sampled == cpu.generate(seqs[:2], 6, SamplingParams(0.8, top_p=0.9, seed=3))


def test_llm_on_a_gpu_worker():
    from distributed import Client, LocalCluster

    from daskllm import LLM
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        golden = load_golden("llama")
        with LLM(golden_dir("llama"), tp=2, device="cuda", client=client) as llm:
            outs = llm.generate([golden["tokens_3"].tolist()], max_new_tokens=10, ignore_eos=True)
            assert outs[0].token_ids == golden["greedy_3"].tolist()
