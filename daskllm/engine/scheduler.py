"""ReplicaEngine: continuous batching for one replica, in a driver thread.

Each loop turn is one step of the replica: waiting requests join the running batch as
the KV budget allows (their prompt is prefilled, in chunks if long), running ones decode
one token, finished ones leave at once and their caches are freed in the next call.
If the replica fails, its requests are handed back (prompt + tokens so far) to be re-run
elsewhere.
"""
from __future__ import annotations

import threading
import time
from collections import deque

from ..model.runner import Work


class ReplicaEngine:
    """Drives one Replica; `submit` is thread-safe."""

    def __init__(self, replica, budget_tokens: int, max_batch_tokens: int, on_lost):
        self.replica = replica
        self.index = replica.index
        self.budget_tokens = budget_tokens
        self.max_batch_tokens = max_batch_tokens
        self.on_lost = on_lost               # on_lost(engine, requests, error): re-home them
        self.alive = True
        self.steps = 0
        self.served = 0                      # requests finished here
        self.tokens = 0                      # tokens generated here (dashboard: tokens/s)
        self.step_seconds = 0.0              # driver wall time of replica.step (dashboard: control time)
        self._ttft = deque(maxlen=64)        # seconds from submit to first token, latest requests
        self._waiting = deque()
        self._running = {}                   # request id -> Request
        self._fed = {}                       # request id -> tokens of its context already in the cache
        self._release = []
        # (seconds of a loop turn, the slowest rank's compute in it): the control path's cost
        # is the difference (benchmarks/dask_tax.py)
        self.step_log = deque(maxlen=4096)
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name=f"daskllm-replica-{self.index}", daemon=True)
        self._thread.start()

    # -- called by the router ----------------------------------------------------------

    def submit(self, request):
        with self._cond:
            if not self.alive:
                raise RuntimeError(f"replica {self.index} is not alive")
            request.replica = self.index
            self._waiting.append(request)
            self._cond.notify()

    def outstanding(self) -> int:
        """Tokens still to prefill or generate for everything queued or running here."""
        with self._cond:
            reqs = list(self._waiting) + list(self._running.values())
        return sum(r.remaining_work - len(r.generated) for r in reqs)

    def close(self):
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=30)

    # -- the loop ----------------------------------------------------------------------

    def _reserved(self) -> int:
        return sum(r.remaining_work for r in self._running.values())

    def _admit(self):
        """Move waiting requests into the running batch while the KV budget allows."""
        while self._waiting and self._reserved() + self._waiting[0].remaining_work <= self.budget_tokens:
            req = self._waiting.popleft()
            if req.finished:
                continue
            self._running[req.id] = req
            self._fed[req.id] = 0

    def _decoding(self, req) -> bool:
        """All of its context is cached except the last generated token, which it feeds next."""
        return bool(req.generated) and self._fed[req.id] == len(req.prompt) + len(req.generated) - 1

    def _plan_step(self) -> list:
        """Work for this step: decodes first (one token each), then prefill chunks up to the token cap."""
        work, tokens = [], 0
        for req in self._running.values():
            if self._decoding(req):
                work.append(Work(req.id, (req.generated[-1],), self._fed[req.id], True, req.params,
                                 len(req.generated)))
                tokens += 1
        for req in self._running.values():
            if self._decoding(req):
                continue
            room = self.max_batch_tokens - tokens
            if room <= 0:
                break
            fed, context = self._fed[req.id], req.context
            chunk = context[fed:fed + room]
            last = fed + len(chunk) == len(context)
            work.append(Work(req.id, tuple(chunk), fed, last, req.params, len(req.generated)))
            tokens += len(chunk)
        return work

    def _loop(self):
        try:
            self._run()
        except Exception as error:   # noqa: BLE001 - a bug here must fail requests, not strand them
            with self._cond:
                self.alive = False
                requests = list(self._running.values()) + list(self._waiting)
                self._running.clear()
                self._waiting.clear()
            for req in requests:
                req.fail(RuntimeError(f"replica {self.index}'s scheduler stopped: {type(error).__name__}: {error}"))

    def _run(self):
        while True:
            with self._cond:
                while not self._stop and not self._waiting and not self._running:
                    self._cond.wait()
                if self._stop:
                    return
                turn_start = time.perf_counter()
                self._admit()
                work = self._plan_step()
                release, self._release = self._release, []
            start = time.perf_counter()
            try:
                chosen = self.replica.step(work, release)
            except Exception as error:   # noqa: BLE001 - the replica is lost; its requests move on
                self._lost(error)
                return
            self.steps += 1
            self.step_seconds += time.perf_counter() - start
            with self._cond:
                for w in work:
                    self._fed[w.seq] = w.start + len(w.tokens)
                for seq, token in chosen.items():
                    req = self._running[seq]
                    req.add_token(token)
                    self.tokens += 1
                    if len(req.generated) == 1:
                        self._ttft.append(req.first_token_at - req.submitted_at)
                for seq in [s for s, r in self._running.items() if r.finished]:
                    del self._running[seq], self._fed[seq]
                    self._release.append(seq)
                    self.served += 1
            self.step_log.append((time.perf_counter() - turn_start, getattr(self.replica, "last_compute", 0.0)))

    # -- read by the dashboard and progress bars (never drives the loop) ---------------

    def snapshot(self) -> dict:
        """Counters and queue lengths of this replica, as plain data."""
        with self._cond:
            return {"replica": self.index, "alive": self.alive, "steps": self.steps,
                    "step_seconds": self.step_seconds, "tokens": self.tokens, "queued": len(self._waiting),
                    "running": len(self._running), "finished": self.served, "ttft": list(self._ttft)}

    def prefilled(self, request) -> int:
        """Tokens of `request`'s context already in the cache (its whole context once finished)."""
        with self._cond:
            return len(request.context) if request.finished else self._fed.get(request.id, 0)

    def _lost(self, error):
        with self._cond:
            self.alive = False
            requests = list(self._running.values()) + list(self._waiting)
            self._running.clear()
            self._waiting.clear()
        self.on_lost(self, [r for r in requests if not r.finished], error)
