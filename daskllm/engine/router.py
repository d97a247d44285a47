"""Router: sends each request to the live replica with the least outstanding work.

Outstanding work is tokens still to prefill plus tokens still to generate, so a replica
busy with one long prompt is not handed the next request just because its queue is short.
When a replica is lost, its unfinished requests are re-routed to the survivors.
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
        self._lock = threading.Lock()

    def add(self, engine):
        with self._lock:
            self.engines.append(engine)
            self.lost.pop(engine.index, None)

    def alive(self) -> list:
        return [e for e in self.engines if e.alive]

    def submit(self, request):
        """Queue `request` on the least-loaded live replica."""
        while True:
            with self._lock:
                if self.closed:
                    raise LLMClosedError()
                live = self.alive()
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
        for req in requests:
            if req.finished:           # cancelled meanwhile
                continue
            req.retries += 1
            try:
                self.submit(req)
            except (NoReplicaError, LLMClosedError) as e:
                req.fail(e)

    def _no_replica_message(self) -> str:
        causes = "; ".join(f"replica {i}: {e}" for i, e in sorted(self.lost.items()))
        return "no live replica is left to serve requests" + (f" ({causes})" if causes else "")

    def close(self):
        """End every engine; requests still queued or running fail with LLMClosedError."""
        with self._lock:
            self.closed = True
            engines = list(self.engines)
        for e in engines:
            e.close(LLMClosedError())
