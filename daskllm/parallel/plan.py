"""A sharding plan is data: for every weight, how it is spread over the axes of the mesh.

Specs:
  Replicated()                  every rank of the replica holds the whole tensor
  Split(dim, axis, sizes)       cut along `dim`; rank r of `axis` holds piece r, of `sizes[r]` rows
  Split(dim, axis, sizes, repeat)  len(sizes) pieces, each held by `repeat` neighbouring ranks:
                                rank r holds piece r // repeat (KV heads when tp > KV heads);
                                repeat may be a tuple, ranks per piece, when pieces are held
                                by different numbers of ranks (e.g. 2 KV heads over 3 ranks: (2, 1))
  Experts(axis, owner)          MoE expert tensors: held whole by the rank of `axis` that owns the expert
  Staged(stages, inner)         pipeline: only the ranks of these stages hold the tensor, as `inner` says
A plan maps our tensor names (see io.names) to specs; `rank_slices` turns it into the exact
slice each rank reads from disk.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Replicated:
    def __str__(self):
        return "Replicated()"


@dataclass(frozen=True)
class Split:
    dim: int
    axis: str
    sizes: tuple      # rows of `dim` in each piece, in rank order (piece r // repeat for rank r)
    repeat: int | tuple = 1   # ranks holding each piece (> 1: replicated on neighbours), or per piece

    def piece(self, rank: int) -> int:
        """Which piece rank `rank` holds."""
        if isinstance(self.repeat, int):
            return rank // self.repeat
        first = 0
        for piece, n in enumerate(self.repeat):
            if rank < first + n:
                return piece
            first += n
        raise IndexError(f"rank {rank} is beyond the {first} ranks of {self}")

    def first_holder(self, rank: int) -> bool:
        """Whether `rank` is the first of the ranks holding its piece."""
        return rank == 0 or self.piece(rank - 1) != self.piece(rank)

    def bounds(self, rank: int) -> tuple:
        piece = self.piece(rank)
        lo = sum(self.sizes[:piece])
        return lo, lo + self.sizes[piece]

    def __str__(self):
        repeat = list(self.repeat) if isinstance(self.repeat, tuple) else self.repeat
        extra = f", repeat={repeat}" if repeat != 1 else ""
        return f"Split(dim={self.dim}, axis={self.axis!r}, sizes={list(self.sizes)}{extra})"


@dataclass(frozen=True)
class Experts:
    axis: str
    owner: int        # rank of `axis` that holds this expert

    def __str__(self):
        return f"Experts(axis={self.axis!r}, owner={self.owner})"


@dataclass(frozen=True)
class Staged:
    stages: tuple     # pipeline stages whose ranks hold the tensor (two for a tied embedding)
    inner: object     # how it is spread over the ranks of such a stage

    def __str__(self):
        where = f"stage {self.stages[0]}" if len(self.stages) == 1 else f"stages {list(self.stages)}"
        return f"{self.inner} on {where}"


def held_spec(spec, coords: dict):
    """The spec of what the rank at `coords` holds of a tensor: `spec` without its stage, or None
    when the rank's stage does not hold the tensor."""
    if isinstance(spec, Staged):
        return spec.inner if coords.get("pp", 0) in spec.stages else None
    return spec


def replicated_plan(shapes: dict) -> dict:
    """Every tensor whole on every rank: the single-rank and data-parallel plan."""
    return {name: Replicated() for name in shapes}


def rank_slices(plan: dict, shapes: dict, coords: dict) -> dict:
    """{name: index} of what the rank at `coords` ({axis: rank}) reads; tensors it does not hold are left out.

    index is None for a whole tensor, else a tuple of slices.
    """
    out = {}
    for name, spec in plan.items():
        spec = held_spec(spec, coords)
        if spec is None:
            continue
        if isinstance(spec, Replicated):
            out[name] = None
        elif isinstance(spec, Split):
            lo, hi = spec.bounds(coords.get(spec.axis, 0))
            index = [slice(None)] * len(shapes[name])
            index[spec.dim] = slice(lo, hi)
            out[name] = tuple(index)
        elif isinstance(spec, Experts):
            if coords.get(spec.axis, 0) == spec.owner:
                out[name] = None
        else:
            raise TypeError(f"unknown spec {spec!r} for {name}")
    return out


def format_plan(plan: dict, dtypes: dict | None = None) -> str:
    """One line per tensor, for printing and notebooks; with `dtypes` ({tensor: dtype}) each line
    ends with the dtype the tensor is held in."""
    width = max((len(n) for n in plan), default=0)
    if dtypes is None:
        return "\n".join(f"{name:<{width}}  {spec}" for name, spec in plan.items())
    spec_width = max((len(str(s)) for s in plan.values()), default=0)
    return "\n".join(f"{name:<{width}}  {str(spec):<{spec_width}}  {dtypes.get(name, '')}".rstrip()
                     for name, spec in plan.items())
