"""Next-token choice: greedy, seeded sampling, top-k/top-p, and the same tokens with a split vocabulary."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from daskllm.comm.threads import thread_group
from daskllm.model.sampling import SamplingParams, next_tokens


def _logits(b=3, v=50, seed=0):
    return np.random.default_rng(seed).standard_normal((b, v)).astype(np.float32) * 3


def test_greedy_is_argmax():
    logits = _logits()
    assert next_tokens(logits, 0, [SamplingParams()] * 3, [0, 0, 0]).tolist() == logits.argmax(1).tolist()


def test_same_seed_same_tokens_other_seed_other_tokens():
    logits = _logits(b=1, v=1000)
    p = SamplingParams(temperature=1.0, seed=7)
    runs = [[int(next_tokens(logits, 0, [p], [c])[0]) for c in range(30)] for _ in range(2)]
    assert runs[0] == runs[1]
    other = [int(next_tokens(logits, 0, [SamplingParams(temperature=1.0, seed=8)], [c])[0]) for c in range(30)]
    assert other != runs[0]


def test_sampling_follows_the_softmax():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    counts = np.bincount([int(next_tokens(logits, 0, [SamplingParams(1.0, seed=3)], [c])[0]) for c in range(4000)],
                         minlength=4) / 4000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.03)


def test_top_k_and_top_p_restrict_the_choice():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    picks_k = {int(next_tokens(logits, 0, [SamplingParams(1.0, top_k=2, seed=1)], [c])[0]) for c in range(300)}
    assert picks_k == {0, 1}
    picks_p = {int(next_tokens(logits, 0, [SamplingParams(1.0, top_p=0.7, seed=1)], [c])[0]) for c in range(300)}
    assert picks_p == {0, 1}                        # 0.5 + 0.3 >= 0.7: the nucleus is the first two
    assert {int(next_tokens(logits, 0, [SamplingParams(1.0, top_p=0.4, seed=1)], [c])[0]) for c in range(50)} == {0}


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(0.9, seed=5), SamplingParams(0.7, top_k=5, seed=5),
                                    SamplingParams(1.2, top_p=0.9, seed=5), SamplingParams(1.0, top_k=20, top_p=0.5, seed=2)])
@pytest.mark.parametrize("ranks", [2, 3])
def test_split_vocabulary_chooses_the_same_token(params, ranks):
    logits = _logits(b=4, v=301, seed=1)
    counters = [0, 3, 9, 11]
    expected = next_tokens(logits, 0, [params] * 4, counters)
    bounds = np.linspace(0, 301, ranks + 1).astype(int)
    comms = thread_group(ranks, tag="tp", default_timeout=10)
    with ThreadPoolExecutor(ranks) as pool:
        got = list(pool.map(lambda r: next_tokens(logits[:, bounds[r]:bounds[r + 1]], bounds[r], [params] * 4,
                                                  counters, comms[r]), range(ranks)))
    for r in range(ranks):
        assert got[r].tolist() == expected.tolist(), f"rank {r} of {ranks} chose differently"


def test_top_p_beyond_the_candidates_falls_back_exactly():
    logits = np.zeros((1, 1000), np.float32)        # flat: the nucleus of 0.99 holds 990 tokens > 256 candidates
    p = SamplingParams(1.0, top_p=0.99, seed=4)
    picks = {int(next_tokens(logits, 0, [p], [c])[0]) for c in range(200)}
    assert len(picks) > 150 and max(picks) > 256


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -1.0}, "temperature must be >= 0"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"top_k": -2}, "top_k must be >= 0"),
])
def test_bad_sampling_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
