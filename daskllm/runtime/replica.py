"""Replica: the driver's handle on the pp x tp x sp rank actors of one model replica.

Start-up places one actor per worker, hands out listening addresses so the ranks connect
to each other directly, loads the shards, and opens one control connection from the
driver to each rank. A step is then one msgpack message per rank over those connections
(a socket round trip, not a Dask actor call); everything else (stats, logits, close) is
one actor call per rank. Calls are sent to all ranks at once and awaited with a timeout;
a failure names the rank and its worker.

Calls are ordered: a replica runs one driver call at a time (steps from its scheduler,
logits and stats from callers' threads), so every rank sees the calls, and enters their
collectives, in the same order.
Errors are classified: a rank that is gone, frozen or cut off from its peers loses the
replica (ReplicaError); an exception raised by the method on every rank alike is that
call's failure (RankCallError) and the replica serves on.
"""
from __future__ import annotations

import functools
import secrets
import threading
import time
from concurrent.futures import CancelledError

from ..comm.base import CommError
from ..comm.control import ControlLink
from ..parallel.mesh import Mesh
from . import settings
from .placement import peer_hint
from .quiet import QuietTimers
from .rank import RankActor
from .wire import work_to_wire


class ReplicaError(RuntimeError):
    """A rank of a replica failed or did not answer in time."""

    def __init__(self, message, replica=None, rank=None, worker=None):
        super().__init__(message)
        self.replica, self.rank, self.worker = replica, rank, worker


class RankCallError(RuntimeError):
    """A driver call raised on the ranks (the caller's error or a bug); the ranks are still in step."""

    def __init__(self, message, replica=None, rank=None, worker=None, error=None):
        super().__init__(message)
        self.replica, self.rank, self.worker, self.error = replica, rank, worker, error


def _means_lost(error: BaseException) -> bool:
    """A worker gone, frozen or unreachable, or a collective that failed between ranks."""
    return isinstance(error, (TimeoutError, CommError, OSError, CancelledError))


def _ordered(method):
    """Run a driver call under the replica's order lock (see the module docstring)."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        self._take_order()
        try:
            return method(self, *args, **kwargs)
        finally:
            self._order.release()
    return call


class Replica:
    """Ranks [first_rank, first_rank + replica_size) of `mesh`, on `workers` (one per rank)."""

    def __init__(self, client, index: int, workers: list, mesh: Mesh, path: str, options: dict,
                 on_rank_loaded=None, ship_from=None):
        self.client, self.index, self.workers, self.mesh = client, index, list(workers), mesh
        self.options = options
        self.first_rank = index * mesh.replica_size
        self.alive = True
        self._actors = []
        self._futures = []
        self._quiet = None               # Dask's timers slowed beside the ranks (runtime.quiet)
        # This incarnation's epoch: its ranks connect only to each other, never to a rank of an
        # earlier incarnation of the same replica that wakes up late (engine.recovery).
        self.epoch = f"{index}.{secrets.token_hex(8)}"
        options = {**options, "epoch": self.epoch}
        self._links = []                 # control connections, rank order (empty: steps are actor calls)
        self._order = threading.Lock()   # one driver call at a time (see the module docstring)
        self._waiting = 0                # threads waiting for the order lock (counted under _count_lock)
        self._count_lock = threading.Lock()
        self._in_flight = []             # send times of the pipelined steps not yet answered, oldest first
        self.last_compute = 0.0          # the slowest rank's compute seconds in the last step
        mesh_tuple = mesh.as_tuple()
        control = settings.get("control")
        if control not in ("direct", "actor"):       # before any worker is touched
            raise ValueError(f"daskllm.control must be 'direct' or 'actor', got {control!r}")
        try:
            futures = [client.submit(RankActor, r, mesh_tuple, options, settings.get("comm-timeout"),
                                     actor=True, workers=[w], allow_other_workers=False, pure=False,
                                     key=f"daskllm-rank-{self.first_rank + r}-{time.time_ns()}")
                       for r, w in enumerate(self.workers)]
            self._futures = futures
            # An actor binds to the current client as it arrives: make it this one, which need
            # not be the default client (an LLM's private client never is).
            with client.as_current():
                self._actors = [f.result(timeout=settings.get("connect-timeout")) for f in futures]
            if len(self._actors) > 1:
                addresses = dict(enumerate(self._call("listen", timeout=settings.get("connect-timeout"))))
                self._call("connect", addresses, settings.get("connect-timeout"),
                           timeout=settings.get("connect-timeout") + 5)
            if ship_from is None:
                self.load_info = self._call("load", path, None,
                                            timeout=settings.get("load-timeout"), each=on_rank_loaded)
            else:
                self.load_info = self._ship_and_load(ship_from, on_rank_loaded)
            if control == "direct":
                self._links = self._open_control()
            if settings.get("quiet-dask"):
                self._quiet = QuietTimers(client, self.workers, settings.get("connect-timeout"))
        except BaseException:
            self.close()
            raise

    def _ship_and_load(self, checkpoint, on_rank_loaded) -> list:
        """Read each rank's slices here and send them with its load call, one rank at a time
        (so the client holds at most one rank's shard)."""
        from ..io.loader import read_rank_shards
        from ..parallel import compose
        from ..parallel.plan import rank_slices
        cfg = checkpoint.config
        replica_mesh = self.mesh.replica()
        plan = compose.full_plan(cfg, replica_mesh, self.options)
        shapes = {name: checkpoint.shape(name) for name in plan}
        infos = []
        for r, actor in enumerate(self._actors):
            shards = read_rank_shards(checkpoint, rank_slices(plan, shapes, replica_mesh.coords(r)))
            try:
                infos.append(actor.load(None, (cfg, shapes, shards)).result(
                    timeout=settings.get("load-timeout")))
            except Exception as e:   # noqa: BLE001 - name the rank
                self.alive = False
                raise ReplicaError(f"{self._describe(r)} failed to load shipped weights: {type(e).__name__}: {e}",
                                   self.index, self.first_rank + r, self.workers[r]) from e
            if on_rank_loaded is not None:
                on_rank_loaded(infos[-1])
        return infos

    def _open_control(self) -> list:
        """Each rank listens, the driver dials: one control connection per rank (TLS on TLS clusters)."""
        timeout = settings.get("connect-timeout")
        addresses = self._call("open_control", timeout, timeout=timeout)
        ctx = None
        if any(w.startswith("tls://") for w in self.workers):
            ctx = self.client.security.get_connection_args("client").get("ssl_context")
        links = []
        try:
            for r, address in enumerate(addresses):
                try:
                    links.append(ControlLink(address, timeout, ctx))
                except OSError as e:
                    raise ReplicaError(f"{self._describe(r)}: the driver could not open its control connection "
                                       f"to {tuple(address)}: {e!r}; if this client cannot reach the workers "
                                       "directly, set dask.config daskllm.control='actor'",
                                       self.index, self.first_rank + r, self.workers[r]) from e
        except BaseException:
            for link in links:
                link.close()
            raise
        return links

    def _describe(self, r: int) -> str:
        return f"rank {self.first_rank + r} (replica {self.index}) on worker {self.workers[r]}"

    def _call(self, method: str, *args, timeout=None, each=None) -> list:
        """`method(*args)` on every rank at once; their results in rank order.

        `each(result)` is called as each rank answers (progress reporting)."""
        if not self.alive:
            raise ReplicaError(f"replica {self.index} was lost earlier", self.index)
        timeout = settings.get("step-timeout") if timeout is None else timeout
        deadline = time.monotonic() + timeout
        pending = [getattr(actor, method)(*args) for actor in self._actors]
        results, failures = [], []
        for r, fut in enumerate(pending):
            try:
                results.append(fut.result(timeout=max(0.0, deadline - time.monotonic())))
                if each is not None:
                    each(results[-1])
            except Exception as e:   # noqa: BLE001 - every failure is reported with its rank
                results.append(None)
                failures.append((r, e))
                if isinstance(e, TimeoutError):
                    deadline = time.monotonic()      # no point waiting the full timeout again per rank
        if not failures:
            return results
        lost = [(r, e) for r, e in failures if _means_lost(e)]
        r, e = (lost or failures)[0]
        if isinstance(e, TimeoutError) and not isinstance(e, CommError):
            what = f"did not answer within {timeout:.0f} s in {method} (frozen or overloaded worker?)"
        else:
            what = f"failed in {method}: {type(e).__name__}: {e}{peer_hint(e, self.workers)}"
        where = (self.index, self.first_rank + r, self.workers[r])
        if not lost and len(failures) == len(self._actors):
            # Raised by the method itself on every rank: the ranks stayed in step, so this call failed, not them.
            raise RankCallError(f"{self._describe(r)} {what}", *where, error=e) from e
        # A rank is gone or frozen, or some ranks answered while others raised: their states may differ.
        self.alive = False
        raise ReplicaError(f"{self._describe(r)} {what}", *where) from e

    def _take_order(self):
        """Acquire the order lock, or fail after twice the step timeout."""
        wait = 2 * settings.get("step-timeout")
        with self._count_lock:           # += is not atomic across threads: a lost count would starve a caller
            self._waiting += 1
        try:
            if not self._order.acquire(timeout=wait):
                raise ReplicaError(f"replica {self.index}: another driver call held its ranks for over {wait:.0f} s",
                                   self.index)
        finally:
            with self._count_lock:
                self._waiting -= 1

    @property
    def others_waiting(self) -> bool:
        """Whether a call from another thread waits for the ranks (the engine then lets its pipeline drain)."""
        return self._waiting > 0

    def _lose(self, error: ReplicaError):
        """Mark the replica lost; a control stream may be mid-message, so none is reused."""
        self.alive = False
        for link in self._links:
            link.close()
        raise error

    def _control_send(self, message: list, method: str) -> float:
        """`message` to every rank over its control connection; the time it was sent."""
        if not self.alive:
            raise ReplicaError(f"replica {self.index} was lost earlier", self.index)
        for r, link in enumerate(self._links):
            try:
                link.send(message)
            except OSError as e:
                self._lose(ReplicaError(f"{self._describe(r)} could not be sent its {method} message (worker process "
                                        f"gone?): {e!r}", self.index, self.first_rank + r, self.workers[r]))
        return time.monotonic()

    def _control_collect(self, method: str, sent_at: float) -> list:
        """Every rank's answer to the oldest message not yet answered, in rank order (the ranks answer
        their messages in the order sent)."""
        if not self.alive:
            raise ReplicaError(f"replica {self.index} was lost earlier", self.index)
        timeout = settings.get("step-timeout")
        deadline = sent_at + timeout
        results, first_error, raised = [None] * len(self._links), None, []

        def fail(r, what):
            nonlocal first_error
            first_error = first_error or ReplicaError(f"{self._describe(r)} {what}", self.index,
                                                      self.first_rank + r, self.workers[r])
        for r, link in enumerate(self._links):
            try:
                reply = link.recv(deadline - time.monotonic())
            except TimeoutError:
                fail(r, f"did not answer within {timeout:.0f} s in {method} (frozen or overloaded worker?)")
                deadline = time.monotonic()      # no point waiting the full timeout again per rank
                continue
            except (OSError, EOFError) as e:
                fail(r, f"failed in {method}: its control connection closed (worker process gone?): {e!r}")
                deadline = time.monotonic()
                continue
            if reply[0] == "ok":
                results[r] = reply[1:]
            elif len(reply) > 3 and not reply[3]:     # the method raised, its rank is fine
                raised.append((r, f"failed in {method}: {reply[1]}: {reply[2]}"))
            else:
                fail(r, f"failed in {method}: {reply[1]}: {reply[2]}{peer_hint(reply[4:], self.workers)}")
        if first_error is None and raised and len(raised) == len(self._links):
            # Every rank raised and answered once: the links and ranks are still in step.
            r, what = raised[0]
            raise RankCallError(f"{self._describe(r)} {what}", self.index, self.first_rank + r, self.workers[r])
        if first_error is None and raised:
            fail(*raised[0])                     # some ranks raised, others stepped: they may differ now
        if first_error is not None:
            self._lose(first_error)
        return results

    @_ordered
    def step(self, work: list, release=()) -> dict:
        """Free the caches of `release`, then run one step; {seq: next token}."""
        if self._links:
            message = ["step", [work_to_wire(w) for w in work], list(release)]
            answers = self._control_collect("step", self._control_send(message, "step"))
        else:
            answers = self._call("step", work, list(release))
        return self._tokens(answers)

    def _tokens(self, answers: list) -> dict:
        self.last_compute = max(seconds for _, seconds in answers)
        return answers[self.mesh.sampling_rank][0]

    # -- pipelined steps: several in flight, answered in order ---------------------------

    @property
    def sends_ahead(self) -> bool:
        """Whether steps can be sent now and answered later (submit_step, finish_step), runs of decode
        steps included: over the control connections, not actor calls."""
        return bool(self._links)

    @property
    def pipeline_depth(self) -> int:
        """How many steps the driver keeps in flight: one per pipeline stage, so that every stage has
        a micro-batch to run (over the control connections; the actor path steps one at a time)."""
        return self.mesh.pp if self._links else 1

    def submit_step(self, work: list, release=(), steps: int = 1, stop_ids=()):
        """Send a step to every rank without waiting for it; finish_step() returns the answers of the
        oldest step in flight. From the first submit until the last answer the order lock is held, so
        no other driver call gets between pipelined steps (the engine drains when others_waiting).

        steps > 1: a run of that many decode steps in one message (RankActor._decode_run): the ranks
        feed each sequence the token they just chose, so the driver is not on the path between
        steps; finish_step() then returns each step's answers in turn. stop_ids: each work item's
        eos ids, which end its sequence early. Every rank must sample (pp=1)."""
        if not self._links:
            raise RuntimeError("pipelined steps need the control connections (daskllm.control='direct')")
        if steps > 1 and self.mesh.pp > 1:
            raise ValueError(f"a run of decode steps needs every rank to sample; this replica has pp={self.mesh.pp}")
        if not self._in_flight:
            self._take_order()
        try:
            wire = [work_to_wire(w) for w in work]
            message = ["step", wire, list(release)] if steps == 1 else \
                ["steps", wire, list(release), steps, [list(ids) for ids in stop_ids]]
            sent_at, run = self._control_send(message, "step"), object()
            # A run's later steps wait from when the one before was answered (sent_at None).
            self._in_flight.extend((sent_at if i == 0 else None, run) for i in range(steps))
        except BaseException:
            if not self.alive:                   # lost: what is in flight will never be answered
                self._in_flight.clear()
            if not self._in_flight:
                self._order.release()
            raise

    def finish_step(self) -> dict:
        """{seq: next token} of the oldest step in flight (raises what step() would)."""
        sent_at, run = self._in_flight[0]
        try:
            return self._tokens(self._control_collect("step", time.monotonic() if sent_at is None else sent_at))
        except Exception:                        # the ranks end a run at its first error: drop its later
            self._in_flight[1:] = [entry for entry in self._in_flight[1:] if entry[1] is not run]   # steps,
            raise                                # as the engine does (a lost replica clears them all below)
        finally:
            self._in_flight.pop(0)
            if not self.alive:                   # lost: the later steps will never be answered
                self._in_flight.clear()
            if not self._in_flight:
                self._order.release()

    @_ordered
    def logits(self, sequences: list) -> list:
        return self._call("logits", sequences)[self.mesh.sampling_rank]

    @_ordered
    def release(self, seq_ids: list):
        self._call("release", list(seq_ids))

    @_ordered
    def stats(self) -> list:
        return self._call("stats", timeout=settings.get("connect-timeout"))

    def stats_futures(self, **kwargs) -> list:
        """One stats call per rank, not awaited: for readers that must never mark the replica lost
        when a rank is slow to answer (the dashboard's publisher)."""
        return [actor.stats(**kwargs) for actor in self._actors]

    @_ordered
    def reset_stats(self):
        self._call("reset_stats", timeout=settings.get("connect-timeout"))

    def close(self):
        """Close connections and release the actors (best effort: some ranks may be gone)."""
        ordered = self._order.acquire(timeout=settings.get("step-timeout"))   # after a call in flight
        try:
            if self._actors and self.alive:
                try:
                    self._call("close", timeout=10)
                except Exception:   # noqa: BLE001 - closing a broken replica must not raise
                    pass
            self.alive = False
            for link in self._links:
                link.close()
            self._links = []
            if self._quiet is not None:
                self._quiet.restore()
            futures, self._futures, self._actors = self._futures, [], []
            if futures:
                # Cancel, not just release: each actor call leaves a reference cycle inside
                # distributed that holds the actor's future until a garbage collection.
                try:
                    self.client.cancel(futures)
                except Exception:   # noqa: BLE001 - a closed client has let go of them already
                    pass
                for f in futures:
                    f.release()
                self._wait_forgotten({f.key for f in futures})
        finally:
            if ordered:
                self._order.release()

    def _wait_forgotten(self, keys: set, timeout: float = 5.0):
        """Until the scheduler no longer lists the rank actors' keys on any worker (at most `timeout`):
        placement counts the ranks on each worker from that list, so an LLM started right after
        this one closed must not see its ranks still there."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                held = {k for ks in self.client.has_what().values() for k in ks}
            except Exception:   # noqa: BLE001 - a closed client or scheduler: nothing left to count
                return
            if not keys & held:
                return
            time.sleep(0.05)
