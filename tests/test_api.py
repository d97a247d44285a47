"""The public API end to end on a multi-process LocalCluster: one rank actor on a worker."""
from __future__ import annotations

import asyncio
import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import golden_dir, load_golden

from daskllm import LLM
from daskllm.engine.validate import RequestError

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def llm(client):
    with LLM(golden_dir("llama"), client=client) as model:
        yield model


def _steps(llm):
    return sum(e.steps for e in llm.router.engines)


def test_greedy_tokens_and_logits_match_transformers(llm):
    golden = load_golden("llama")
    prompts = [golden[f"tokens_{i}"].tolist() for i in range(4)]
    outs = llm.generate(prompts, max_new_tokens=10, ignore_eos=True)
    for i, out in enumerate(outs):
        assert out.token_ids == golden[f"greedy_{i}"].tolist(), f"case {i}"
        assert out.prompt_token_ids == prompts[i] and out.finish_reason == "length"
    for i, logits in enumerate(llm.logits(prompts)):
        scale = np.abs(golden[f"logits_{i}"]).max()
        np.testing.assert_allclose(logits / scale, golden[f"logits_{i}"] / scale, atol=1e-4, err_msg=f"case {i}")


def test_stream_gives_the_same_text_as_generate(llm):
    out = llm.generate("The cat sat on", max_new_tokens=20, ignore_eos=True)[0]
    pieces = list(llm.stream("The cat sat on", max_new_tokens=20, ignore_eos=True))
    assert "".join(pieces) == out.text and len(pieces) > 1


def test_stop_string_ends_the_text_before_it(llm):
    full = llm.generate("Hello there", max_new_tokens=24, ignore_eos=True)[0].text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    out = llm.generate("Hello there", max_new_tokens=24, ignore_eos=True, stop=[stop])[0]
    assert out.finish_reason == "stop" and out.text == full[:full.find(stop)]
    assert "".join(llm.stream("Hello there", max_new_tokens=24, ignore_eos=True, stop=stop)) == out.text


def test_seeded_sampling_repeats_and_differs_by_seed(llm):
    a = llm.generate([[5, 6, 7]], max_new_tokens=12, temperature=0.9, top_p=0.95, seed=11, ignore_eos=True)[0]
    b = llm.generate([[5, 6, 7]], max_new_tokens=12, temperature=0.9, top_p=0.95, seed=11, ignore_eos=True)[0]
    c = llm.generate([[5, 6, 7]], max_new_tokens=12, temperature=0.9, top_p=0.95, seed=12, ignore_eos=True)[0]
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


def test_concurrent_callers_and_asyncio(llm):
    golden = load_golden("llama")
    prompts = [golden[f"tokens_{i}"].tolist() for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda p: llm.generate([p], max_new_tokens=10, ignore_eos=True)[0], prompts))
    assert [o.token_ids for o in outs] == [golden[f"greedy_{i}"].tolist() for i in range(4)]

    async def main():
        got = await asyncio.gather(*[llm.agenerate([p], max_new_tokens=10, ignore_eos=True) for p in prompts])
        pieces = [p async for p in llm.astream("Hi", max_new_tokens=5, ignore_eos=True)]
        return got, pieces
    got, pieces = asyncio.run(main())
    assert [g[0].token_ids for g in got] == [o.token_ids for o in outs]
    assert "".join(pieces) == llm.generate("Hi", max_new_tokens=5, ignore_eos=True)[0].text


@pytest.mark.parametrize("call, message", [
    (lambda m: m.generate([[1] * 250], max_new_tokens=10), r"250 tokens \+ max_new_tokens 10 = 260 exceeds the model's context of 256"),
    (lambda m: m.generate([[1, 384]]), r"token id 384 is outside the vocabulary \(ids must be in 0\.\.383\)"),
    (lambda m: m.generate(["hi"], temperature=-0.5), "temperature must be >= 0"),
    (lambda m: m.generate(["hi"], temperature=1.0, top_p=0.0), r"top_p must be in \(0, 1\]"),
    (lambda m: m.generate(["hi"], temperature=1.0, top_p=1.01), r"top_p must be in \(0, 1\]"),
    (lambda m: m.generate(["hi"], max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (lambda m: m.generate([[]]), "empty prompt"),
    (lambda m: m.logits([[1, -1]]), "token id -1 is outside the vocabulary"),
])
def test_bad_requests_are_refused_before_any_step(llm, call, message):
    before = _steps(llm)
    with pytest.raises((ValueError, RequestError), match=message):
        call(llm)
    assert _steps(llm) == before


def test_eos_stops_generation(client, tmp_path):
    d = tmp_path / "llama_eos"
    shutil.copytree(golden_dir("llama"), d)
    golden = load_golden("llama")
    first = int(golden["greedy_2"][0])
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": first}))
    with LLM(d, client=client) as model:
        out = model.generate([golden["tokens_2"].tolist()], max_new_tokens=10)[0]
        assert out.token_ids == [first] and out.finish_reason == "eos"
        assert len(model.generate([golden["tokens_2"].tolist()], max_new_tokens=10, ignore_eos=True)[0].token_ids) == 10


def test_mesh_larger_than_the_cluster_is_refused_before_any_actor(client):
    with pytest.raises(ValueError, match=r"needs 8 workers \(one rank per worker\) but the cluster has 4"):
        LLM(golden_dir("llama"), dp=8, client=client)


def test_close_then_a_new_llm_on_the_same_client(client):
    first = LLM(golden_dir("qwen2"), client=client)
    tokens = first.generate([[3, 4, 5]], max_new_tokens=4, ignore_eos=True)[0].token_ids
    first.close()
    with LLM(golden_dir("qwen2"), client=client) as second:
        assert second.generate([[3, 4, 5]], max_new_tokens=4, ignore_eos=True)[0].token_ids == tokens


def test_a_request_that_can_never_fit_the_kv_budget_is_refused(client):
    import dask
    per_token = 2 * (2 * 2 * 16 * 4 + 8)            # 2 layers x (k and v: 2 KV heads x 16 dims x 4 bytes + position)
    with dask.config.set({"daskllm.kv-cache-bytes": 70 * per_token}):
        with LLM(golden_dir("llama"), client=client) as small:
            assert small.budget_tokens == 70
            # a rank's cache grows with a margin (54 tokens take 70 entries), and the driver reserves it
            assert len(small.generate([[1] * 44], max_new_tokens=10, ignore_eos=True)[0].token_ids) == 10
            with pytest.raises(RequestError, match=r"needs 71 tokens of KV cache \(55 of prompt .* holds at most 70"):
                small.generate([[1] * 45], max_new_tokens=10)
            # many requests that fit one at a time wait for room instead of failing
            outs = small.generate([[1] * 20] * 4, max_new_tokens=10, ignore_eos=True)
            assert all(len(o.token_ids) == 10 for o in outs)


def test_a_bad_device_is_refused_before_any_cluster_starts():
    with pytest.raises(ValueError, match=r"device must be 'cpu' or 'cuda' \(CuPy on GPU workers\), got 'tpu'"):
        LLM(golden_dir("llama"), device="tpu")


def test_cuda_without_cupy_says_how_to_install_it():
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy is installed here; the message is for machines without it")
    except ImportError:
        pass
    from daskllm.parallel.build import array_module_for
    with pytest.raises(RuntimeError, match=r"device='cuda' needs CuPy on the workers: pip install 'daskllm\[gpu\]'"):
        array_module_for("cuda")


def test_without_a_tokenizer_token_ids_work_and_text_is_refused(client, tmp_path):
    d = tmp_path / "no_tokenizer"
    shutil.copytree(golden_dir("llama"), d)
    (d / "tokenizer.json").unlink()
    with LLM(d, client=client) as llm:
        assert len(llm.generate([[1, 2, 3]], max_new_tokens=3, ignore_eos=True)[0].token_ids) == 3
        with pytest.raises(RequestError, match="text prompts need a tokenizer.json in the checkpoint; pass token ids"):
            llm.generate("hello")
        with pytest.raises(ValueError, match="stop strings need a tokenizer.json"):
            llm.generate([[1, 2]], stop=["x"])
