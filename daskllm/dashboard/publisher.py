"""Publisher: a client-side daemon thread that sends one LLM's statistics to the daskllm page.

Every `interval` seconds it reads the engines' counters (client side) and the ranks' last
answered stats call, and hands the snapshot to the scheduler plugin (plugin.py) through a
scheduler handler. Its work per turn is bounded: at most one stats call per rank is in
flight (a rank busy with a long prefill answers later; the page shows its last answer), and
every wait has a timeout. It never drives the engines or the ranks' steps.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time

logger = logging.getLogger("daskllm.dashboard")


class Publisher:
    """Publishes snapshots of `llm` under `name` until `stop()`."""

    def __init__(self, llm, name: str, interval: float = 1.0):
        self.llm, self.name, self.interval = llm, name, interval
        self.failures = 0                    # publishes that did not reach the scheduler
        self._pending = {}                   # replica index -> [ActorFuture] of unanswered stats calls
        self._ranks = {}                     # global rank -> its last answered stats
        self._lock = threading.Lock()        # publish() from the thread and from publish_now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"daskllm-dashboard-{name}", daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self.interval):
            try:
                self.publish(wait=self.interval / 2)
            except Exception as e:   # noqa: BLE001 - the dashboard must never take the LLM down
                self.failures += 1
                logger.debug("daskllm dashboard: publishing %s failed: %s", self.name, e)

    def publish(self, wait: float = 2.0):
        """Collect and send one snapshot (waiting at most `wait` s for the ranks' stats)."""
        with self._lock:
            snap = self.snapshot(wait)
            self.llm.client.sync(self.llm.client.scheduler.daskllm_publish, name=self.name, snapshot=snap,
                                 callback_timeout=10)

    def stop(self):
        """Stop the thread and tell the page this LLM is closed (best effort, bounded)."""
        self._stop.set()
        self._thread.join(timeout=10)
        try:
            with self._lock:
                snap = self.snapshot(wait=0, ask=False)     # the ranks are about to close: no new calls
                snap["closed"] = True
                self.llm.client.sync(self.llm.client.scheduler.daskllm_publish, name=self.name, snapshot=snap,
                                     callback_timeout=5)
        except Exception as e:   # noqa: BLE001 - closing must not fail because the page is gone
            logger.debug("daskllm dashboard: final publish of %s failed: %s", self.name, e)

    # -- the snapshot --------------------------------------------------------------------

    def snapshot(self, wait: float, ask: bool = True) -> dict:
        """Plain data (msgpack and JSON safe) describing the LLM now (`ask`: start new stats calls)."""
        llm = self.llm
        engines = list(llm.router.alive())
        self._collect(engines, wait, ask)
        ranks = []
        for e in engines:
            rep = e.replica
            for r, worker in enumerate(rep.workers):
                g = rep.first_rank + r
                ranks.append(rank_row(g, rep.index, llm.mesh.coords(g), worker, llm.options.get("device", "cpu"),
                                      self._ranks.get(g)))
        return {"name": self.name, "model": llm.path, "time": time.time(), "device": llm.options.get("device", "cpu"),
                "mesh": {"dp": llm.mesh.dp, "tp": llm.mesh.tp, "sp": llm.mesh.sp, "ep": llm.mesh.ep},
                "engines": [e.snapshot() for e in engines], "ranks": ranks,
                "expert_load": expert_heatmap(llm.mesh, ranks, [self._ranks.get(r["rank"]) for r in ranks])}

    def _collect(self, engines, wait: float, ask: bool):
        """Start a stats call on every rank with none in flight; keep the answers that arrive in time."""
        deadline = time.monotonic() + wait
        for e in engines:
            if ask and e.index not in self._pending:
                self._pending[e.index] = e.replica.stats_futures(history=False)
        for e in engines:
            futures = self._pending.get(e.index)
            if futures is None:
                continue
            try:
                answers = [f.result(timeout=max(0.0, deadline - time.monotonic())) if not f.done() else f.result()
                           for f in futures]
            except (TimeoutError, asyncio.TimeoutError):   # the same class from Python 3.11
                continue                    # still busy: ask again once these have answered
            except Exception as err:   # noqa: BLE001 - a lost rank: the engine will notice; drop the call
                logger.debug("daskllm dashboard: stats of replica %s failed: %s", e.index, err)
                del self._pending[e.index]
                continue
            del self._pending[e.index]
            for r, stats in enumerate(answers):
                self._ranks[e.replica.first_rank + r] = stats
        alive = {e.index for e in engines}
        for index in [i for i in self._pending if i not in alive]:
            del self._pending[index]


def rank_row(rank: int, replica: int, coords: dict, worker: str, device: str, stats: dict | None) -> dict:
    """One rank's line of the snapshot, from its last stats answer (zeros before the first)."""
    stats = stats or {}
    memory = stats.get("memory", {})
    comm = {f"{axis}.{op}": s for axis, ops in stats.get("comm", {}).items() for op, s in ops.items()}
    host = worker.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return {"rank": rank, "replica": replica, "coords": {a: coords[a] for a in ("tp", "sp", "ep")},
            "worker": worker, "host": host, "device": device,
            "weights_bytes": memory.get("weights_bytes", 0), "cache_bytes": memory.get("cache_bytes", 0),
            "live_sequences": memory.get("live_sequences", 0),
            "steps": stats.get("steps", 0), "step_seconds": stats.get("compute_seconds", 0.0),
            "collective_seconds": sum(s["seconds"] for s in comm.values()), "comm": comm}


def expert_heatmap(mesh, ranks: list, stats: list) -> dict | None:
    """Tokens routed to each expert of each MoE layer, summed over the cluster: {layers, total (L, E)}.

    Each rank counts what its router saw: every token of its replica with tp or ep alone, its
    own tokens with sp. So the replica's load is the sum over the sp ranks of tensor index 0.
    """
    loads = [(row, s["expert_load"]) for row, s in zip(ranks, stats) if s and s.get("expert_load")]
    if not loads:
        return None
    layers = sorted({layer for _, load in loads for layer in load["layers"]})
    n_experts = max(load["n_experts"] for _, load in loads)
    total = [[0] * n_experts for _ in layers]
    seen = set()
    for row, load in loads:
        key = (row["replica"], row["coords"]["sp"])
        if row["coords"]["tp"] != 0 or key in seen:
            continue
        seen.add(key)
        for layer, counts in zip(load["layers"], load["total"]):
            line = total[layers.index(layer)]
            for e, c in enumerate(counts):
                line[e] += c
    return {"layers": layers, "total": total}
