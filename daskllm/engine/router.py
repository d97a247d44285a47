"""Router: sends each request to the live replica with the least outstanding work.

Outstanding work is tokens still to prefill plus tokens still to generate, so a replica
busy with one long prompt is not handed the next request just because its queue is short.
When a replica is lost, its unfinished requests are re-routed to the survivors; while none
is live and a rebuild is under way (engine.recovery), they are parked until it is done.
"""
from __future__ import annotations

import threading


class NoReplicaError(RuntimeError):
    """No live replica is left to serve requests."""


class LLMClosedError(RuntimeError):
    """The LLM was closed: its requests were ended and it takes no more calls."""

    def __init__(self, message="this LLM is closed; create a new LLM(...) to generate again"):
        super().__init__(message)


class Router:
    def __init__(self):
        self.engines = []
        self.lost = {}                 # replica index -> the error that ended it
        self.closed = False
        self.recovery = None           # engine.recovery.Recovery (set by the LLM); None: lost stays lost
        self._rebuilding = set()       # indices of lost replicas being rebuilt
        self._parked = []              # requests waiting for a rebuilt replica (none is live)
        self._lock = threading.Lock()

    def add(self, engine):
        """A new or rebuilt replica's engine joins; requests parked for it start there."""
        with self._lock:
            self.engines.append(engine)
            self.lost.pop(engine.index, None)
            self._rebuilding.discard(engine.index)
            parked, self._parked = self._parked, []
        for req in parked:
            self._resubmit(req)

    def alive(self) -> list:
        return [e for e in self.engines if e.alive]

    def busy_workers(self) -> set:
        """Workers hosting a rank of a live replica."""
        return {w for e in self.alive() for w in e.replica.workers}

    def rebuilding(self) -> set:
        with self._lock:
            return set(self._rebuilding)

    def submit(self, request):
        """Queue `request` on the least-loaded live replica."""
        while True:
            with self._lock:
                if self.closed:
                    raise LLMClosedError()
                live = self.alive()
                if not live and self._rebuilding:
                    request.replica = None
                    self._parked.append(request)   # it starts when a rebuilt replica joins (add)
                    return
                if not live:
                    raise NoReplicaError(self._no_replica_message())
                engine = min(live, key=lambda e: (e.outstanding(), e.index))
            try:
                return engine.submit(request)
            except RuntimeError:       # it died between the choice and the submit: choose again
                continue

    def on_lost(self, engine, requests, error):
        """Called by an engine whose replica failed: move its requests to the survivors."""
        with self._lock:
            self.lost[engine.index] = error
            self.engines = [e for e in self.engines if e is not engine]
            if self.recovery is not None and self.recovery.enabled and not self.closed:
                self._rebuilding.add(engine.index)
                self.recovery.start(engine.index, engine.replica.workers)
        for req in requests:
            if req.finished:           # cancelled meanwhile
                continue
            req.retries += 1
            self._resubmit(req)

    def _resubmit(self, req):
        if req.finished:
            return
        try:
            self.submit(req)
        except (NoReplicaError, LLMClosedError) as e:
            req.fail(e)

    def rebuild_failed(self, index, error):
        """Called by recovery when replica `index` could not be rebuilt in time."""
        with self._lock:
            self._rebuilding.discard(index)
            self.lost[index] = RuntimeError(f"{self.lost.get(index)}; {error}")
            if self.alive() or self._rebuilding:
                return                       # parked requests wait for the other rebuilds
            parked, self._parked = self._parked, []
            failure = NoReplicaError(self._no_replica_message())
        for req in parked:
            req.fail(failure)

    def _no_replica_message(self) -> str:
        causes = "; ".join(f"replica {i}: {e}" for i, e in sorted(self.lost.items()))
        return "no live replica is left to serve requests" + (f" ({causes})" if causes else "")

    def close(self):
        """End every engine; requests still queued, running or waiting for a rebuild fail with LLMClosedError."""
        if self.recovery is not None:
            self.recovery.close()
        with self._lock:
            self.closed = True
            engines = list(self.engines)
            parked, self._parked = self._parked, []
            self._rebuilding.clear()
        for req in parked:
            req.fail(LLMClosedError())
        for e in engines:
            e.close(LLMClosedError())
