"""ReplicaEngine: continuous batching for one replica, in a driver thread.

Each loop turn is one step of the replica: waiting requests join the running batch as
the KV budget allows (their prompt is prefilled, in chunks if long), running ones decode
one token, finished or cancelled ones leave at once and their caches are freed with the
next step, or by a release call of their own when no step follows.
While the batch is steady (every sequence decoding, nobody waiting to join) one message may
carry a run of decode steps (daskllm.decode-steps): the ranks feed each sequence the token
they chose, and stream each step's tokens back, so the driver's turn between steps leaves
the path (as vLLM's multi-step scheduling). A request that ends on a stop string or is
cancelled mid-run has its later tokens dropped; one arriving mid-run joins after it.
An error in one request fails that request only. If the replica is lost, its requests are
handed back (prompt + tokens so far) to be re-run elsewhere.
"""
from __future__ import annotations

import threading
import time
from collections import deque

from ..model.runner import Work
from ..runtime import settings
from ..runtime.replica import ReplicaError
from .validate import kv_reservation


class ReplicaEngine:
    """Drives one Replica; `submit`, `beside` and `close` are thread-safe."""

    def __init__(self, replica, budget_tokens: int, max_batch_tokens: int, on_lost, sp: int = 1):
        self.replica = replica
        self.index = replica.index
        self.budget_tokens = budget_tokens
        self.max_batch_tokens = max_batch_tokens
        self.sp = sp
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
        self._busy = set()                   # request ids in a step not yet answered (pipelined replicas)
        self._release = []
        self._answered_at = 0.0              # when the last answer was handled (a run's next turn starts there)
        # (seconds of a loop turn, the slowest rank's compute in it): the control path's cost
        # is the difference (benchmarks/dask_tax.py)
        self.step_log = deque(maxlen=4096)
        self._extra = 0                      # KV entries held by a call beside the loop (logits)
        self._beside = threading.Lock()      # one such call at a time
        self._cond = threading.Condition()
        self._stop = False
        self._closed_error = None            # what close() failed the requests with
        self._thread = threading.Thread(target=self._loop, name=f"daskllm-replica-{self.index}", daemon=True)
        self._thread.start()

    # -- called by the router ----------------------------------------------------------

    def submit(self, request):
        with self._cond:
            if not self.alive or self._stop:
                raise RuntimeError(f"replica {self.index} is not alive")
            request.replica = self.index
            self._waiting.append(request)
            self._cond.notify_all()

    def outstanding(self) -> int:
        """Tokens still to prefill or generate for everything queued or running here."""
        with self._cond:
            reqs = list(self._waiting) + list(self._running.values())
        return sum(r.remaining_work - len(r.generated) for r in reqs)

    def reservation(self, tokens: int) -> int:
        """KV entries reserved for a sequence that will hold `tokens` (see validate.kv_reservation)."""
        return kv_reservation(tokens, self.sp, self.max_batch_tokens)

    def beside(self, entries: int, call):
        """Run `call()` (a forward outside the batch, e.g. logits) once `entries` of KV budget are
        free, holding them meanwhile; no request is admitted while it waits."""
        with self._beside:
            with self._cond:
                self._extra = entries
                try:
                    while self._reserved() > self.budget_tokens:
                        if not self.alive or self._stop:
                            raise self._closed_error or RuntimeError(f"replica {self.index} is not alive")
                        self._cond.wait(1.0)
                except BaseException:
                    self._extra = 0
                    self._cond.notify_all()
                    raise
            try:
                return call()
            finally:
                with self._cond:
                    self._extra = 0
                    self._cond.notify_all()

    def close(self, error: BaseException | None = None):
        """Stop the loop; fail every request still queued or running here with `error`."""
        error = error or RuntimeError(f"replica {self.index} was closed")
        with self._cond:
            self._stop, self._closed_error = True, error
            requests = list(self._running.values()) + list(self._waiting)
            self._running.clear()
            self._waiting.clear()
            self._cond.notify_all()
        for req in requests:
            req.fail(error)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    # -- the loop ----------------------------------------------------------------------

    def _reserved(self) -> int:
        return self._extra + sum(self.reservation(r.remaining_work) for r in self._running.values())

    def _admit(self):
        """Move waiting requests into the running batch while the KV budget allows."""
        while self._waiting:
            req = self._waiting[0]
            if req.finished:                 # cancelled (or failed) while it waited
                self._waiting.popleft()
                continue
            if self._reserved() + self.reservation(req.remaining_work) > self.budget_tokens:
                return
            self._waiting.popleft()
            self._running[req.id] = req
            self._fed[req.id] = 0

    def _drop_finished(self):
        """Running requests that ended (done, failed or cancelled) leave; their caches are freed."""
        for seq in [s for s, r in self._running.items() if r.finished]:
            del self._running[seq], self._fed[seq]
            self._release.append(seq)
            self.served += 1
        self._cond.notify_all()

    def _decoding(self, req) -> bool:
        """All of its context is cached except the last generated token, which it feeds next."""
        return bool(req.generated) and self._fed[req.id] == len(req.prompt) + len(req.generated) - 1

    def _plan_step(self, limit: int) -> list:
        """Work for this step: decodes first (one token each), then prefill chunks up to the token cap;
        at most `limit` sequences, none of those already in a step in flight."""
        free = [r for r in self._running.values() if r.id not in self._busy][:limit]
        work, tokens = [], 0
        for req in free:
            if self._decoding(req):
                work.append(Work(req.id, (req.generated[-1],), self._fed[req.id], True, req.params,
                                 len(req.generated)))
                tokens += 1
        for req in free:
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
            if self.on_lost is not None:
                self.on_lost(self, [], error)    # recorded as lost, so restore() re-creates it
            _close_quietly(self.replica)

    def _run(self):
        """Each turn sends a step or takes the answer of the oldest step in flight.

        A pipelined replica (pp stages) keeps up to pp steps in flight, each over its own share of the
        running sequences (a micro-batch), so that every stage has one to run; other replicas keep one."""
        depth = getattr(self.replica, "pipeline_depth", 1)
        in_flight = deque()                  # (finish, work, release, turn start, run), oldest first
        while True:
            with self._cond:
                while not self._stop and not in_flight and not self._waiting and not self._running \
                        and not self._release:
                    self._cond.wait()
                if self._stop:
                    break
                turn_start = time.perf_counter()
                self._drop_finished()
                self._admit()
                work, release = [], []
                steps, stop_ids = 1, []
                # Room for another step, unless a call from another thread waits for the ranks.
                if len(in_flight) < depth and not (in_flight and getattr(self.replica, "others_waiting", False)):
                    work = self._plan_step(limit=-(-len(self._running) // depth))
                    if work or not in_flight:        # a release alone goes only when nothing is in flight
                        release, self._release = self._release, []
                    steps = self._run_length(work, depth)
                    stop_ids = [self._running[w.seq].eos_ids for w in work] if steps > 1 else []
                if not work and not release and not in_flight:   # all waiting, the budget held by a call beside
                    self._cond.wait(1.0)
                    continue
                self._busy.update(w.seq for w in work)
            if work or release:
                try:
                    in_flight.extend(self._send(work, release, turn_start, steps, stop_ids))
                except ReplicaError as error:
                    self._lost(error)
                    return
                if len(in_flight) < depth and work:
                    continue                         # fill the pipeline before waiting for an answer
            if in_flight:
                finish, work, release, turn_start, run = in_flight.popleft()
                answered = self._receive(finish, work, release, turn_start)
                if answered is None:
                    return                                   # the replica is lost
                if not answered and run is not None:         # the ranks end a run at its failed step
                    kept = [entry for entry in in_flight if entry[4] is not run]
                    in_flight.clear()
                    in_flight.extend(kept)
        while in_flight:                             # closing: let the ranks finish what they were sent
            try:
                in_flight.popleft()[0]()
            except Exception:   # noqa: BLE001 - the requests were failed by close()
                pass

    def _run_length(self, work, depth) -> int:
        """Decode steps to send in one message: more than 1 only while the batch is steady (every
        sequence decoding, nobody waiting to join), on a replica that can (control connections, pp=1),
        and never past a request's max_new_tokens. Not while a call from another thread waits for
        the ranks (stats, logits): a run holds them for all its steps, single steps let it in."""
        if depth > 1 or not work or self._waiting or not getattr(self.replica, "sends_ahead", False) \
                or getattr(self.replica, "others_waiting", False):
            return 1
        requests = [self._running[w.seq] for w in work]
        if not all(self._decoding(r) for r in requests):
            return 1
        wanted = settings.decode_steps()
        if wanted == "auto":                 # as many as fit in RUN_SECONDS at the last step's pace
            last = self.step_log[-1][0] if self.step_log else None
            wanted = int(settings.RUN_SECONDS / last) if last else 1
        left = min(r.max_new_tokens - len(r.generated) for r in requests)
        return max(1, min(wanted, settings.MAX_RUN, left))

    def _send(self, work, release, turn_start, steps=1, stop_ids=()):
        """Start a step, or a run of `steps` decode steps; -> its in-flight entries, one per step,
        oldest first: (a function that waits for the step's answer {seq: next token}, its work,
        release, turn start, its run or None). A run's later steps get placeholder work for _receive's bookkeeping
        (its positions; the tokens are the ranks' own) and start their turn at the answer before."""
        if steps > 1:
            self.replica.submit_step(work, release, steps, stop_ids)
            run = object()                   # marks the run's entries (a failed step ends the run)
            later = [[Work(w.seq, w.tokens, w.start + i) for w in work] for i in range(1, steps)]
            return [(self.replica.finish_step, work, release, turn_start, run)] + \
                [(self.replica.finish_step, placeholder, [], None, run) for placeholder in later]
        if work and hasattr(self.replica, "submit_step") and self.replica.pipeline_depth > 1:
            self.replica.submit_step(work, release)
            return [(self.replica.finish_step, work, release, turn_start, None)]
        if work:
            return [(lambda: self.replica.step(work, release), work, release, turn_start, None)]
        return [(lambda: self.replica.release(release), work, release, turn_start, None)]

    def _receive(self, finish, work, release, turn_start) -> bool | None:
        """Wait for a step's answer and give each request its token; False if the step failed on the
        ranks (its requests fail), None once the replica is lost."""
        start = time.perf_counter()
        turn_start = self._answered_at if turn_start is None else turn_start     # a run's later step
        try:
            chosen = finish()
        except ReplicaError as error:   # a rank is lost or frozen: its requests move on
            self._lost(error)
            return None
        except Exception as error:      # noqa: BLE001 - the call failed, the ranks are fine
            self._failed(work, release, error)
            return False
        finally:
            with self._cond:
                self._busy.difference_update(w.seq for w in work)
        self.steps += bool(work)
        if work:
            self.step_seconds += time.perf_counter() - start
        with self._cond:
            for w in work:
                if w.seq in self._fed:
                    self._fed[w.seq] = w.start + len(w.tokens)
            for seq, token in (chosen or {}).items():
                req = self._running.get(seq)
                if req is None:
                    continue
                try:
                    req.add_token(token)
                    self.tokens += 1
                    if len(req.generated) == 1:
                        self._ttft.append(req.first_token_at - req.submitted_at)
                except Exception as error:   # noqa: BLE001 - e.g. its decoder: this request only
                    req.fail(RuntimeError(f"request {req.id} failed: {type(error).__name__}: {error}"))
            self._drop_finished()
        self._answered_at = time.perf_counter()
        if work:
            self.step_log.append((self._answered_at - turn_start, getattr(self.replica, "last_compute", 0.0)))
        return True

    def _failed(self, work, release, error):
        """A step that raised on the ranks fails the requests in it; their caches are freed."""
        with self._cond:
            for w in work:
                req = self._running.get(w.seq)
                if req is not None:
                    req.fail(error)
            self._release.extend(release)
            self._drop_finished()

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
            self._cond.notify_all()
        self.on_lost(self, [r for r in requests if not r.finished], error)
        _close_quietly(self.replica)


def _close_quietly(replica):
    """Free what is left of a lost replica (its surviving actors), never raising."""
    try:
        close = getattr(replica, "close", None)
        if close is not None:
            close()
    except Exception:   # noqa: BLE001 - best effort: some ranks are gone
        pass
