"""Recovery: a lost replica is rebuilt on healthy free workers, without the caller asking.

When a rank is lost (killed, or frozen past the step timeout), its whole replica is given
up: the router moves its requests (prompt + tokens so far, the driver's truth) to the live
replicas, or parks them while no replica is live. Recovery then rebuilds the replica under
the same index on workers that host no live rank: the nanny's restart of a killed worker
or a spare one. It tries until `daskllm.rebuild-timeout` seconds after the loss; when that
passes with no replica live, the parked requests fail with an error that says why.

A replayed request continues from exactly its tokens so far: greedy ones pick the same
tokens, sampled ones draw with the same (seed, counter) and so the same tokens too.

Workers are probed before use: a frozen worker still listed by the scheduler does not
answer, and is skipped. Workers that held the lost replica's ranks are used last, since
their old rank may still be finishing its last step on the worker's one actor thread.
A frozen rank that wakes up corrupts nothing: its replica's connections and actors belong
to an incarnation nobody talks to any more (each incarnation has its own epoch, which its
ranks' connections and every driver call carry), and its late answers are dropped.
"""
from __future__ import annotations

import logging
import threading
import time

from ..runtime import settings

logger = logging.getLogger("daskllm")

PROBE_TIMEOUT = 10.0    # s: a healthy worker runs a no-op task well within this, even on a loaded
                        #    machine (measured: 3 s was too short at a load average of 50 on 2 cores)
RETRY_PAUSE = 0.5       # s: between attempts while no free workers are there yet


class RebuildFailed(RuntimeError):
    """A lost replica could not be rebuilt within daskllm.rebuild-timeout."""


class Recovery:
    """Rebuilds lost replicas one at a time, in a background thread.

    build(index, workers) -> a started ReplicaEngine on those workers (the LLM makes it);
    router: the Router to hand the rebuilt engine to (`add`) or to tell of a failure
    (`rebuild_failed`).
    """

    def __init__(self, client, router, build, replica_size: int):
        self.client, self.router, self.build, self.size = client, router, build, replica_size
        self.timeout = float(settings.get("rebuild-timeout") or 0)
        self.rebuilt = 0                      # replicas rebuilt so far (for logs and tests)
        self._queue = []                      # (index, old workers, deadline)
        self._cond = threading.Condition()
        self._closed = False
        self._thread = None

    @property
    def enabled(self) -> bool:
        return self.timeout > 0

    def start(self, index: int, old_workers: list) -> float:
        """Queue a rebuild of replica `index` (which ran on `old_workers`); returns its deadline."""
        deadline = time.monotonic() + self.timeout
        with self._cond:
            self._queue.append((index, list(old_workers), deadline))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="daskllm-recovery", daemon=True)
                self._thread.start()
            self._cond.notify()
        return deadline

    def close(self):
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # -- the rebuild thread ------------------------------------------------------------

    def _run(self):
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                index, old_workers, deadline = self._queue.pop(0)
            try:
                engine = self._rebuild(index, old_workers, deadline)
            except Exception as error:   # noqa: BLE001 - a failed rebuild must fail the parked requests, not hang them
                logger.warning("daskllm: replica %d was not rebuilt: %s", index, error)
                self.router.rebuild_failed(index, error)
                continue
            if engine is None:
                continue
            if self._closed:                   # the LLM closed during the rebuild
                engine.close()
                engine.replica.close()
                return
            self.rebuilt += 1
            self.router.add(engine)

    def _rebuild(self, index: int, old_workers: list, deadline: float):
        """A ReplicaEngine for replica `index`, or RebuildFailed at the deadline (None once closed)."""
        start, attempts, last = time.monotonic(), 0, None
        while not self._closed:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            workers = self._free_workers(old_workers)
            logger.debug("daskllm: rebuilding replica %d: healthy free workers %s", index, workers)
            if len(workers) >= self.size:
                attempts += 1
                chosen = workers[:self.size]
                try:      # one attempt is bounded by connect-timeout and load-timeout
                    engine = self.build(index, chosen)
                    logger.info("daskllm: replica %d rebuilt on %s in %.1f s", index, ", ".join(chosen),
                                time.monotonic() - start)
                    return engine
                except Exception as e:   # noqa: BLE001 - a worker may die during the rebuild: try others
                    last = f"{type(e).__name__}: {e}"
                    old_workers = list(old_workers) + chosen      # suspect now: use them last
            else:
                last = last or f"{len(workers)} healthy free worker(s), {self.size} needed"
            time.sleep(min(RETRY_PAUSE, max(0.0, deadline - time.monotonic())))
        if self._closed:
            return None
        raise RebuildFailed(
            f"replica {index} could not be rebuilt within daskllm.rebuild-timeout = {self.timeout:g} s "
            f"({attempts} attempt(s); last: {last or 'no attempt'}); add workers or raise daskllm.rebuild-timeout")

    def _free_workers(self, suspects: list) -> list:
        """Workers hosting no live rank that answer a no-op task in time; suspects last."""
        from ..runtime.placement import worker_table
        busy = self.router.busy_workers()
        candidates = [w for w, _, _ in worker_table(self.client) if w not in busy]
        healthy = set(probe(self.client, candidates))
        order = {w: i for i, w in enumerate(candidates)}
        return sorted((w for w in candidates if w in healthy), key=lambda w: (w in suspects, order[w]))


def probe(client, workers: list, timeout: float = PROBE_TIMEOUT) -> list:
    """The workers among `workers` that run a no-op task within `timeout` (frozen ones do not)."""
    from distributed import wait
    if not workers:
        return []
    futures = {w: client.submit(_noop, w, workers=[w], allow_other_workers=False, pure=False,
                                key=f"daskllm-probe-{time.time_ns()}-{i}") for i, w in enumerate(workers)}
    try:
        wait(list(futures.values()), timeout=timeout)
    except TimeoutError:
        pass
    alive = [w for w, f in futures.items() if f.status == "finished"]
    for f in futures.values():
        f.release()
    return alive


def _noop(worker):
    return worker
