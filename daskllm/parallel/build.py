"""Build one rank's ModelRunner from a checkpoint, its plan, its seams and its communicators."""
from __future__ import annotations

import numpy as np

from ..io.loader import held_bytes, read_weights, structure
from ..model.forward import Transformer
from ..model.runner import ModelRunner
from ..model.seams import LOCAL
from .mesh import Mesh
from .plan import rank_slices


def build_runner(checkpoint, plan, coords=None, seams=LOCAL, tp_comm=None, vocab_start=0,
                 xp=np, dtype="float32", cache_budget_bytes=None, moe_stats=None, dtypes=None):
    """Read this rank's slices (and nothing else), held as `dtype` (kernels.DTYPES; `dtypes`: per
    tensor, as io.loader.resolve_dtype gives), in a runner."""
    cfg = checkpoint.config
    shapes = {name: checkpoint.shape(name) for name in plan}
    slices = rank_slices(plan, shapes, coords or {})
    flat = read_weights(checkpoint, slices, xp=xp, dtype=dtype, dtypes=dtypes)
    weights = structure(flat, cfg.n_layers, cfg.tie_embeddings, vocab_start)
    del flat
    release_free_memory()
    model = Transformer(cfg, weights, seams, moe_stats=moe_stats)
    return ModelRunner(model, tp_comm=tp_comm, cache_budget_bytes=cache_budget_bytes)


def release_free_memory():
    """Hand the heap's free pages back to the system (glibc), after the load's per-tensor temporaries.

    Without it a process outside a Dask worker kept about twice the weights resident after
    loading (glibc's dynamic mmap threshold keeps freed temporaries in the heap).
    """
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):      # not glibc: nothing to do
        pass


def rank_weight_bytes(checkpoint, mesh: Mesh, options: dict) -> list:
    """Weight bytes each rank of one replica will hold in options["dtype"] (per tensor: options["dtypes"]
    when resolved), from the headers alone."""
    from .compose import full_plan
    replica = mesh.replica()
    plan = full_plan(checkpoint.config, replica, options)
    shapes = {name: checkpoint.shape(name) for name in plan}
    dtype = options.get("dtype", "float32")
    return [held_bytes(checkpoint, rank_slices(plan, shapes, replica.coords(r)), dtype,
                       options.get("dtypes"))
            for r in range(replica.world_size)]


def check_weights_fit(rank_bytes: list, memory: list, dtype: str, int8_bytes: list | None = None):
    """Refuse, before any rank loads, a dtype whose weights exceed a rank's worker memory.

    rank_bytes[r] and memory[r] (0: unknown, not checked) for the ranks of one replica.
    """
    for r, (need, have) in enumerate(zip(rank_bytes, memory)):
        if have and need > have:
            hint = f" (int8 would need {int8_bytes[r] / 2**30:.2f} GiB)" if int8_bytes and dtype != "int8" else ""
            raise ValueError(
                f"dtype {dtype!r}: rank {r} of each replica would hold {need / 2**30:.2f} GiB of weights, but its "
                f"worker has a memory limit of {have / 2**30:.2f} GiB; use a smaller weight dtype{hint}, more "
                "tensor- or expert-parallel ranks, or workers with more memory")


def format_rank_bytes(rank_bytes: list, dtype: str) -> str:
    """One line per rank of a replica: the weight bytes it holds in `dtype`."""
    return "\n".join(f"rank {r}: {b / 2**20:.2f} MiB of weights ({dtype})" for r, b in enumerate(rank_bytes))


def array_module_for(device: str):
    """numpy for "cpu", cupy for "cuda" (the GPU extra), with a clear error if it is missing."""
    if device == "cpu":
        return np
    if device == "cuda":
        try:
            import cupy
        except ImportError as e:
            raise RuntimeError("device='cuda' needs CuPy on the workers: pip install 'daskllm[gpu]'") from e
        return cupy
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
