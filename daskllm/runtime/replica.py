"""Replica: the driver's handle on the tp x sp rank actors of one model replica.

Start-up places one actor per worker, hands out listening addresses so the ranks connect
to each other directly, and loads the shards. After that every driver call is one actor
call per rank, all sent at once, each awaited with a timeout; a failure names the rank
and its worker.
"""
from __future__ import annotations

import time

from ..comm.base import CommError
from ..parallel.mesh import Mesh
from . import settings
from .placement import peer_hint
from .rank import RankActor


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
        self.first_rank = index * mesh.replica_size
        self.alive = True
        self._actors = []
        mesh_tuple = (mesh.dp, mesh.tp, mesh.sp, mesh.ep)
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
        plan = compose.full_plan(cfg, replica_mesh)
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

    def step(self, work: list, release=()) -> dict:
        """Free the caches of `release`, then run one step; {seq: next token}."""
        return self._call("step", work, list(release))[0]

    def logits(self, sequences: list) -> list:
        return self._call("logits", sequences)[0]

    def release(self, seq_ids: list):
        self._call("release", list(seq_ids))

    def stats(self) -> list:
        return self._call("stats", timeout=settings.get("connect-timeout"))

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
        for f in getattr(self, "_futures", []):
            f.release()
        self._actors = []
        self._futures = []
