"""The public API under real use: many threads, closing and reusing objects, odd but legal inputs.

Each test reproduces one defect found by driving the API like an expert user would (issue 18).
"""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
import time

import dask
import numpy as np
import pytest
from conftest import golden_dir, load_golden

from daskllm import LLM
from daskllm.engine.router import LLMClosedError
from daskllm.engine.validate import RequestError
from daskllm.runtime.replica import RankCallError

pytestmark = pytest.mark.cluster

M = golden_dir("llama")


@pytest.fixture(scope="module", autouse=True)
def _patient_start():
    """Rank actors start slowly on a busy shared machine; the connect test sets its own limit."""
    with dask.config.set({"daskllm.connect-timeout": 120}):
        yield


@pytest.fixture(scope="module")
def tp2(client):
    """Two ranks on two of the session's four workers, shared by the tests of this module."""
    with LLM(M, tp=2, client=client) as llm:
        yield llm


def _until(predicate, timeout=20, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout} s"
        time.sleep(0.01)


def _within(fn, timeout=20):
    """fn() in a thread; fails the test instead of hanging it."""
    out = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    thread.join(timeout)
    assert out, f"did not return within {timeout} s"
    return out[0]


def _healthy(llm):
    assert not llm.router.lost, f"a replica was lost: {llm.router.lost}"
    assert len(llm.router.alive()) == llm.mesh.dp and all(r.alive for r in llm.replicas)


def _idle(llm) -> bool:
    """Nothing queued or running, and no KV cache left on any rank."""
    engines_idle = all(not e._running and not e._waiting for e in llm.router.engines)
    return engines_idle and all(s["memory"]["live_sequences"] == 0 for s in llm.stats())


def _steps(llm):
    return sum(e.steps for e in llm.router.engines)


# -- 1. calls reach every rank in one order ------------------------------------------------

def test_logits_from_several_threads_beside_generate_at_tp2_stay_correct(tp2):
    long_ref, short_ref = tp2.logits([[5, 6, 7] * 10])[0], tp2.logits([[8, 9]])[0]
    tokens_ref = tp2.generate("Hello", max_new_tokens=20, ignore_eos=True)[0].token_ids
    errors = []

    def guarded(fn):
        def run():
            try:
                fn()
            except BaseException as e:   # noqa: BLE001 - reported below
                errors.append(e)
        return threading.Thread(target=run)

    def long_logits():
        for _ in range(100):
            np.testing.assert_allclose(tp2.logits([[5, 6, 7] * 10])[0], long_ref, rtol=1e-5, atol=1e-5)

    def generating():
        for _ in range(6):
            assert tp2.generate("Hello", max_new_tokens=20, ignore_eos=True)[0].token_ids == tokens_ref

    threads = [guarded(long_logits), guarded(long_logits), guarded(generating)]
    for t in threads:
        t.start()
    for _ in range(100):
        got = tp2.logits([[8, 9]])[0]
        assert got.shape == short_ref.shape == (2, 384)
        np.testing.assert_allclose(got, short_ref, rtol=1e-5, atol=1e-5)
    for t in threads:
        t.join(timeout=300)
    assert not errors, repr(errors[0])
    _healthy(tp2)


# -- 2, 3. a caller's mistake fails that call, never the replica -----------------------------

def test_a_bad_stop_entry_is_refused_and_nobody_else_notices(tp2):
    other = tp2.submit("Hello", max_new_tokens=30, ignore_eos=True)[0]
    before = _steps(tp2)
    with pytest.raises(RequestError, match="stop strings must be str, got NoneType None"):
        tp2.generate("Hello", stop=["es", None])
    with pytest.raises(RequestError, match="stop strings must not be empty"):
        tp2.generate("Hello", stop="")
    with pytest.raises(RequestError, match="stop must be a str or a list of str, got int"):
        tp2.generate("Hello", stop=5)
    assert other.wait(timeout=60).finish_reason == "length" and _steps(tp2) >= before
    _healthy(tp2)


def test_logits_of_nothing_is_refused_and_an_error_on_the_ranks_is_not_a_lost_replica(tp2):
    golden = load_golden("llama")
    with pytest.raises(RequestError, match=r"logits\(\) takes a non-empty list of token-id sequences"):
        tp2.logits([])
    with pytest.raises(RequestError, match=r"logits\(\) takes a list of sequences: wrap a single one"):
        tp2.logits([1, 2, 3])
    # Past the client's checks, the ranks themselves raise: that call fails, the replica serves on.
    with pytest.raises(RankCallError, match=r"rank \d \(replica 0\) on worker tcp://.* failed in logits: ValueError"):
        tp2.replicas[0].logits([[]])
    _healthy(tp2)
    prompt = golden["tokens_0"].tolist()
    scale = np.abs(golden["logits_0"]).max()
    np.testing.assert_allclose(tp2.logits([prompt])[0] / scale, golden["logits_0"] / scale, atol=1e-4)
    out = tp2.generate([prompt], max_new_tokens=10, ignore_eos=True)[0]
    assert out.token_ids == golden["greedy_0"].tolist()


# -- 4. seeds --------------------------------------------------------------------------------

def test_without_a_seed_each_prompt_samples_on_its_own(tp2):
    outs = tp2.generate(["Hi", "Hi", "Hi"], temperature=1.0, max_new_tokens=10, ignore_eos=True)
    assert len({tuple(o.token_ids) for o in outs}) > 1, "three samples of one prompt were identical"
    same = tp2.generate(["Hi", "Hi"], temperature=1.0, max_new_tokens=10, ignore_eos=True, seed=3)
    assert same[0].token_ids == same[1].token_ids          # a seed given is the seed of every prompt


# -- 5. close --------------------------------------------------------------------------------

def test_close_ends_every_request_and_every_later_call(client):
    per_token = 2 * (2 * 2 * 16 * 4 + 8)
    with dask.config.set({"daskllm.kv-cache-bytes": 300 * per_token}):
        llm = LLM(M, client=client)
    running = llm.submit("Hi", max_new_tokens=200, ignore_eos=True)[0]
    queued = llm.submit("Hi", max_new_tokens=200, ignore_eos=True)[0]      # waits: the budget holds one
    _until(lambda: running.generated)
    llm.close()
    for r in (running, queued):
        with pytest.raises(LLMClosedError, match="this LLM is closed"):
            r.wait(timeout=10)
    calls = [lambda: llm.generate("Hi"), lambda: llm.submit("Hi"), lambda: llm.stream("Hi"),
             lambda: llm.logits([[1, 2]]), llm.stats, llm.reset_stats, llm.restore, llm.plan,
             lambda: asyncio.run(llm.agenerate(["Hi"]))]
    for call in calls:
        with pytest.raises(LLMClosedError, match="this LLM is closed"):
            _within_raise(call)
    llm.close()                                           # closing twice is harmless


def _raises(call):
    try:
        call()
    except BaseException as e:   # noqa: BLE001 - handed back to pytest.raises
        return e
    return None


def _within_raise(call, timeout=20):
    """call() in a thread, its exception raised here: a hang fails the test instead."""
    error = _within(lambda: _raises(call), timeout)
    if error is not None:
        raise error


# -- 6. abandoned streams and abort ------------------------------------------------------------

def test_closing_a_stream_cancels_its_request_and_frees_its_cache(tp2):
    before = _steps(tp2)
    pieces = tp2.stream("Hello", max_new_tokens=250, ignore_eos=True)
    next(pieces)
    pieces.close()
    _until(lambda: _idle(tp2), what="idle replica with no KV cache")
    assert _steps(tp2) - before < 100, "the engine ran the abandoned stream on"


def test_cancelling_an_astream_task_cancels_its_request(tp2):
    before = _steps(tp2)

    async def main():
        got = []

        async def read():
            async for piece in tp2.astream("Hello", max_new_tokens=250, ignore_eos=True):
                got.append(piece)
        task = asyncio.create_task(read())
        while not got:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    _within(lambda: asyncio.run(main()), timeout=60)
    _until(lambda: _idle(tp2), what="idle replica with no KV cache")
    assert _steps(tp2) - before < 100, "the engine ran the cancelled astream on"


def test_abort_and_cancel_end_submitted_requests(tp2):
    first, second = tp2.submit(["Hello", "Hi"], max_new_tokens=250, ignore_eos=True)
    _until(lambda: first.generated and second.generated)
    assert tp2.abort(first) == 1 and second.cancel() and tp2.abort([first, second]) == 0
    for r in (first, second):
        out = r.wait(timeout=5)
        assert out.finish_reason == "cancelled" and 1 <= len(out.token_ids) < 250
    _until(lambda: _idle(tp2), what="idle replica with no KV cache")


# -- 7. pieces() twice ---------------------------------------------------------------------------

def test_pieces_read_twice_give_the_same_pieces(tp2):
    request = tp2.submit("Hello", max_new_tokens=8, ignore_eos=True)[0]
    first = _within(lambda: list(request.pieces()))
    second = _within(lambda: list(request.pieces()))
    assert first == second and "".join(first) == request.wait(timeout=5).text


# -- 8, 9. clients the LLM makes ------------------------------------------------------------------

def _n_clients(client) -> int:
    return client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.clients))


def test_a_client_made_for_an_address_is_closed_and_never_the_default(client):
    from distributed import default_client
    before = _n_clients(client)
    llm = LLM(M, address=client.scheduler.address)
    made = llm.client
    assert default_client() is client and made is not client
    assert llm.generate([[1, 2]], max_new_tokens=2, ignore_eos=True)[0].token_ids
    llm.close()
    assert made.status == "closed"
    _until(lambda: _n_clients(client) == before, what="the LLM's client gone from the scheduler")
    with pytest.raises(ValueError, match=r"needs 8 workers"):
        LLM(M, address=client.scheduler.address, dp=8)
    _until(lambda: _n_clients(client) == before, what="the failed LLM's client gone from the scheduler")
    assert default_client() is client


def test_an_llm_with_its_own_cluster_leaves_the_users_default_client_alone(client):
    from distributed import default_client
    with LLM(M) as llm:
        assert default_client() is client and llm.client is not client
        ours = set(client.run(os.getpid).values())
        assert dask.delayed(os.getpid)().compute() in ours
        assert llm.generate([[1, 2]], max_new_tokens=2, ignore_eos=True)[0].token_ids
        made = llm.client
    assert made.status == "closed"


# -- 10. actors released on close ---------------------------------------------------------------

def test_close_releases_the_actors_without_a_garbage_collection(client):
    gc.disable()
    try:
        llm = LLM(M, tp=2, client=client)
        keys = [f.key for r in llm.replicas for f in r._futures]
        llm.generate("Hello", max_new_tokens=4)
        llm.logits([[1, 2, 3]])
        llm.close()

        def left():
            return client.run_on_scheduler(lambda dask_scheduler: [k for k in keys if k in dask_scheduler.tasks])
        _until(lambda: not left(), timeout=10, what="rank actors released on the scheduler")
        assert not gc.isenabled(), "something turned the garbage collector back on: this test proves nothing"
    finally:
        gc.enable()


# -- 11. KV cache: freed at once, and a hard budget -------------------------------------------------

def test_a_finished_sequence_frees_its_cache_without_another_step(tp2):
    tp2.generate("Hello", max_new_tokens=3, ignore_eos=True)
    _until(lambda: all(s["memory"]["live_sequences"] == 0 for s in tp2.stats()), timeout=10,
           what="no live sequence on the ranks")


def test_the_kv_budget_is_never_exceeded(client):
    per_token = 2 * (1 * 16 * 4 * 2 + 8)           # tp=2: each rank holds 1 of the 2 KV heads
    budget = 70 * per_token
    with dask.config.set({"daskllm.kv-cache-bytes": budget}):
        with LLM(M, tp=2, client=client) as llm:
            assert llm.budget_tokens == 70
            prompts = [[1 + i] * (3 + 7 * i) for i in range(6)]
            outs = llm.generate(prompts, max_new_tokens=12, ignore_eos=True)
            assert all(len(o.token_ids) == 12 for o in outs)
            llm.logits([[3] * 40, [4] * 30, [5] * 20])    # beside the budget's other holders, within it
            peaks = [s["memory"]["cache_peak_bytes"] for s in llm.stats()]
            assert 0 < max(peaks) <= budget, f"peak {max(peaks)} bytes over the budget of {budget}"


# -- 12. several LLMs on one client -------------------------------------------------------------

def test_new_ranks_go_to_the_least_loaded_workers_and_shared_ones_split_the_budget(client, tp2, caplog):
    taken = set(tp2.replicas[0].workers)
    with LLM(M, tp=2, client=client) as other:
        assert not taken & set(other.replicas[0].workers), "both LLMs placed on the same workers"
        assert not other.shared_workers
        with caplog.at_level(logging.WARNING, logger="daskllm"):
            shared = LLM(M, client=client)                       # every worker has a rank: it must share
        try:
            assert shared.shared_workers == {shared.replicas[0].workers[0]: 1}
            assert "already host ranks of another LLM" in caplog.text and "KV budget" in caplog.text
            shared_budget = shared.budget_tokens
        finally:
            shared.close()
    with LLM(M, client=client) as alone:
        assert not alone.shared_workers
        assert shared_budget < 0.6 * alone.budget_tokens, (shared_budget, alone.budget_tokens)


# -- 13. connecting ----------------------------------------------------------------------------------

@pytest.mark.parametrize("address", ["tcp://127.0.0.1:9", "tcp://no-such-host.invalid:8786"])
def test_an_unreachable_scheduler_fails_within_the_connect_timeout(address):
    start = time.monotonic()
    with dask.config.set({"daskllm.connect-timeout": 2}):
        with pytest.raises(ConnectionError, match=rf"could not reach a Dask scheduler at '{address}' within 2 s "
                                                  r"\(daskllm.connect-timeout\)"):
            LLM(M, address=address)
    assert time.monotonic() - start < 15


# -- 14. inputs --------------------------------------------------------------------------------------

def test_numpy_inputs_are_taken_as_meant(tp2):
    ids = [5, 6, 7, 8]
    want = tp2.generate([ids], max_new_tokens=5, ignore_eos=True)[0].token_ids
    assert tp2.generate(np.array(ids), max_new_tokens=5, ignore_eos=True)[0].token_ids == want
    assert tp2.generate([np.int64(t) for t in ids], max_new_tokens=5, ignore_eos=True)[0].token_ids == want
    assert [o.token_ids for o in tp2.generate(np.array([ids, ids]), max_new_tokens=5, ignore_eos=True)] == [want] * 2
    assert tp2.generate([ids], max_new_tokens=np.int64(5), ignore_eos=True,
                        temperature=np.float32(0.0))[0].token_ids == want
    assert len(list(tp2.stream(np.array(ids), max_new_tokens=3, ignore_eos=True))) >= 1
    np.testing.assert_array_equal(tp2.logits(np.array([ids]))[0], tp2.logits([ids])[0])


@pytest.mark.parametrize("call, message", [
    (lambda m: m.generate(b"Hello"), r"a prompt is a str or a list of int token ids; got bytes: decode text first"),
    (lambda m: m.generate([True, False]), r"found bool True in a token-id list"),
    (lambda m: m.generate([[1.0, 2.0]]), r"found float 1.0 in a token-id list"),
    (lambda m: m.generate(np.array([1.0, 2.0])), r"a token-id array must be 1-D with an integer dtype; got float64"),
    (lambda m: m.generate(5), r"prompts must be a str, a list of int token ids, or a list of those; got int"),
    (lambda m: m.generate("Hi", max_new_tokens=True), r"max_new_tokens must be an integer >= 1, got True"),
    (lambda m: m.generate("Hi", max_new_tokens=2.0), r"max_new_tokens must be an integer >= 1, got 2.0"),
    (lambda m: m.generate("Hi", temperature="0.5"), r"temperature must be a number, got '0.5'"),
    (lambda m: m.generate("Hi", top_k=True), r"top_k must be an integer >= 0, got True"),
    (lambda m: m.generate("Hi", seed=1.5), r"seed must be an integer or None"),
    (lambda m: m.stream(["a", "b"]), r"stream\(\) takes one prompt \(a str or a list of token ids\), got 2 prompts"),
    (lambda m: m.logits(["Hello"]), r"logits\(\) takes token ids, not text"),
])
def test_look_alike_inputs_are_refused_with_the_fitting_message(tp2, call, message):
    before = _steps(tp2)
    with pytest.raises(RequestError, match=message):
        call(tp2)
    assert _steps(tp2) == before


def test_final_text_is_the_decoded_tokens_and_equals_the_stream(tp2):
    # One request per length, batched together; a trailing incomplete character shows as U+FFFD.
    requests = [tp2.submit("Hello", max_new_tokens=n, ignore_eos=True)[0] for n in range(1, 25)]
    differ = []
    for r in requests:
        out = r.wait(timeout=120)
        streamed = "".join(r.pieces())
        if out.text != tp2.tokenizer.decode(out.token_ids) or streamed != out.text:
            differ.append((len(out.token_ids), out.text, streamed, tp2.tokenizer.decode(out.token_ids)))
    assert not differ, differ[:3]
    streamed = "".join(tp2.stream("Hello", max_new_tokens=7, ignore_eos=True))
    assert streamed == requests[6].wait().text


# -- many threads, two meshes ----------------------------------------------------------------------

def test_four_threads_mixing_every_call_on_tp2_and_dp2(client, tp2):
    golden = load_golden("llama")
    prompts = [golden[f"tokens_{i}"].tolist() for i in range(4)] + [[5, 6, 7] * 6, [9]]
    with LLM(M, dp=2, client=client) as dp2:
        meshes = {"tp2": tp2, "dp2": dp2}
        # single-thread results first
        gen = {name: [o.token_ids for o in m.generate(prompts, max_new_tokens=4, ignore_eos=True)]
               for name, m in meshes.items()}
        text = {name: [m.generate("Hello there", max_new_tokens=4, ignore_eos=True)[0].text] for name, m in meshes.items()}
        logit = {name: [m.logits([p])[0] for p in prompts] for name, m in meshes.items()}
        errors, calls = [], [0]

        def worker(t):
            try:
                for k in range(75):
                    name = ("tp2", "dp2")[(t + k) % 2]
                    m, i = meshes[name], (3 * t + k) % len(prompts)
                    op = (t + k // 2) % 4
                    if op == 0:
                        assert m.generate([prompts[i]], max_new_tokens=4, ignore_eos=True)[0].token_ids == gen[name][i]
                    elif op == 1:
                        assert "".join(m.stream("Hello there", max_new_tokens=4, ignore_eos=True)) == text[name][0]
                    elif op == 2:
                        np.testing.assert_allclose(m.logits([prompts[i]])[0], logit[name][i], rtol=1e-4, atol=1e-4)
                    else:
                        stats = m.stats()
                        assert len(stats) == 2 and all("memory" in s for s in stats)
                    calls[0] += 1
            except BaseException as e:   # noqa: BLE001 - reported below
                errors.append(e)
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=300)
        assert not errors, repr(errors[0])
        assert calls[0] == 300
        _healthy(tp2)
        _healthy(dp2)
