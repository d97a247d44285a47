"""Dask's fast timers slowed beside the ranks (runtime/quiet.py), and put back after the last holder.

The end-to-end check, on a multi-process cluster the user started (worker, nanny and scheduler),
is test_runtime.test_speed_settings_are_in_force_in_a_worker_the_user_started."""
from __future__ import annotations

import logging
import time

import pytest

from daskllm.runtime import quiet
from daskllm.runtime.quiet import QuietTimers, restore_timers, slow_timers, timer_periods

SLOWED = {"tick": 1000, "memory_monitor": 1000, "profile": 0, "profile-cycle": 0}


@pytest.fixture
def threaded():
    """A scheduler and one worker in this process (no nanny): their event loops run the calls."""
    from distributed import Client, LocalCluster
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        yield client


def _periods(client):
    (worker,) = client.run(timer_periods).values()
    return worker, client.run_on_scheduler(timer_periods)


def test_timers_stay_slow_while_any_holder_lives_and_come_back_after_the_last(threaded):
    dask_worker, dask_scheduler = _periods(threaded)
    assert dask_worker["tick"] == 20 and dask_worker["profile"] == 10 and dask_scheduler == {"tick": 20}
    assert threaded.run(slow_timers) == {w: SLOWED for w in threaded.run(timer_periods)}
    threaded.run(slow_timers)                                   # a second replica on the same worker
    threaded.run_on_scheduler(slow_timers)
    assert _periods(threaded) == (SLOWED, {"tick": 1000})
    assert list(threaded.run(restore_timers).values()) == [1]  # one holder left: still slow
    assert _periods(threaded)[0] == SLOWED
    assert list(threaded.run(restore_timers).values()) == [0]
    threaded.run_on_scheduler(restore_timers)
    assert _periods(threaded) == (dask_worker, dask_scheduler)
    assert list(threaded.run(restore_timers).values()) == [0]  # more restores than slows: nothing moves
    assert _periods(threaded) == (dask_worker, dask_scheduler)


def _stop_profile(dask_worker):
    dask_worker.periodic_callbacks["profile"].stop()


def test_a_timer_the_user_stopped_stays_stopped(threaded):
    threaded.run(_stop_profile)
    threaded.run(slow_timers)
    threaded.run(restore_timers)
    (worker,) = threaded.run(timer_periods).values()
    assert worker["profile"] == 0 and worker["tick"] == 20


class _FakeClient:
    """Records where QuietTimers sends its calls; the scheduler listens on `scheduler_address`."""

    def __init__(self, scheduler_address, workers):
        self.scheduler = type("Rpc", (), {"address": scheduler_address})()
        self.workers, self.calls = workers, []

    def scheduler_info(self, n_workers=-1):
        return {"workers": {w: {"nthreads": 1} for w in self.workers}}

    def run(self, function, workers=None, nanny=False, on_error="raise"):
        self.calls.append((function.__name__, "nanny" if nanny else "worker", tuple(workers)))

    def run_on_scheduler(self, function):
        self.calls.append((function.__name__, "scheduler", ()))


def test_the_scheduler_is_slowed_only_when_it_shares_a_host_with_a_rank():
    ranks = ["tcp://10.0.0.2:4000", "tcp://10.0.0.3:4000"]
    apart = _FakeClient("tcp://10.0.0.9:8786", ranks)
    QuietTimers(apart, ranks, timeout=5)
    assert [where for _, where, _ in apart.calls] == ["worker", "nanny"]
    beside = _FakeClient("tcp://10.0.0.3:8786", ranks)
    QuietTimers(beside, ranks, timeout=5).restore()
    assert beside.calls == [("slow_timers", "worker", tuple(ranks)), ("slow_timers", "nanny", tuple(ranks)),
                            ("slow_timers", "scheduler", ()), ("restore_timers", "worker", tuple(ranks)),
                            ("restore_timers", "nanny", tuple(ranks)), ("restore_timers", "scheduler", ())]


def test_restoring_skips_a_worker_that_is_gone_and_happens_once():
    ranks = ["tcp://10.0.0.2:4000", "tcp://10.0.0.3:4000"]
    client = _FakeClient("tcp://10.0.0.9:8786", ranks)
    timers = QuietTimers(client, ranks, timeout=5)
    client.workers = ranks[1:]                      # the first rank's worker died meanwhile
    client.calls.clear()
    timers.restore()
    timers.restore()
    assert client.calls == [("restore_timers", "worker", (ranks[1],)), ("restore_timers", "nanny", (ranks[1],))]


def test_a_cluster_that_does_not_answer_costs_the_caller_no_more_than_the_timeout(caplog):
    start = time.monotonic()
    with caplog.at_level(logging.INFO, logger=quiet.__name__):
        assert not quiet._within(0.2, "slow Dask's timers beside the ranks", lambda: time.sleep(3))
    assert time.monotonic() - start < 1.5
    assert "could not slow Dask's timers beside the ranks within 0.2 s (no answer)" in caplog.text
