"""The replica scheduler and requests on their own (a scripted replica): batching order, errors
per request, cancelling, releasing caches, closing, and the text of a request."""
from __future__ import annotations

import threading
import time

import pytest

from daskllm.engine.request import Request, TextDecoder
from daskllm.engine.router import LLMClosedError, Router
from daskllm.engine.scheduler import ReplicaEngine
from daskllm.model.runner import Work
from daskllm.model.sampling import SamplingParams
from daskllm.runtime.replica import RankCallError


class ScriptedReplica:
    """Answers every sampling sequence with token 7 and records the work of each step and the
    sequences it was told to release; `fail_on(seq)` makes a step holding `seq` raise."""
    index = 0

    def __init__(self, delay=0.0):
        self.steps, self.released, self.delay, self.bad = [], [], delay, set()
        self.live = set()              # sequences with a cache on the "ranks"

    def step(self, work, release=()):
        self.release(release)
        time.sleep(self.delay)
        if any(w.seq in self.bad for w in work):
            self.live |= {w.seq for w in work}       # a half-done step leaves caches behind
            raise RankCallError("rank 0 failed in step: ValueError: bad input")
        self.steps.append([(w.seq, len(w.tokens), w.start, w.sample) for w in work])
        self.live |= {w.seq for w in work}
        return {w.seq: 7 for w in work if w.sample}

    def release(self, seq_ids):
        self.released += list(seq_ids)
        self.live -= set(seq_ids)


def _until(predicate, timeout=10):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


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


def test_an_error_in_one_request_fails_that_request_only():
    class BrokenDecoder:
        def step(self, token):
            raise UnicodeError("cannot decode")

    lost = []
    engine = ReplicaEngine(ScriptedReplica(), budget_tokens=10_000, max_batch_tokens=64,
                           on_lost=lambda *a: lost.append(a))
    try:
        broken, other = _request(3, 4, BrokenDecoder()), _request(3, 4)
        with engine._cond:                     # both queued before the scheduler looks
            engine._waiting.extend([broken, other])
            engine._cond.notify()
        with pytest.raises(RuntimeError, match=f"request {broken.id} failed: UnicodeError: cannot decode"):
            broken.wait(timeout=10)
        assert other.wait(timeout=10).token_ids == [7, 7, 7, 7]
        assert engine.alive and not lost
        later = _request(2, 2)
        engine.submit(later)
        assert later.wait(timeout=10).token_ids == [7, 7]
        _until(lambda: not engine.replica.live)          # the failed one's cache was freed too
    finally:
        engine.close()


def test_a_step_that_raises_on_the_ranks_fails_its_requests_and_frees_their_caches():
    replica = ScriptedReplica()
    engine = ReplicaEngine(replica, budget_tokens=10_000, max_batch_tokens=64, on_lost=None)
    try:
        bad = _request(3, 4)
        replica.bad.add(bad.id)
        engine.submit(bad)
        with pytest.raises(RankCallError, match="bad input"):
            bad.wait(timeout=10)
        _until(lambda: bad.id in replica.released and not replica.live)
        good = _request(3, 2)
        engine.submit(good)
        assert good.wait(timeout=10).token_ids == [7, 7] and engine.alive
    finally:
        engine.close()


def test_a_scheduler_bug_is_recorded_as_a_lost_replica():
    class Buggy(Request):
        @property
        def context(self):
            raise AssertionError("a bug in the loop")

    router = Router()
    engine = ReplicaEngine(ScriptedReplica(), budget_tokens=10_000, max_batch_tokens=64, on_lost=router.on_lost)
    router.add(engine)
    request = Buggy([1, 2, 3], SamplingParams(), 2)
    router.submit(request)
    with pytest.raises(RuntimeError, match="replica 0's scheduler stopped: AssertionError: a bug in the loop"):
        request.wait(timeout=10)
    _until(lambda: 0 in router.lost)                  # so restore() re-creates it
    assert not engine.alive and router.alive() == []
    engine.close()


def test_finished_sequences_are_released_without_waiting_for_another_step():
    replica = ScriptedReplica()
    engine = ReplicaEngine(replica, budget_tokens=10_000, max_batch_tokens=64, on_lost=None)
    try:
        request = _request(3, 2)
        engine.submit(request)
        request.wait(timeout=10)
        _until(lambda: request.id in replica.released)
        assert not replica.live and len(replica.steps) == 2
    finally:
        engine.close()


def test_cancel_ends_a_running_request_and_frees_its_cache():
    replica = ScriptedReplica(delay=0.01)
    engine = ReplicaEngine(replica, budget_tokens=100_000, max_batch_tokens=64, on_lost=None)
    try:
        request = _request(3, 10_000)
        engine.submit(request)
        _until(lambda: len(request.generated) >= 2)
        assert request.cancel() and not request.cancel()
        out = request.wait(timeout=1)
        assert out.finish_reason == "cancelled" and 2 <= len(out.token_ids) < 100
        _until(lambda: request.id in replica.released and not replica.live)
        steps = len(replica.steps)
        time.sleep(0.1)
        assert len(replica.steps) == steps, "the engine kept stepping a cancelled request"
        queued = _request(3, 5)
        assert queued.cancel()                       # cancelled before it ran: never fed at all
        engine.submit(queued)
        time.sleep(0.05)
        assert all(queued.id not in [s for s, *_ in step] for step in replica.steps)
    finally:
        engine.close()


def test_close_fails_running_and_queued_requests_and_later_submits():
    router = Router()
    engine = ReplicaEngine(ScriptedReplica(delay=0.01), budget_tokens=140, max_batch_tokens=64,
                           on_lost=router.on_lost)
    router.add(engine)
    running, queued = _request(3, 100), _request(3, 5)      # the budget admits one at a time
    router.submit(running)
    router.submit(queued)
    _until(lambda: running.generated)
    router.close()
    for r in (running, queued):
        with pytest.raises(LLMClosedError, match="this LLM is closed"):
            r.wait(timeout=5)
    with pytest.raises(LLMClosedError, match="this LLM is closed"):
        router.submit(_request(3, 1))


def test_pieces_can_be_read_again_and_by_two_readers():
    engine = ReplicaEngine(ScriptedReplica(delay=0.005), budget_tokens=10_000, max_batch_tokens=64,
                           on_lost=None)
    try:
        request = _request(3, 6)
        engine.submit(request)
        seen = []
        reader = threading.Thread(target=lambda: seen.append(list(request.pieces())))
        reader.start()
        first = list(request.pieces())
        reader.join(timeout=10)
        assert first == [7] * 6 and seen == [first] and list(request.pieces()) == first
    finally:
        engine.close()


class _ByteTokenizer:
    """Token id = one UTF-8 byte: a multi-byte character spans several tokens."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self):
        class Stream:
            def __init__(self):
                self.held = b""

            def step(self, token):
                self.held += bytes([token])
                try:
                    text, self.held = self.held.decode("utf-8"), b""
                    return text
                except UnicodeDecodeError:
                    return ""
        return Stream()


@pytest.mark.parametrize("cut", range(1, 7))
def test_final_text_is_the_decoded_ids_and_equals_the_stream(cut):
    tokens = list("aé€".encode())                     # 1 + 2 + 3 bytes
    request = Request([1], SamplingParams(), cut, decoder=TextDecoder(_ByteTokenizer()))
    for t in tokens[:cut]:
        request.add_token(t)
    out = request.wait(timeout=1)
    assert out.text == _ByteTokenizer().decode(tokens[:cut])
    assert "".join(request.pieces()) == out.text


def test_a_stop_string_completed_by_the_final_decode_still_stops():
    request = Request([1], SamplingParams(), 2, stop=("\ufffd",), decoder=TextDecoder(_ByteTokenizer()))
    request.add_token(ord("a"))
    request.add_token(0xC3)                           # half of "é": U+FFFD in the decoded text
    out = request.wait(timeout=1)
    assert out.text == "a" and out.finish_reason == "stop" and "".join(request.pieces()) == "a"


def test_logits_sequences_are_grouped_within_the_kv_budget():
    from daskllm.engine.validate import RequestError, budget_groups
    seqs = [[1] * 40, [2] * 30, [3] * 50, [4] * 10]
    groups = budget_groups(seqs, lambda n: n + 10, budget=100)       # reservations 50, 40, 60, 20
    assert [[len(s) for s, _ in g] for g in groups] == [[40, 30], [50, 10]]
    assert all(sum(n for _, n in g) <= 100 for g in groups)
    with pytest.raises(RequestError, match="KV cache"):
        budget_groups([[1] * 95], lambda n: n + 10, budget=100)


class RunningReplica(ScriptedReplica):
    """A ScriptedReplica that also takes runs of decode steps (submit_step with steps > 1), as a
    replica on control connections does: token = 100 + counter, so each token tells which step
    gave it; a sequence stops at one of its stop ids, and `fail_at_run_step` raises at that step
    of a run (the ranks then send nothing more for it)."""
    sends_ahead, pipeline_depth = True, 1

    def __init__(self, fail_at_run_step=None):
        super().__init__()
        self.messages, self.pending, self.fail_at_run_step = [], [], fail_at_run_step

    def submit_step(self, work, release=(), steps=1, stop_ids=()):
        self.messages.append(steps)
        self.release(release)
        stops = dict(zip((w.seq for w in work), stop_ids))
        for i in range(steps):
            if i == self.fail_at_run_step:
                self.pending.append(RankCallError("rank 0 failed in step: ValueError: mid-run"))
                return
            self.steps.append([(w.seq, len(w.tokens), w.start, w.sample) for w in work])
            self.live |= {w.seq for w in work}
            chosen = {w.seq: 100 + w.counter for w in work if w.sample}
            self.pending.append(chosen)
            work = [Work(w.seq, (chosen[w.seq],), w.start + len(w.tokens), True, w.params, w.counter + 1)
                    for w in work if chosen.get(w.seq) not in stops.get(w.seq, ())]

    def finish_step(self):
        answer = self.pending.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def step(self, work, release=()):              # a single step, answered at once
        self.submit_step(work, release)
        return self.finish_step()


class CharDecoder:
    def step(self, token):
        return chr(token)


def _steps(n):
    import dask
    return dask.config.set({"daskllm.decode-steps": n})


def test_a_steady_batch_decodes_in_runs_and_every_token_still_streams():
    replica = RunningReplica()
    with _steps(4):
        engine = ReplicaEngine(replica, budget_tokens=10_000, max_batch_tokens=64, on_lost=None)
        try:
            request = _request(3, 10)
            engine.submit(request)
            out = request.wait(timeout=10)
        finally:
            engine.close()
    assert out.token_ids == [100 + i for i in range(10)] and out.finish_reason == "length"
    assert list(request.pieces()) == out.token_ids                     # streamed one by one
    assert replica.messages == [1, 4, 4, 1]          # the prefill alone, runs, never past max_new_tokens
    assert [s[0][2] for s in replica.steps] == [0] + list(range(3, 12))      # one position after another
    assert len(engine.step_log) == 10                # a turn per step, runs included


def test_eos_a_stop_string_and_cancel_mid_run_end_requests_as_single_steps_do():
    def run(steps):
        replica = RunningReplica()
        with _steps(steps):
            engine = ReplicaEngine(replica, budget_tokens=10_000, max_batch_tokens=64, on_lost=None)
            try:
                eos = Request([1, 2, 3], SamplingParams(), 20, eos_ids=(103,))
                stop = Request([1, 2, 3], SamplingParams(), 20, stop=("ef",), decoder=CharDecoder())
                plain = _request(3, 9)
                with engine._cond:                   # one batch from the start
                    engine._waiting.extend([eos, stop, plain])
                    engine._cond.notify()
                outs = [r.wait(timeout=10) for r in (eos, stop, plain)]
                _until(lambda: not replica.live)
            finally:
                engine.close()
        return [(o.token_ids, o.text, o.finish_reason) for o in outs], replica
    single, _ = run(1)
    runs, replica = run(8)
    assert runs == single
    assert single == [([100, 101, 102, 103], "", "eos"), ([100, 101, 102], "d", "stop"),   # chr(100) = "d"
                      ([100 + i for i in range(9)], "", "length")]
    assert max(replica.messages) > 1


def test_a_step_that_fails_mid_run_fails_its_requests_and_the_engine_serves_on():
    replica = RunningReplica(fail_at_run_step=2)
    with _steps(4):
        engine = ReplicaEngine(replica, budget_tokens=10_000, max_batch_tokens=64, on_lost=None)
        try:
            bad = _request(3, 10)
            engine.submit(bad)
            with pytest.raises(RankCallError, match="mid-run"):
                bad.wait(timeout=10)
            assert len(bad.generated) == 3               # the prefill's token and the run's first two
            _until(lambda: bad.id in replica.released)
            replica.fail_at_run_step = None
            good = _request(3, 6)
            engine.submit(good)
            assert good.wait(timeout=10).token_ids == [100 + i for i in range(6)] and engine.alive
        finally:
            engine.close()


def test_auto_runs_as_many_steps_as_fit_its_time_and_a_setting_is_checked():
    replica = RunningReplica()                       # answers at once: "auto" takes the most, 8
    engine = ReplicaEngine(replica, budget_tokens=10_000, max_batch_tokens=64, on_lost=None)
    try:
        request = _request(3, 20)
        engine.submit(request)
        assert request.wait(timeout=10).token_ids == [100 + i for i in range(20)]
    finally:
        engine.close()
    assert replica.messages == [1, 8, 8, 3]
    from daskllm.runtime import settings
    for bad in (0, "fast", 2.5, True):
        with _steps(bad), pytest.raises(ValueError, match="decode-steps must be 'auto' or an integer >= 1"):
            settings.decode_steps()
