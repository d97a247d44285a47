"""Weight dtypes through the real runtime: rank actors on worker processes give the in-process
single-rank logits of their dtype, hold the bytes the plan says, and refuse what cannot fit."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import golden_dir, load_golden

import daskllm.api
import daskllm.runtime.sizing
from daskllm import LLM
from daskllm.io.checkpoint import Checkpoint
from daskllm.parallel.local_mesh import InProcessReplica
from daskllm.parallel.mesh import Mesh

pytestmark = pytest.mark.cluster


def _prompts(family):
    golden = load_golden(family)
    return [golden[f"tokens_{i}"].tolist() for i in (2, 1)]


def _single(family, dtype, prompts):
    with InProcessReplica(Checkpoint(golden_dir(family)), Mesh(), options={"dtype": dtype}, timeout=300) as rep:
        return rep.logits(prompts), rep.generate(prompts, 6)


def _assert_logits(got, want, what):
    for i, (g, w) in enumerate(zip(got, want)):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * np.abs(w).max(), err_msg=f"{what}: prompt {i}")


def _stored(family):
    return {"llama_bf16": "bfloat16", "llama_fp16": "float16"}.get(family, "float32")


@pytest.mark.parametrize("family, dtype, mesh", [
    ("llama", "int8", dict(tp=2)),
    ("llama_bf16", "auto", dict(tp=2, sp=2)),
    ("mixtral", "int8", dict(tp=2, ep=2)),
    ("qwen2_moe", "float16", dict(ep=2)),
])
def test_workers_give_the_single_rank_logits_of_the_dtype(client, family, dtype, mesh):
    prompts = _prompts(family)
    want_logits, want_tokens = _single(family, dtype, prompts)
    with LLM(golden_dir(family), client=client, dtype=dtype, **mesh) as llm:
        _assert_logits(llm.logits(prompts), want_logits, f"{family} {dtype} {mesh}")
        assert [o.token_ids for o in llm.generate(prompts, max_new_tokens=6, ignore_eos=True)] == want_tokens
        held = [s["memory"]["weights_bytes"] for s in llm.stats()]
        assert held == llm.weight_bytes(), "ranks hold other bytes than the plan computed"
        label = dtype if dtype != "auto" else "auto: " + ", ".join(sorted({"float32", _stored(family)}))
        assert llm.dtype_label == label
        assert f"rank 0: {held[0] / 2**20:.2f} MiB of weights ({label})" in llm.plan()


def test_two_replicas_and_shipped_int8_slices(client):
    prompts = _prompts("qwen3")
    want_logits, want_tokens = _single("qwen3", "int8", prompts)
    with LLM(golden_dir("qwen3"), dp=2, client=client, dtype="int8") as llm:
        assert [o.token_ids for o in llm.generate(prompts * 2, max_new_tokens=6, ignore_eos=True)] == want_tokens * 2
    with LLM(golden_dir("qwen3"), tp=2, client=client, dtype="int8", ship_weights=True) as llm:
        _assert_logits(llm.logits(prompts), want_logits, "shipped int8 tp=2")


def test_a_dtype_too_big_for_the_workers_is_refused_before_any_rank_starts(client, monkeypatch):
    tiny = [(addr, threads, 100_000) for addr, threads, _ in daskllm.runtime.sizing.worker_table(client)]
    monkeypatch.setattr(daskllm.runtime.sizing, "worker_table", lambda c: tiny)
    started = []
    monkeypatch.setattr(daskllm.api, "Replica", lambda *a, **k: started.append(a))
    with pytest.raises(ValueError, match=r"dtype 'float32': rank 0 of each replica would hold 0.00 GiB of weights, "
                                         r"but its worker has a memory limit of 0.00 GiB; use a smaller weight dtype "
                                         r"\(int8 would need"):
        LLM(golden_dir("llama"), client=client, dtype="float32")
    assert not started


def test_unknown_dtype_is_refused_before_connecting(monkeypatch):
    monkeypatch.setattr(LLM, "_connect", lambda *a: pytest.fail("connected to a cluster"))
    with pytest.raises(ValueError, match=r"dtype must be one of 'auto', 'float32', 'bfloat16', 'float16', 'int8', "
                                         r"got 'fp8'"):
        LLM(golden_dir("llama"), dtype="fp8")
    with pytest.raises(Exception, match="dtype int8 at tp=4"):
        LLM(golden_dir("llama"), tp=4, dtype="int8")
