"""Lost ranks are rebuilt and their requests replayed: no accepted request fails or changes.

The `chaos` test kills a random rank's worker every ~10 s for about a minute while three
client threads submit continuously; the others kill or freeze one rank at a chosen moment.
"""
from __future__ import annotations

import os
import random
import signal
import threading
import time

import dask
import numpy as np
import pytest
from conftest import golden_dir

from daskllm import LLM
from daskllm.engine.recovery import PROBE_TIMEOUT
from daskllm.engine.router import NoReplicaError

MODEL = golden_dir("llama")
PROMPTS = [[3 + i, 7 + 2 * i, 11 + 3 * i] + list(range(20, 20 + 3 * i)) for i in range(9)]
NEW = 16
FAULTS = {"daskllm.step-timeout": 8, "daskllm.comm-timeout": 3,
          "daskllm.rebuild-timeout": 180}


def _cluster(n):
    from distributed import Client, LocalCluster
    cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0")
    return cluster, Client(cluster, direct_to_workers=True)


def _pid(client, worker):
    return client.run(os.getpid, workers=[worker])[worker]


def _kill(client, worker, sig=signal.SIGKILL):
    pid = _pid(client, worker)
    os.kill(pid, sig)
    return pid


def _wait_started(requests):
    while not any(r.generated for r in requests):
        time.sleep(0.005)


@pytest.fixture(scope="module")
def reference(client):
    with LLM(MODEL, client=client) as single:
        greedy = [o.token_ids for o in single.generate(PROMPTS, max_new_tokens=NEW, ignore_eos=True)]
        sampled = single.generate(PROMPTS[:3], max_new_tokens=NEW, ignore_eos=True, temperature=0.8, seed=5)
        return greedy, [o.token_ids for o in sampled]


@pytest.mark.cluster
def test_a_kill_mid_generation_with_one_replica_delays_requests_and_fails_none(reference):
    greedy, sampled = reference
    cluster, client = _cluster(3)                      # tp=2 and one spare
    try:
        with dask.config.set(FAULTS), LLM(MODEL, tp=2, client=client) as llm:
            requests = llm.submit(PROMPTS, max_new_tokens=NEW, ignore_eos=True)
            seeded = llm.submit(PROMPTS[:3], max_new_tokens=NEW, ignore_eos=True, temperature=0.8, seed=5)
            _wait_started(requests)
            victim = llm.replicas[0].workers[1]
            _kill(client, victim)
            assert [r.wait(timeout=90).token_ids for r in requests] == greedy
            assert [r.wait(timeout=90).token_ids for r in seeded] == sampled      # same seed and counter
            assert sum(r.retries for r in requests + seeded) >= 1
            assert llm.router.recovery.rebuilt == 1 and not llm.router.lost
            assert victim not in llm.replicas[0].workers
            late = llm.submit(PROMPTS[:2], max_new_tokens=NEW, ignore_eos=True)   # the rebuilt replica serves on
            assert [r.wait(timeout=60).token_ids for r in late] == greedy[:2]
    finally:
        client.close()
        cluster.close()


@pytest.mark.cluster
def test_a_frozen_rank_is_replaced_and_corrupts_nothing_when_it_wakes(reference):
    greedy, _ = reference
    cluster, client = _cluster(3)
    try:
        with dask.config.set(FAULTS), LLM(MODEL, tp=2, client=client) as llm:
            requests = llm.submit(PROMPTS[:4], max_new_tokens=NEW, ignore_eos=True)
            _wait_started(requests)
            frozen = llm.replicas[0].workers[1]
            pid = _kill(client, frozen, signal.SIGSTOP)
            try:
                assert [r.wait(timeout=90).token_ids for r in requests] == greedy[:4]
                assert frozen not in llm.replicas[0].workers, "a frozen worker must not host the rebuilt replica"
            finally:
                os.kill(pid, signal.SIGCONT)
            time.sleep(2)                                 # the woken rank finishes its stale step
            again = llm.submit(PROMPTS, max_new_tokens=NEW, ignore_eos=True)
            assert [r.wait(timeout=60).token_ids for r in again] == greedy
            assert llm.router.recovery.rebuilt == 1 and not llm.router.lost
    finally:
        client.close()
        cluster.close()


@pytest.mark.cluster
def test_requests_fail_with_a_clear_error_when_no_rebuild_is_possible_in_time(reference):
    cluster, client = _cluster(2)                      # tp=2 and no spare: the restart is the only hope
    try:
        # runs of 8 decode steps per message: the rank freezes inside a run, and the error must still
        # come within the step timeout and name it
        with dask.config.set({**FAULTS, "daskllm.rebuild-timeout": 2, "daskllm.decode-steps": 8}), \
                LLM(MODEL, tp=2, client=client) as llm:
            requests = llm.submit(PROMPTS[:2], max_new_tokens=200, ignore_eos=True)
            _wait_started(requests)
            frozen = llm.replicas[0].workers[1]
            pid = _kill(client, frozen, signal.SIGSTOP)      # frozen, not restarted: never free again
            start = time.monotonic()
            try:
                with pytest.raises(NoReplicaError, match=r"replica 0: rank [01] \(replica 0\) on worker .*; "
                                                         r"replica 0 could not be rebuilt within "
                                                         r"daskllm.rebuild-timeout = 2 s .*1 healthy free worker"):
                    requests[0].wait(timeout=60)
                # the loss, then the rebuild's deadline (checked between probes of at most PROBE_TIMEOUT)
                assert time.monotonic() - start < FAULTS["daskllm.step-timeout"] + 2 + PROBE_TIMEOUT + 8
                with pytest.raises(NoReplicaError):
                    requests[1].wait(timeout=5)
            finally:
                os.kill(pid, signal.SIGCONT)
    finally:
        client.close()
        cluster.close()


@pytest.mark.chaos
@pytest.mark.cluster
@pytest.mark.timeout(900)      # about a minute of faults, plus start-up and rebuilds on a loaded machine
def test_chaos_random_kills_lose_and_change_no_request(reference, capsys):
    greedy, _ = reference
    rng = random.Random(int(os.environ.get("DASKLLM_CHAOS_SEED", "16")))
    duration, every = 50.0, 10.0
    cluster, client = _cluster(6)                      # dp=2 x tp=2, and two spares
    results, refused, errors = [], [], []
    try:
        with dask.config.set(FAULTS), LLM(MODEL, dp=2, tp=2, client=client) as llm:
            assert [o.token_ids for o in llm.generate(PROMPTS, max_new_tokens=NEW, ignore_eos=True)] == greedy
            stop = threading.Event()

            def client_thread(k):
                i = k
                while not stop.is_set():
                    start = time.monotonic()
                    try:
                        request = llm.submit(PROMPTS[i % len(PROMPTS)], max_new_tokens=NEW, ignore_eos=True)[0]
                    except Exception as e:   # noqa: BLE001 - counted: a refusal is a failure here
                        refused.append(repr(e))
                        time.sleep(0.5)
                        continue
                    try:
                        out = request.wait(timeout=120)
                        pieces = "".join(request.pieces())
                        results.append((i % len(PROMPTS), out, pieces, time.monotonic() - start, request))
                    except Exception as e:   # noqa: BLE001 - an accepted request that failed
                        errors.append(f"request {request.id}: {e!r}")
                    i += 3
            threads = [threading.Thread(target=client_thread, args=(k,), daemon=True) for k in range(3)]
            for t in threads:
                t.start()
            kills, began = [], time.monotonic()
            while time.monotonic() - began < duration:
                time.sleep(rng.uniform(0.7 * every, 1.3 * every))
                workers = [w for e in llm.router.alive() for w in e.replica.workers]
                if workers:
                    victim = rng.choice(workers)
                    _kill(client, victim)
                    kills.append(victim)
            stop.set()
            for t in threads:
                t.join(timeout=150)
            assert not any(t.is_alive() for t in threads), "a client thread hung"
            assert not errors and not refused, (errors[:3], refused[:3])
            for i, out, pieces, _, request in results:
                assert out.token_ids == greedy[i], f"request {request.id} (prompt {i}, retries {request.retries})"
                assert pieces == out.text and out.finish_reason == "length"
            assert len({id(r) for *_, r in results}) == len(results)
            worst = max(lat for _, _, _, lat, _ in results)
            moved = sum(r.retries > 0 for *_, r in results)
            with capsys.disabled():
                print(f"\nchaos: {len(results)} requests served, {moved} replayed after a loss, "
                      f"{len(kills)} workers killed, {llm.router.recovery.rebuilt} replicas rebuilt, "
                      f"worst latency {worst:.1f} s")
            assert len(kills) >= 3 and moved >= 1 and len(results) >= 6
            deadline = time.monotonic() + 60
            while len(llm.router.alive()) < 2:               # the last kill's rebuild completes
                assert time.monotonic() < deadline, f"not rebuilt: {llm.router.lost}"
                time.sleep(0.2)
            assert [o.token_ids for o in llm.generate(PROMPTS, max_new_tokens=NEW, ignore_eos=True)] == greedy
    finally:
        client.close()
        cluster.close()


def test_a_rank_of_a_stale_incarnation_is_turned_away():
    """A frozen rank that wakes up and dials its old peer's address cannot join the new incarnation."""
    from daskllm.comm.base import CommTimeout
    from daskllm.comm.tcp import TcpTransport
    new0, stale1 = TcpTransport(0, 2, group="0.new", timeout=5), TcpTransport(1, 2, group="0.old", timeout=5)
    new1 = TcpTransport(1, 2, group="0.new", timeout=5)
    try:
        address = new0.listen()
        stale1.listen(), new1.listen()
        stale = threading.Thread(target=lambda: stale1.connect({0: address}, timeout=5))
        stale.start()
        stale.join()
        with pytest.raises(CommTimeout, match=r"rank 0: ranks \[1\] did not connect within 1"):
            new0.connect({}, timeout=1)              # the stale hello was refused; rank 1 is still missing
        joined = threading.Thread(target=lambda: new1.connect({0: address}, timeout=5))
        joined.start()
        new0.connect({}, timeout=5)
        joined.join()
        new1.send(0, "x", [np.arange(3)])
        assert new0.recv(1, "x", timeout=5)[0].tolist() == [0, 1, 2]
    finally:
        for t in (new0, stale1, new1):
            t.close()
