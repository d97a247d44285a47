"""Sequence parallelism on a LocalCluster: exact, and it serves a prompt one rank's KV budget cannot hold."""
from __future__ import annotations

import dask
import numpy as np
import pytest
from conftest import golden_dir, load_golden

from daskllm import LLM
from daskllm.engine.validate import RequestError, kv_bytes_per_token
from daskllm.parallel.mesh import Mesh

pytestmark = pytest.mark.cluster


@pytest.mark.parametrize("variant", ["ring", "allgather", "ulysses"])
def test_sp2_on_workers_matches_transformers(client, variant):
    golden = load_golden("llama")
    prompts = [golden[f"tokens_{i}"].tolist() for i in range(4)]
    with LLM(golden_dir("llama"), sp=2, sp_variant=variant, client=client) as llm:
        outs = llm.generate(prompts, max_new_tokens=10, ignore_eos=True)
        assert [o.token_ids for o in outs] == [golden[f"greedy_{i}"].tolist() for i in range(4)]
        logits = llm.logits([prompts[3]])[0]
        scale = np.abs(golden["logits_3"]).max()
        np.testing.assert_allclose(logits / scale, golden["logits_3"] / scale, atol=1e-4, err_msg=variant)


def test_a_prompt_beyond_one_ranks_kv_budget_runs_on_two(client):
    llama = golden_dir("llama")
    with LLM(llama, client=client) as probe:
        per_token = kv_bytes_per_token(probe.config, Mesh())
    prompt = (np.arange(200) * 7 % 380 + 3).tolist()
    with dask.config.set({"daskllm.kv-cache-bytes": 150 * per_token}):
        with LLM(llama, client=client) as one:
            assert one.budget_tokens == 150
            with pytest.raises(RequestError, match=r"needs 262 tokens of KV cache \(210 of prompt \+ max_new_tokens, with the cache's growth room\) "
                               r".* holds at most 150.*split the sequence with sp"):
                one.generate([prompt], max_new_tokens=10)
        with LLM(llama, sp=2, client=client) as two:
            assert two.budget_tokens == 300
            got = two.generate([prompt], max_new_tokens=10, ignore_eos=True)[0].token_ids
    with LLM(llama, client=client) as reference:
        assert got == reference.generate([prompt], max_new_tokens=10, ignore_eos=True)[0].token_ids
