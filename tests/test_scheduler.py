"""The replica scheduler on its own (a scripted replica): batching order and no stranded request."""
from __future__ import annotations

import pytest

from daskllm.engine.request import Request
from daskllm.engine.scheduler import ReplicaEngine
from daskllm.model.sampling import SamplingParams


class ScriptedReplica:
    """Answers every sampling sequence with token 7 and records the work of each step."""
    index = 0

    def __init__(self):
        self.steps = []

    def step(self, work, release=()):
        self.steps.append([(w.seq, len(w.tokens), w.start, w.sample) for w in work])
        return {w.seq: 7 for w in work if w.sample}


def _request(prompt_len, new_tokens, decoder=None):
    return Request(list(range(prompt_len)), SamplingParams(), new_tokens, decoder=decoder)


def test_long_prompts_are_chunked_and_decodes_go_first():
    replica = ScriptedReplica()
    engine = ReplicaEngine(replica, budget_tokens=10_000, max_batch_tokens=8, on_lost=None)
    try:
        first = _request(3, 4)
        engine.submit(first)
        assert first.wait(timeout=10).token_ids == [7, 7, 7, 7]
        long = _request(20, 2)
        engine.submit(long)
        assert long.wait(timeout=10).token_ids == [7, 7]
    finally:
        engine.close()
    chunks = [step for step in replica.steps if any(seq == long.id for seq, *_ in step)]
    assert [c[0][1:] for c in chunks[:3]] == [(8, 0, False), (8, 8, False), (4, 16, True)]


def test_a_failing_request_fails_everything_queued_instead_of_hanging():
    class BrokenDecoder:
        def step(self, token):
            raise UnicodeError("cannot decode")

    engine = ReplicaEngine(ScriptedReplica(), budget_tokens=10_000, max_batch_tokens=64, on_lost=None)
    try:
        broken, other = _request(3, 4, BrokenDecoder()), _request(3, 4)
        with engine._cond:                     # both queued before the scheduler looks
            engine._waiting.extend([broken, other])
            engine._cond.notify()
        for req in (broken, other):
            with pytest.raises(RuntimeError, match="scheduler stopped: UnicodeError: cannot decode"):
                req.wait(timeout=10)
        assert not engine.alive
    finally:
        engine.close()
