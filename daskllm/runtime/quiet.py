"""Fewer wake-ups beside the ranks: Dask's fast timers slowed on the processes that share their cores.

Every Dask server wakes its event loop about a hundred times a second even when idle: the
loop-health tick every 20 ms (worker, nanny, scheduler), the worker's task profiler every
10 ms, the memory monitors every 100 ms (worker, nanny). A rank's BLAS threads fill every
core of its worker, so each wake-up takes a core from one of them, and the others wait for
it at the end of the matmul. On a 2-core machine the in-process runner decoded 8% slower
beside an idle LocalCluster than alone, and as fast as alone with these timers slowed
(benchmarks/README.md, "Dask's timers").

While a replica lives, the driver slows them on its ranks' workers and their nannies, and on
the scheduler when it shares a host with a rank (a LocalCluster, or dask-ssh's first host):
- the tick to once a second (it still logs a loop blocked past distributed.admin.tick.limit, 3 s);
- the memory monitors to once a second (a worker still pauses, a nanny still restarts its
  worker, at their memory thresholds; they notice up to a second later);
- the worker's task profiler stopped (ranks compute outside Dask tasks: it has nothing to show).
Closing the replica puts them back. Several replicas or LLMs on one server count: the timers
come back when the last one closes. Turn it off with daskllm.quiet-dask: False.
"""
from __future__ import annotations

import logging
import threading

from .placement import host_of, worker_table

logger = logging.getLogger(__name__)

# periodic callback name -> its period while ranks run, in ms (0: stopped)
SLOW_TIMERS_MS = {"tick": 1000, "memory_monitor": 1000, "profile": 0, "profile-cycle": 0}


def _server(dask_worker, dask_scheduler):
    return dask_worker if dask_worker is not None else dask_scheduler


def slow_timers(dask_worker=None, dask_scheduler=None) -> dict:
    """Run on a server's event loop (Client.run / run_on_scheduler): slow its fast timers, or
    count one more holder if they are slowed already; {timer: period in ms now}."""
    server = _server(dask_worker, dask_scheduler)
    held = getattr(server, "_daskllm_slowed", None)
    if held is None:
        saved = {}
        for name, period in SLOW_TIMERS_MS.items():
            timer = server.periodic_callbacks.get(name)
            if timer is None:
                continue
            saved[name] = (timer.callback_time, timer.is_running())
            timer.stop()
            if period:
                timer.callback_time = period
                if saved[name][1]:
                    timer.start()
        held = server._daskllm_slowed = [0, saved]
    held[0] += 1
    return timer_periods(dask_worker, dask_scheduler)


def timer_periods(dask_worker=None, dask_scheduler=None) -> dict:
    """{timer: its period in ms, 0 if stopped} of the timers this module slows (to check it)."""
    server = _server(dask_worker, dask_scheduler)
    timers = {name: server.periodic_callbacks.get(name) for name in SLOW_TIMERS_MS}
    return {name: (t.callback_time if t.is_running() else 0) for name, t in timers.items() if t is not None}


def restore_timers(dask_worker=None, dask_scheduler=None) -> int:
    """Undo one slow_timers; the last holder puts the periods back. How many holders are left."""
    server = _server(dask_worker, dask_scheduler)
    held = getattr(server, "_daskllm_slowed", None)
    if held is None:
        return 0
    held[0] -= 1
    if held[0] > 0:
        return held[0]
    for name, (period, running) in held[1].items():
        timer = server.periodic_callbacks.get(name)
        if timer is None:
            continue
        timer.stop()
        timer.callback_time = period
        if running:
            timer.start()
    del server._daskllm_slowed
    return 0


def _within(timeout: float, what: str, call) -> bool:
    """call() in a helper thread, waited for at most `timeout` s: a server that does not answer
    costs the ranks some speed, never a hang. Whether it finished."""
    done = threading.Event()
    failure = []

    def run():
        try:
            call()
        except Exception as e:   # noqa: BLE001 - logged below: slower ranks, not a failed start
            failure.append(e)
        finally:
            done.set()
    threading.Thread(target=run, name="daskllm-quiet", daemon=True).start()
    if not done.wait(timeout) or failure:
        logger.info("daskllm: could not %s within %g s (%s); the ranks may run a few percent slower",
                    what, timeout, failure[0] if failure else "no answer")
        return False
    return True


class QuietTimers:
    """The timers slowed for one replica's workers; `restore()` puts them back (idempotent)."""

    def __init__(self, client, workers: list, timeout: float):
        self.client, self.workers, self.timeout = client, list(workers), timeout
        scheduler = getattr(client.scheduler, "address", None) or ""
        self.scheduler = bool(scheduler) and host_of(scheduler) in {host_of(w) for w in self.workers}
        self._apply(slow_timers, "slow Dask's timers beside the ranks")
        self.active = True

    def _apply(self, function, what: str):
        def call():
            # Only the workers still there: a lost one's nanny is unknown, a broadcast to it fails.
            known = {address for address, _, _ in worker_table(self.client)}
            workers = [w for w in self.workers if w in known]
            if workers:
                self.client.run(function, workers=workers, on_error="ignore")
                self.client.run(function, workers=workers, nanny=True, on_error="ignore")  # none: skipped
            if self.scheduler:
                self.client.run_on_scheduler(function)
        _within(self.timeout, what, call)

    def restore(self):
        if self.active:
            self.active = False
            self._apply(restore_timers, "put Dask's timers back")
