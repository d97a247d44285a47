"""The runtime under faults and TLS: a lost or frozen worker ends the step in bounded time, naming the rank."""
from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time

import dask
import pytest
from conftest import golden_dir

from daskllm import LLM
from daskllm.engine.router import NoReplicaError

pytestmark = pytest.mark.cluster

# No rebuild: these tests watch the loss itself (tests/test_chaos.py watches the rebuild).
FAST_TIMEOUTS = {"daskllm.step-timeout": 8, "daskllm.comm-timeout": 3, "daskllm.rebuild-timeout": 0}


@pytest.fixture
def cluster2():
    """A private 2-worker cluster: these tests kill and freeze its workers."""
    from distributed import Client, LocalCluster
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster, direct_to_workers=True) as client:
        yield client


def _pid(client, worker):
    return client.run(os.getpid, workers=[worker])[worker]


def _wait_for_replacement(client, dead_worker, n=2, timeout=60):
    """Until the nanny's restarted worker has replaced `dead_worker` (its old address gone)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = client.scheduler_info()["workers"]
        if dead_worker not in workers and len(workers) >= n:
            return
        time.sleep(0.1)
    raise TimeoutError(f"no replacement for {dead_worker} within {timeout} s")


def _start_long_request(llm):
    request = llm.submit([[1, 2, 3]], max_new_tokens=200, ignore_eos=True)[0]
    while not request.generated:
        time.sleep(0.005)
    return request


CONTROL_PATHS = pytest.mark.parametrize("control", ["direct", "actor"])


@CONTROL_PATHS
def test_a_worker_killed_during_a_collective_names_the_rank(cluster2, control):
    with dask.config.set({**FAST_TIMEOUTS, "daskllm.control": control}):
        with LLM(golden_dir("llama"), tp=2, client=cluster2) as llm:
            request = _start_long_request(llm)
            victim = llm.replicas[0].workers[1]
            start = time.monotonic()
            os.kill(_pid(cluster2, victim), signal.SIGKILL)
            with pytest.raises(NoReplicaError, match=r"rank [01] \(replica 0\) on worker tcp://"):
                request.wait(timeout=30)
            assert time.monotonic() - start < FAST_TIMEOUTS["daskllm.step-timeout"] + 4
        _wait_for_replacement(cluster2, victim)
        with LLM(golden_dir("llama"), tp=2, client=cluster2) as again:     # the same client still serves
            assert len(again.generate([[1, 2, 3]], max_new_tokens=4, ignore_eos=True)[0].token_ids) == 4


@CONTROL_PATHS
def test_a_frozen_worker_gives_a_timeout_not_a_hang(cluster2, control):
    with dask.config.set({**FAST_TIMEOUTS, "daskllm.control": control}):
        llm = LLM(golden_dir("llama"), tp=2, client=cluster2)
        request = _start_long_request(llm)
        frozen = llm.replicas[0].workers[1]
        pid = _pid(cluster2, frozen)
        start = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(NoReplicaError) as info:
                request.wait(timeout=30)
            elapsed = time.monotonic() - start
        finally:
            os.kill(pid, signal.SIGCONT)
        message = str(info.value)
        assert "rank 0 (replica 0)" in message or "rank 1 (replica 0)" in message
        assert "waited" in message or "did not answer" in message, message
        assert elapsed < FAST_TIMEOUTS["daskllm.step-timeout"] + 4
        llm.close()
        with LLM(golden_dir("llama"), tp=2, client=cluster2) as again:
            assert len(again.generate([[4, 5]], max_new_tokens=3, ignore_eos=True)[0].token_ids) == 3


def test_tls_cluster_end_to_end():
    pytest.importorskip("cryptography", reason="distributed's Security.temporary() needs the cryptography package")
    from distributed import Client, LocalCluster
    from distributed.security import Security
    security = Security.temporary()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, security=security,
                      dashboard_address=":0") as cluster, Client(cluster, security=security) as client:
        assert cluster.scheduler_address.startswith("tls://")
        with LLM(golden_dir("qwen2"), client=client) as single:
            expected = single.generate([[3, 4, 5, 6]], max_new_tokens=6, ignore_eos=True)[0].token_ids
        with LLM(golden_dir("qwen2"), tp=2, client=client) as llm:
            assert llm.generate([[3, 4, 5, 6]], max_new_tokens=6, ignore_eos=True)[0].token_ids == expected
            assert llm.comm_stats()[0]["tp"]["all_reduce"]["calls"] > 0     # the ranks really talked (over TLS)
            assert all(isinstance(link._sock, ssl.SSLSocket) for link in llm.replicas[0]._links)  # steps too


def test_a_frozen_single_rank_times_out_naming_it(cluster2):
    """No peer notices a frozen tp=1 rank: only the control connection's timeout ends the step."""
    with dask.config.set({**FAST_TIMEOUTS, "daskllm.step-timeout": 3}):
        llm = LLM(golden_dir("llama"), client=cluster2)
        request = _start_long_request(llm)
        worker = llm.replicas[0].workers[0]
        pid = _pid(cluster2, worker)
        start = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(NoReplicaError, match=r"rank 0 \(replica 0\) on worker .* did not answer within 3 s in step"):
                request.wait(timeout=30)
            assert time.monotonic() - start < 3 + 4
        finally:
            os.kill(pid, signal.SIGCONT)
        llm.close()


def test_a_failure_inside_a_rank_names_the_rank_and_the_error(cluster2):
    from daskllm.model.runner import Work
    from daskllm.runtime.replica import RankCallError
    with LLM(golden_dir("llama"), client=cluster2) as llm:
        vocab = llm.config.vocab_size
        with pytest.raises(RankCallError, match=r"rank 0 \(replica 0\) on worker .* failed in step: IndexError"):
            llm.replicas[0].step([Work(12345, (vocab * 4,), 0)])   # a token id beyond the embedding
        # an error the rank raised is that call's failure, not a lost rank (issue 18)
        assert llm.replicas[0].alive
        assert len(llm.generate([[1, 2]], max_new_tokens=2, ignore_eos=True)[0].token_ids) == 2


def test_an_unknown_control_setting_is_refused(cluster2):
    with dask.config.set({"daskllm.control": "carrier-pigeon"}):
        with pytest.raises(ValueError, match="daskllm.control must be 'direct' or 'actor', got 'carrier-pigeon'"):
            LLM(golden_dir("llama"), client=cluster2)


def test_a_control_connection_the_driver_cannot_open_is_named(cluster2, monkeypatch):
    from daskllm.runtime import replica
    from daskllm.runtime.replica import ReplicaError

    def unreachable(address, timeout, ssl_context=None):
        raise ConnectionRefusedError(111, "Connection refused")
    monkeypatch.setattr(replica, "ControlLink", unreachable)
    with pytest.raises(ReplicaError, match=r"rank 0 \(replica 0\) on worker .*: the driver could not open its control "
                                           r"connection .* set dask.config daskllm.control='actor'"):
        LLM(golden_dir("llama"), client=cluster2)
    with dask.config.set({"daskllm.control": "actor"}), LLM(golden_dir("llama"), client=cluster2) as llm:
        assert len(llm.generate([[1, 2]], max_new_tokens=2, ignore_eos=True)[0].token_ids) == 2


def _in_force():
    from daskllm.runtime.tuning import in_force
    return in_force()


def _timer_periods(client):
    """(worker, nanny, scheduler) periods of the fast Dask timers runtime.quiet slows, in ms."""
    from daskllm.runtime.quiet import timer_periods
    (worker,) = client.run(timer_periods).values()
    (nanny,) = client.run(timer_periods, nanny=True).values()
    return worker, nanny, client.run_on_scheduler(timer_periods)


def test_speed_settings_are_in_force_in_a_worker_the_user_started():
    """A cluster started by the user (not by LLM): its nanny sets MALLOC_TRIM_THRESHOLD_ and one
    BLAS thread; once a rank starts there, large temporaries come from the heap, BLAS has the
    worker's threads and its idle threads spin 2**24 cycles instead of OpenBLAS's 2**28. While it lives, Dask's fast timers are slowed in the worker, its nanny and
    the scheduler (on the same host here); after, they are back."""
    from distributed import Client, LocalCluster
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster, direct_to_workers=True) as client:
        (before,) = client.run(_in_force).values()
        assert before == {"blas_threads": 1, "blas_spin": 0, "temporary_mmapped": True}  # the nanny's; OpenBLAS's
        timers = _timer_periods(client)
        assert timers == ({"tick": 20, "memory_monitor": 100, "profile": 10, "profile-cycle": 1000},
                          {"tick": 20, "memory_monitor": 100}, {"tick": 20})   # Dask's defaults
        with LLM(golden_dir("llama"), client=client) as llm:
            (after,) = client.run(_in_force).values()
            assert after == {"blas_threads": 2, "blas_spin": 24, "temporary_mmapped": False}
            assert llm.replicas[0].load_info[0]["tuning"]["malloc"] == "set"
            assert llm.stats()[0]["tuning"]["blas_threads"] == 2
            assert _timer_periods(client) == ({"tick": 1000, "memory_monitor": 1000, "profile": 0, "profile-cycle": 0},
                                              {"tick": 1000, "memory_monitor": 1000}, {"tick": 1000})
        assert _timer_periods(client) == timers
        with dask.config.set({"daskllm.quiet-dask": False}), LLM(golden_dir("llama"), client=client):
            assert _timer_periods(client) == timers


def _record_opens_under(prefix):
    """On a worker: remember every file opened under `prefix` (a Python audit hook)."""
    import sys
    opened = []

    def hook(event, args):
        if event == "open" and str(args[0]).startswith(prefix):
            opened.append(str(args[0]))
    sys.addaudithook(hook)
    sys.modules["__main__"].__dict__["_daskllm_opened"] = opened


def _opened():
    import sys
    return list(sys.modules["__main__"].__dict__.get("_daskllm_opened", []))


def _forget_opens():
    import sys
    sys.modules["__main__"].__dict__.get("_daskllm_opened", []).clear()


def test_shipped_weights_reach_workers_that_never_open_the_files(cluster2, tmp_path):
    import shutil
    local = tmp_path / "checkpoint"
    shutil.copytree(golden_dir("qwen3"), local)
    cluster2.run(_record_opens_under, str(tmp_path))
    with LLM(local, client=cluster2) as on_disk:
        expected = on_disk.generate([[2, 3, 4]], max_new_tokens=5, ignore_eos=True)[0].token_ids
    assert any(cluster2.run(_opened).values()), "the hook must see a rank that reads from disk"
    cluster2.run(_forget_opens)
    with LLM(local, tp=2, client=cluster2, ship_weights=True) as shipped:
        assert shipped.generate([[2, 3, 4]], max_new_tokens=5, ignore_eos=True)[0].token_ids == expected
        assert all(info["weights_bytes"] > 0 for info in shipped.replicas[0].load_info)
    assert cluster2.run(_opened) == {w: [] for w in cluster2.scheduler_info()["workers"]}


def test_workers_that_cannot_read_the_checkpoint_are_named(client, tmp_path):
    from daskllm.runtime.placement import PlacementError, check_checkpoint_on_workers
    workers = list(client.scheduler_info()["workers"])
    with pytest.raises(PlacementError, match=r"these workers cannot read the checkpoint .*: tcp://.*ship_weights=True"):
        check_checkpoint_on_workers(client, workers, str(tmp_path / "not_there"))


def test_settings_keep_their_defaults_after_a_config_context_that_imported_daskllm():
    """dask.config.set's context, left, drops the keys added while it ran, daskllm's defaults among
    them when daskllm was first imported inside it; settings.get still answers with the default."""
    code = ("import dask\n"
            "with dask.config.set({'daskllm.decode-steps': 1}):\n"
            "    from daskllm.runtime import settings\n"
            "    assert settings.get('decode-steps') == 1\n"
            "print(settings.get('comm-timeout'), settings.get('decode-steps'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["60.0", "auto"]
