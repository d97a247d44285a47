"""Build one rank's ModelRunner from a checkpoint, its plan, its seams and its communicators."""
from __future__ import annotations

import numpy as np

from ..io.loader import read_weights, structure
from ..model.forward import Transformer
from ..model.runner import ModelRunner
from ..model.seams import LOCAL
from .plan import rank_slices


def build_runner(checkpoint, plan, coords=None, seams=LOCAL, tp_comm=None, vocab_start=0,
                 xp=np, dtype=np.float32, cache_budget_bytes=None, moe_stats=None):
    """Read this rank's slices (and nothing else) and wrap them in a runner."""
    cfg = checkpoint.config
    shapes = {name: checkpoint.shape(name) for name in plan}
    slices = rank_slices(plan, shapes, coords or {})
    flat = read_weights(checkpoint, slices, xp=xp, dtype=dtype)
    weights = structure(flat, cfg.n_layers, cfg.tie_embeddings, vocab_start)
    model = Transformer(cfg, weights, seams, moe_stats=moe_stats)
    return ModelRunner(model, tp_comm=tp_comm, cache_budget_bytes=cache_budget_bytes)


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
