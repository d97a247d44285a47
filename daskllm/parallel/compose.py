"""The one place where the plans and seams of several axes meet.

Each strategy module (tensor, sequence, expert) offers the same three functions:
  check(cfg, mesh, options)              refuse what cannot work, naming both numbers
  plan(cfg, mesh) -> {name: spec}        the tensors whose placement it changes
  seams(cfg, mesh, coords, comms, seams, options) -> Seams   its collectives added to `seams`
`options` carries strategy settings chosen by the user (e.g. {"sp_variant": "ring"}).
Composition is in a fixed order: tensor, then sequence, then expert; each later plan
overrides the specs of the tensors it owns (the expert tensors, for ep). Pipeline comes last:
its plan(cfg, mesh, plan) places every spec chosen so far on the stages holding its tensor.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..io.names import expected_shapes
from ..model.config import ModelConfig
from ..model.seams import LOCAL, Seams
from .mesh import Mesh, MeshError
from .plan import Split, Staged, replicated_plan

STRATEGY_MODULES = {"tp": "tensor", "sp": "sequence", "ep": "expert", "pp": "pipeline"}


def _strategy(axis: str):
    name = STRATEGY_MODULES[axis]
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}.{name}":
            raise
        raise MeshError(f"{axis} > 1 ({name} parallelism) is not yet supported in this version") from None


def active_axes(mesh: Mesh) -> list:
    return [axis for axis in STRATEGY_MODULES if getattr(mesh, axis) > 1]


def check(cfg: ModelConfig, mesh: Mesh, options: dict | None = None):
    """Everything that can be checked before any worker is touched."""
    for axis in active_axes(mesh):
        _strategy(axis).check(cfg, mesh, options or {})


def full_plan(cfg: ModelConfig, mesh: Mesh, options: dict | None = None) -> dict:
    """{our tensor name: spec} for the whole model on this mesh (printable, drawable).

    int8 weights (options["dtype"] "int8", or "int8" in options["dtypes"]) make tensor-parallel
    cuts respect int8 blocks (parallel.tensor.split_unit).
    """
    plan = replicated_plan(expected_shapes(cfg))
    for axis in active_axes(mesh):
        module = _strategy(axis)
        if axis == "pp":
            plan = module.plan(cfg, mesh, plan)
        else:
            plan.update(module.plan(cfg, mesh, options) if axis == "tp" else module.plan(cfg, mesh))
    return plan


@dataclass
class RankSetup:
    """What one rank needs to build its runner."""
    coords: dict
    plan: dict
    seams: Seams
    vocab_start: int          # global id of the first vocabulary row this rank holds
    tp_comm: object           # joins the vocabulary slices, or None


def rank_setup(cfg: ModelConfig, mesh: Mesh, rank: int, comms: dict, options: dict | None = None) -> RankSetup:
    """Plan slice, seams and sampling communicator of global `rank`; comms: {axis: Communicator}."""
    coords = mesh.coords(rank)
    plan = full_plan(cfg, mesh, options)
    seams = LOCAL
    for axis in active_axes(mesh):
        seams = _strategy(axis).seams(cfg, mesh, coords, comms, seams, options or {})
    embed_spec = plan["embed"].inner if isinstance(plan["embed"], Staged) else plan["embed"]
    vocab_start = embed_spec.bounds(coords[embed_spec.axis])[0] if isinstance(embed_spec, Split) else 0
    tp_comm = comms.get("tp") if mesh.tp > 1 else None
    return RankSetup(coords, plan, seams, vocab_start, tp_comm)


def axis_communicators(transport, mesh: Mesh, rank: int, timeout: float) -> dict:
    """{axis: Communicator} of global `rank` over a transport reaching its replica's ranks.

    A pair of ranks shares at most one group per axis, so the axis name is a sufficient tag.
    """
    from ..comm.collectives import GroupCommunicator
    return {axis: GroupCommunicator(transport, mesh.group(rank, axis), tag=axis, default_timeout=timeout)
            for axis in ("tp", "sp", "ep", "pp", "replica")}


def describe(cfg: ModelConfig, mesh: Mesh, options: dict | None = None) -> tuple:
    """(text, specs): the plan of every tensor, one line each (parallel.plan.format_plan), after
    the heads of each tp rank and the layers of each pipeline stage where those axes are used."""
    from .plan import format_plan
    specs = full_plan(cfg, mesh, options)
    text = format_plan(specs, (options or {}).get("dtypes"))
    if mesh.tp > 1:
        from .tensor import describe_heads
        text = describe_heads(cfg, mesh.tp) + "\n" + text
    if mesh.pp > 1:
        from .pipeline import describe_stages
        text = describe_stages(cfg, mesh.pp) + "\n" + text
    return text, specs
