"""Data parallelism: replicas share the load, batch continuously, and lose no request."""
from __future__ import annotations

import os
import signal
import threading
import time

import dask
import pytest
from conftest import golden_dir

from daskllm import LLM
from daskllm.engine.router import NoReplicaError

pytestmark = pytest.mark.cluster

PROMPTS = [[1 + i, 2 + 3 * i, 3 + 5 * i][: 1 + i % 3] + list(range(10, 10 + 4 * i)) for i in range(12)]


@pytest.fixture(scope="module")
def reference(client):
    with LLM(golden_dir("qwen2"), client=client) as single:
        return [o.token_ids for o in single.generate(PROMPTS, max_new_tokens=12, ignore_eos=True)]


@pytest.mark.parametrize("dp", [2, 3])
def test_replicas_give_the_single_rank_tokens_and_share_the_load(client, reference, dp):
    with LLM(golden_dir("qwen2"), dp=dp, client=client) as llm:
        outs = [None] * len(PROMPTS)

        def call(i):
            outs[i] = llm.generate([PROMPTS[i]], max_new_tokens=12, ignore_eos=True)[0].token_ids
        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert outs == reference
        served = [e.served for e in llm.router.engines]
        assert len(served) == dp and sum(served) == len(PROMPTS)
        assert min(served) >= 1, f"a replica served nothing: {served}"


def test_router_prefers_the_replica_with_less_outstanding_work(client):
    with LLM(golden_dir("llama"), dp=2, client=client) as llm:
        long_req = llm.submit([[5] * 100], max_new_tokens=150, ignore_eos=True)[0]
        shorts = llm.submit([[7, 8]] * 3, max_new_tokens=4, ignore_eos=True)
        for r in shorts:
            r.wait(timeout=60)
        long_req.wait(timeout=120)
        assert all(r.replica != long_req.replica for r in shorts), "short requests queued behind the long one"


def test_a_short_request_joins_the_batch_and_finishes_first(client):
    with LLM(golden_dir("llama"), client=client) as llm:
        finished = []
        long_req = llm.submit([[5, 6, 7]], max_new_tokens=200, ignore_eos=True)[0]
        threading.Thread(target=lambda: (long_req.wait(120), finished.append("long"))).start()
        while not long_req.generated:
            time.sleep(0.01)
        llm.generate([[9, 10]], max_new_tokens=3, ignore_eos=True)
        finished.append("short")
        long_req.wait(timeout=120)
        time.sleep(0.05)
        assert finished[0] == "short" and len(long_req.generated) == 200


def test_a_killed_worker_loses_no_request(reference):
    from distributed import Client, LocalCluster
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster, direct_to_workers=True) as client, dask.config.set({"daskllm.step-timeout": 30}):
        with LLM(golden_dir("qwen2"), dp=2, client=client) as llm:
            requests = llm.submit(PROMPTS[:8], max_new_tokens=12, ignore_eos=True)
            victim = llm.replicas[1]
            while not any(r.generated for r in requests if r.replica == victim.index):
                time.sleep(0.005)
            pid = client.run(os.getpid, workers=victim.workers)[victim.workers[0]]
            os.kill(pid, signal.SIGKILL)
            outs = [r.wait(timeout=120) for r in requests]
            assert [o.token_ids for o in outs] == reference[:8]          # none duplicated or truncated
            assert sum(r.retries for r in requests) >= 1
            deadline = time.monotonic() + 240      # rebuilt without asking, on the nanny's restarted worker
            while len(llm.router.alive()) < 2:
                assert time.monotonic() < deadline, f"replica 1 was not rebuilt: {llm.router.lost}"
                time.sleep(0.1)
            assert llm.router.recovery.rebuilt == 1 and victim.workers[0] not in llm.replicas[-1].workers
            assert llm.restore() == []
            assert [o.token_ids for o in llm.generate(PROMPTS[:4], max_new_tokens=12, ignore_eos=True)] == reference[:4]


def test_no_replica_left_gives_a_clear_error_in_bounded_time():
    from distributed import Client, LocalCluster
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster, direct_to_workers=True) as client, \
            dask.config.set({"daskllm.step-timeout": 10, "daskllm.rebuild-timeout": 0}):   # no rebuild
        with LLM(golden_dir("llama"), client=client) as llm:
            request = llm.submit([[1, 2, 3]], max_new_tokens=200, ignore_eos=True)[0]
            while not request.generated:
                time.sleep(0.005)
            worker = llm.replicas[0].workers[0]
            os.kill(client.run(os.getpid, workers=[worker])[worker], signal.SIGKILL)
            start = time.monotonic()
            with pytest.raises(NoReplicaError, match=r"no live replica .*replica 0: rank 0 \(replica 0\) on worker"):
                request.wait(timeout=30)
            assert time.monotonic() - start < 15
            with pytest.raises(NoReplicaError):
                llm.generate([[1, 2]], max_new_tokens=2)
