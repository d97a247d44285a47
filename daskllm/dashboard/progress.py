"""Progress bars where a wait is long: ranks reading their shards, and long prefills.

tqdm draws them: a text bar in a terminal and in Jupyter (a widget there when ipywidgets is
installed). A bar appears only after `DELAY` seconds, so quick waits print nothing, and only
where a person watches (a terminal or a Jupyter kernel).
"""
from __future__ import annotations

import sys
import threading
import time

DELAY = 0.5          # s before a bar appears


def interactive() -> bool:
    """A person is watching: stderr is a terminal, or we run inside a Jupyter kernel."""
    if "ipykernel" in sys.modules:
        try:
            from IPython import get_ipython
            if get_ipython() is not None and hasattr(get_ipython(), "kernel"):
                return True
        except ImportError:
            pass
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


class LazyBar:
    """A bar that exists only once `DELAY` seconds have passed: a quick wait writes nothing at all
    (a tqdm bar that never showed still writes a blank line when closed, in Jupyter too)."""

    def __init__(self, **kwargs):
        self.kwargs, self.start, self.bar = kwargs, time.monotonic(), None

    def update_to(self, n, postfix: str | None = None):
        if self.bar is None and time.monotonic() - self.start < DELAY:
            return
        if self.bar is None:
            self.bar = bar(**self.kwargs)
        if postfix is not None:
            self.bar.set_postfix_str(postfix, refresh=False)
        self.bar.update(n - self.bar.n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def bar(**kwargs):
    """A tqdm bar: the notebook widget in Jupyter with ipywidgets, else text on stderr."""
    if "ipykernel" in sys.modules:
        try:
            import ipywidgets  # noqa: F401 - tqdm.notebook needs it
            from tqdm.notebook import tqdm
            return tqdm(**kwargs)
        except ImportError:
            pass
    from tqdm import tqdm
    return tqdm(file=sys.stderr, **kwargs)


class LoadProgress:
    """Bytes of the checkpoint read so far, all ranks together, with each rank's share after it.

    totals: {worker: stored bytes its rank reads}. Ranks report on Dask event `topic`
    (runtime.load_report.ReportedReads); `rank_loaded` counts ranks whose load returned.
    """

    def __init__(self, client, topic: str, totals: dict, ranks: dict):
        self.client, self.topic, self.totals, self.ranks = client, topic, totals, ranks
        self.read = dict.fromkeys(totals, 0)
        self.loaded = 0
        self._lock = threading.Lock()
        self.bar = LazyBar(total=sum(totals.values()), unit="B", unit_scale=True, unit_divisor=1024,
                           desc=f"loading {len(totals)} rank(s)", leave=False)
        client.subscribe_topic(topic, self._on_event)

    def _on_event(self, event):
        _, msg = event
        worker = msg.get("worker")
        if worker in self.read:
            self._update(worker, self.totals[worker] if msg.get("done") else msg["bytes"])

    def _update(self, worker, read):
        with self._lock:
            self.read[worker] = max(self.read[worker], min(read, self.totals[worker]))
            self.bar.update_to(sum(self.read.values()), " ".join(
                f"r{self.ranks[w]} {100 * self.read[w] // max(1, self.totals[w])}%" for w in self.totals))

    def rank_loaded(self):
        with self._lock:
            self.loaded += 1

    def close(self, wait: float = 2.0):
        """Wait (at most `wait` s) for the ranks' last reports, which may trail their load calls."""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(self.read[w] < self.totals[w] for w in self.totals):
            time.sleep(0.02)
        try:
            self.client.unsubscribe_topic(self.topic)
        finally:
            self.bar.close()


def wait_prefill(engines: dict, requests: list, poll: float = 0.1):
    """Show the prompt tokens prefilled so far until every request has its first token.

    engines: {replica index: ReplicaEngine}. Returns at once for prompts that fit one step.
    """
    total = sum(len(r.prompt) for r in requests)
    b = LazyBar(total=total, unit="tok", desc="prefill", leave=False)
    try:
        while True:
            done = 0
            for r in requests:
                engine = engines.get(r.replica)
                done += len(r.prompt) if r.generated or r.finished else \
                    min(len(r.prompt), engine.prefilled(r) if engine else 0)
            b.update_to(done)
            if done >= total:
                return
            time.sleep(poll)
    finally:
        b.close()


def load_progress(llm, placement: list):
    """A LoadProgress for `llm`'s ranks about to load (placement: workers per replica), after
    asking the ranks to report their reads; None where nobody watches or weights are shipped."""
    if llm.ship_weights or not interactive():
        return None
    import secrets

    from ..parallel import compose
    from ..parallel.plan import rank_slices
    from ..runtime.load_report import slice_bytes
    ckpt, mesh = llm.checkpoint, llm.mesh
    replica_mesh = mesh.replica()
    plan = compose.full_plan(llm.config, replica_mesh)
    shapes = {name: ckpt.shape(name) for name in plan}
    per_local = [sum(slice_bytes(ckpt, n, i) for n, i in rank_slices(plan, shapes, replica_mesh.coords(r)).items())
                 for r in range(mesh.replica_size)]
    totals = {w: per_local[r] for ws in placement for r, w in enumerate(ws)}
    ranks = {w: d * mesh.replica_size + r for d, ws in enumerate(placement) for r, w in enumerate(ws)}
    topic = f"daskllm-load-{secrets.token_hex(4)}"
    llm.options["load_topic"] = topic
    return LoadProgress(llm.client, topic, totals, ranks)
