"""Run one replica of a mesh inside this process, one thread per rank (tests, notebooks).

The ranks are built exactly as on a cluster (same plan, seams and runner); only the
transport differs: in-process queues instead of TCP between workers.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from ..comm.threads import ThreadHub
from ..model.runner import Work
from ..model.sampling import SamplingParams
from ..io.loader import resolve_dtype
from .build import build_runner
from .compose import axis_communicators, check, rank_setup
from .mesh import Mesh


class InProcessReplica:
    """The pp x tp x sp ranks of one replica, in threads.

    Example
    -------
    >>> from daskllm.io.checkpoint import Checkpoint                       # doctest: +SKIP
    >>> rep = InProcessReplica(Checkpoint("tests/fixtures/golden/llama"), Mesh(tp=2))  # doctest: +SKIP
    >>> rep.logits([[1, 2, 3]])[0].shape                                    # doctest: +SKIP
    (3, 384)
    """

    def __init__(self, checkpoint, mesh: Mesh, timeout: float = 30.0, options: dict | None = None, xp=None):
        if mesh.dp != 1:
            raise ValueError(f"InProcessReplica runs one replica; got dp={mesh.dp}")
        if (options or {}).get("dtype", "float32") == "auto" and "dtypes" not in options:
            options = {**options, "dtypes": resolve_dtype(checkpoint, "auto")}    # what "auto" means here
        check(checkpoint.config, mesh, options)
        self.mesh, self.timeout = mesh, timeout
        self.size = mesh.replica_size
        hub = ThreadHub(self.size)
        self.comms = [axis_communicators(hub.transport(r), mesh, r, timeout) for r in range(self.size)]
        self.pool = ThreadPoolExecutor(self.size, thread_name_prefix="rank")

        def build(r):
            setup = rank_setup(checkpoint.config, mesh, r, self.comms[r], options)
            return build_runner(checkpoint, setup.plan, setup.coords, setup.seams, setup.tp_comm,
                                setup.vocab_start, dtype=(options or {}).get("dtype", "float32"),
                                dtypes=(options or {}).get("dtypes"),
                                **({"xp": xp} if xp is not None else {}))
        self.runners = self._all(build)

    def _all(self, fn) -> list:
        """fn(rank) on every rank at once; the per-rank results, rank order."""
        futures = [self.pool.submit(fn, r) for r in range(self.size)]
        return [f.result(timeout=self.timeout) for f in futures]

    def logits(self, sequences) -> list:
        return self._all(lambda r: self.runners[r].full_logits(sequences))[self.mesh.sampling_rank]

    def step(self, work) -> dict:
        return self._all(lambda r: self.runners[r].step(work))[self.mesh.sampling_rank]

    def generate(self, prompts, max_new_tokens, params=SamplingParams()) -> list:
        """Token ids generated for each prompt (no eos stop): prefill all, then decode together."""
        out = [[] for _ in prompts]
        work = [Work(i, tuple(p), 0, True, params, 0) for i, p in enumerate(prompts)]
        for step in range(max_new_tokens):
            chosen = self.step(work)
            for i in range(len(prompts)):
                out[i].append(chosen[i])
            work = [Work(i, (chosen[i],), len(prompts[i]) + step, True, params, step + 1)
                    for i in range(len(prompts))]
        self._all(lambda r: self.runners[r].release(range(len(prompts))))
        return out

    def close(self):
        self.pool.shutdown(wait=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
