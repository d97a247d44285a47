"""Replica: the driver's handle on the tp x sp rank actors of one model replica.

Start-up places one actor per worker, hands out listening addresses so the ranks connect
to each other directly, loads the shards, and opens one control connection from the
driver to each rank. A step is then one msgpack message per rank over those connections
(a socket round trip, not a Dask actor call); everything else (stats, logits, close) is
one actor call per rank. Calls are sent to all ranks at once and awaited with a timeout;
a failure names the rank and its worker. Calls that touch the ranks' models are made one
at a time, so every rank sees them in the same order.
"""
from __future__ import annotations

import threading
import time

from ..comm.base import CommError
from ..comm.control import ControlLink
from ..parallel.mesh import Mesh
from . import settings
from .placement import peer_hint
from .rank import RankActor
from .wire import work_to_wire


class ReplicaError(RuntimeError):
    """A rank of a replica failed or did not answer in time."""

    def __init__(self, message, replica=None, rank=None, worker=None):
        super().__init__(message)
        self.replica, self.rank, self.worker = replica, rank, worker


class Replica:
    """Ranks [first_rank, first_rank + tp*sp) of `mesh`, on `workers` (one per rank)."""

    def __init__(self, client, index: int, workers: list, mesh: Mesh, path: str, options: dict,
                 on_rank_loaded=None, ship_from=None):
        self.client, self.index, self.workers, self.mesh = client, index, list(workers), mesh
        self.options = options
        self.first_rank = index * mesh.replica_size
        self.alive = True
        self._actors = []
        self._links = []                 # control connections, rank order (empty: steps are actor calls)
        self._model_lock = threading.Lock()
        self.last_compute = 0.0          # the slowest rank's compute seconds in the last step
        mesh_tuple = (mesh.dp, mesh.tp, mesh.sp, mesh.ep)
        control = settings.get("control")
        if control not in ("direct", "actor"):       # before any worker is touched
            raise ValueError(f"daskllm.control must be 'direct' or 'actor', got {control!r}")
        try:
            futures = [client.submit(RankActor, r, mesh_tuple, options, settings.get("comm-timeout"),
                                     actor=True, workers=[w], allow_other_workers=False, pure=False,
                                     key=f"daskllm-rank-{self.first_rank + r}-{time.time_ns()}")
                       for r, w in enumerate(self.workers)]
            self._futures = futures
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
        replica_mesh = Mesh(1, self.mesh.tp, self.mesh.sp, self.mesh.ep)
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
        results, first_error = [], None
        for r, fut in enumerate(pending):
            try:
                results.append(fut.result(timeout=max(0.0, deadline - time.monotonic())))
                if each is not None:
                    each(results[-1])
            except Exception as e:   # noqa: BLE001 - every failure is reported with its rank
                results.append(None)
                if isinstance(e, TimeoutError) and not isinstance(e, CommError):
                    what = f"did not answer within {timeout:.0f} s in {method} (frozen or overloaded worker?)"
                else:
                    what = f"failed in {method}: {type(e).__name__}: {e}{peer_hint(e, self.workers)}"
                error = ReplicaError(f"{self._describe(r)} {what}", self.index, self.first_rank + r, self.workers[r])
                first_error = first_error or error
                if isinstance(e, TimeoutError):
                    deadline = time.monotonic()      # no point waiting the full timeout again per rank
        if first_error is not None:
            self.alive = False
            raise first_error
        return results

    def _control_call(self, message: list, method: str) -> list:
        """`message` to every rank over its control connection; their answers in rank order."""
        if not self.alive:
            raise ReplicaError(f"replica {self.index} was lost earlier", self.index)
        timeout = settings.get("step-timeout")
        deadline = time.monotonic() + timeout
        results, first_error = [None] * len(self._links), None

        def fail(r, what):
            nonlocal first_error
            first_error = first_error or ReplicaError(f"{self._describe(r)} {what}", self.index,
                                                      self.first_rank + r, self.workers[r])
        for r, link in enumerate(self._links):
            try:
                link.send(message)
            except OSError as e:
                fail(r, f"could not be sent its {method} message (worker process gone?): {e!r}")
        for r, link in enumerate(self._links):
            if first_error is not None and first_error.rank == self.first_rank + r:
                continue
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
            else:
                fail(r, f"failed in {method}: {reply[1]}: {reply[2]}")
        if first_error is not None:
            self.alive = False
            for link in self._links:             # a stream may be mid-message: never reuse it
                link.close()
            raise first_error
        return results

    def step(self, work: list, release=()) -> dict:
        """Free the caches of `release`, then run one step; {seq: next token}."""
        with self._model_lock:
            if self._links:
                answers = self._control_call(["step", [work_to_wire(w) for w in work], list(release)], "step")
            else:
                answers = self._call("step", work, list(release))
        self.last_compute = max(seconds for _, seconds in answers)
        return answers[0][0]

    def logits(self, sequences: list) -> list:
        with self._model_lock:
            return self._call("logits", sequences)[0]

    def release(self, seq_ids: list):
        with self._model_lock:
            self._call("release", list(seq_ids))

    def stats(self) -> list:
        return self._call("stats", timeout=settings.get("connect-timeout"))

    def stats_futures(self, **kwargs) -> list:
        """One stats call per rank, not awaited: for readers that must never mark the replica lost
        when a rank is slow to answer (the dashboard's publisher)."""
        return [actor.stats(**kwargs) for actor in self._actors]

    def reset_stats(self):
        self._call("reset_stats", timeout=settings.get("connect-timeout"))

    def close(self):
        """Close connections and release the actors (best effort: some ranks may be gone)."""
        if self._actors and self.alive:
            try:
                self._call("close", timeout=10)
            except Exception:   # noqa: BLE001 - closing a broken replica must not raise
                pass
        self.alive = False
        for link in self._links:
            link.close()
        self._links = []
        for f in getattr(self, "_futures", []):
            f.release()
        self._actors = []
        self._futures = []
