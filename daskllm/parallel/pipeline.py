"""Pipeline parallelism: the layers cut into pp contiguous stages, activations handed on.

Stage p holds layers [lo_p, hi_p); the embedding sits on the first stage, the final norm and
the LM head on the last (a tied LM head is the embedding table, so with tied embeddings both
end stages hold it). The cut balances the weight bytes each stage reads per step, which is what
sets a step's time on a CPU: all of its layers', plus the LM head's on the last stage; the
embedding costs the first stage one row per token, nothing beside a layer. (SmolLM2's LM head
weighs eight of its 30 layers: this cut gives pp=2 19 + 11 layers where balancing the bytes
held gave 15 + 15; benchmarks/README.md, pipeline.)

In a step every stage runs the same batch: the first embeds its tokens, each stage runs its
layers, and a stage before the last sends its hidden states (N, D) to the rank at its own
place in the next stage, which receives them instead of embedding. Only the last stage
samples. Stages overlap across steps, not inside one: the driver keeps several steps (micro-
batches of the running sequences) in flight, so while stage 1 runs one micro-batch, stage 0
runs the next (engine.scheduler).
"""
from __future__ import annotations

import re

from ..io.names import expected_shapes
from ..model.config import ModelConfig
from .mesh import Mesh, MeshError
from .plan import Staged

_LAYER = re.compile(r"layers\.(\d+)\.")


def check(cfg: ModelConfig, mesh: Mesh, options: dict):
    if mesh.pp > cfg.n_layers:
        raise MeshError(f"pp ({mesh.pp}) must be at most the model's {cfg.n_layers} layers: "
                        "each pipeline stage holds at least one whole layer")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def stage_bounds(cfg: ModelConfig, pp: int) -> list:
    """[(first layer, end layer)] of each stage: contiguous runs that keep the largest stage's weight
    elements read per step (its layers, plus the LM head on the last) smallest."""
    shapes = expected_shapes(cfg)
    per_layer = [0] * cfg.n_layers
    for name, shape in shapes.items():
        m = _LAYER.match(name)
        if m:
            per_layer[int(m.group(1))] += _numel(shape)
    head = _numel(shapes["embed"])                  # the LM head has the embedding's shape, tied or not
    n = cfg.n_layers
    prefix = [0]
    for size in per_layer:
        prefix.append(prefix[-1] + size)

    def cost(p, lo, hi):                            # elements stage p reads per step with layers [lo, hi)
        return prefix[hi] - prefix[lo] + head * (p == pp - 1)

    # best[p][i]: the smallest largest stage when stages 0..p-1 hold layers [0, i); cut[p][i] its last cut
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(pp + 1)]
    cut = [[0] * (n + 1) for _ in range(pp + 1)]
    best[0][0] = 0
    for p in range(1, pp + 1):
        for i in range(p, n - (pp - p) + 1):        # every stage keeps at least one layer
            for j in range(p - 1, i):
                worst = max(best[p - 1][j], cost(p - 1, j, i))
                if worst < best[p][i]:
                    best[p][i], cut[p][i] = worst, j
    bounds, i = [], n
    for p in range(pp, 0, -1):
        bounds.append((cut[p][i], i))
        i = cut[p][i]
    return bounds[::-1]


def stage_of_layer(bounds: list) -> dict:
    return {layer: p for p, (lo, hi) in enumerate(bounds) for layer in range(lo, hi)}


def plan(cfg: ModelConfig, mesh: Mesh, inner: dict) -> dict:
    """Every spec of `inner` (what the other axes chose) placed on the stages that hold its tensor."""
    stage = stage_of_layer(stage_bounds(cfg, mesh.pp))
    last = mesh.pp - 1
    ends = {"embed": (0, last) if cfg.tie_embeddings else (0,), "norm": (last,), "lm_head": (last,)}
    out = {}
    for name, spec in inner.items():
        m = _LAYER.match(name)
        out[name] = Staged((stage[int(m.group(1))],) if m else ends[name], spec)
    return out


def describe_stages(cfg: ModelConfig, pp: int) -> str:
    """One line per stage: its layers, and what else it holds (for plan())."""
    bounds = stage_bounds(cfg, pp)
    lines = []
    for p, (lo, hi) in enumerate(bounds):
        extra = (["embedding"] if p == 0 else []) + (["final norm", "LM head"] if p == pp - 1 else [])
        extra_text = f" + {', '.join(extra)}" if extra else ""
        lines.append(f"stage {p}: layers {lo}-{hi - 1} ({hi - lo} of {cfg.n_layers}){extra_text}")
    return "\n".join(lines)


def seams(cfg: ModelConfig, mesh: Mesh, coords: dict, comms: dict, seams, options: dict):
    """A stage after the first receives its input from the previous one instead of embedding; a stage
    before the last sends its output on and ends the step there."""
    stage, comm = coords["pp"], comms["pp"]
    slots = {}
    if stage > 0:
        slots["stage_input"] = lambda embed, like: comm.recv(src=stage - 1, like=like)
    if stage < mesh.pp - 1:
        def stage_output(x):
            comm.send(x, dst=stage + 1)
            return None
        slots["stage_output"] = stage_output
    return seams.with_(**slots)
