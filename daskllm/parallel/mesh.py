"""Mesh(dp, tp, sp, ep, pp): the rank table, written down once.

A replica is pp pipeline stages of stage_size = tp*sp ranks each (ep alone: ep ranks).
Global rank r: replica d = r // replica_size; inside a replica the local index
l = r % replica_size = p*stage_size + j, stage p, and inside the stage j = s*tp + t, so
tensor-parallel ranks are neighbours (they talk most). Expert parallelism spreads experts
over groups of ep ranks inside a stage (ep divides tp*sp): expert rank j % ep, group
j // ep. With ep == tp the ep groups are the tp groups; with ep == tp*sp a group is the
whole stage. With ep alone (tp = sp = 1) a stage is ep ranks whose dense parts are
replicated. The pp group of a rank is the ranks at the same place j of every stage: a
stage hands its activations to the next stage's rank at its own place.
"""
from __future__ import annotations

from dataclasses import dataclass

AXES = ("dp", "tp", "sp", "ep", "pp")


class MeshError(ValueError):
    """The mesh does not fit the model or the cluster."""


@dataclass(frozen=True)
class Mesh:
    dp: int = 1     # replicas serving requests side by side
    tp: int = 1     # ranks splitting every weight (Megatron)
    sp: int = 1     # ranks splitting the tokens of a sequence
    ep: int = 1     # ranks splitting the experts of MoE layers, inside a stage
    pp: int = 1     # pipeline stages, each holding a contiguous run of layers

    def __post_init__(self):
        for axis in AXES:
            value = getattr(self, axis)
            if not isinstance(value, int) or value < 1:
                raise MeshError(f"{axis} must be an integer >= 1, got {value!r}")
        if self.tp * self.sp > 1 and (self.tp * self.sp) % self.ep:
            raise MeshError(
                f"ep ({self.ep}) must divide tp x sp ({self.tp} x {self.sp} = {self.tp * self.sp}): "
                "experts are spread over the ranks of one replica")

    @property
    def stage_size(self) -> int:
        return max(self.tp * self.sp, self.ep)   # ep alone: a stage of ep ranks

    @property
    def replica_size(self) -> int:
        return self.pp * self.stage_size

    @property
    def world_size(self) -> int:
        return self.dp * self.replica_size

    @property
    def sampling_rank(self) -> int:
        """The local rank whose step answer holds the sampled tokens: the last stage's first."""
        return (self.pp - 1) * self.stage_size

    def replica(self) -> "Mesh":
        """The mesh of one replica (dp = 1): what each replica's ranks are numbered in."""
        return Mesh(1, self.tp, self.sp, self.ep, self.pp)

    def as_tuple(self) -> tuple:
        return (self.dp, self.tp, self.sp, self.ep, self.pp)

    def coords(self, rank: int) -> dict:
        """{axis: index} of a global rank."""
        local = rank % self.replica_size
        place = local % self.stage_size
        return {"dp": rank // self.replica_size, "tp": place % self.tp, "sp": (place // self.tp) % self.sp,
                "ep": place % self.ep, "pp": local // self.stage_size}

    def group(self, rank: int, axis: str) -> list:
        """The global ranks that share a communicator with `rank` on `axis`, in axis order."""
        if axis == "pp":
            base, place = rank - rank % self.replica_size, rank % self.stage_size
            return [base + p * self.stage_size + place for p in range(self.pp)]
        if axis == "replica":
            base = rank - rank % self.replica_size
            return list(range(base, base + self.replica_size))
        if axis == "dp":
            return [d * self.replica_size + rank % self.replica_size for d in range(self.dp)]
        base = rank - rank % self.stage_size        # the first rank of this rank's stage
        local = rank % self.stage_size
        if axis == "tp":
            first = base + (local // self.tp) * self.tp
            return list(range(first, first + self.tp))
        if axis == "sp":
            block = local - local % (self.tp * self.sp)   # ep alone: each rank is its own sp group
            return [base + block + s * self.tp + local % self.tp for s in range(self.sp)]
        if axis == "ep":
            first = base + (local // self.ep) * self.ep
            return list(range(first, first + self.ep))
        raise MeshError(f"unknown axis {axis!r}; axes are {', '.join(AXES)} and replica")

    def replica_ranks(self, replica: int) -> list:
        return list(range(replica * self.replica_size, (replica + 1) * self.replica_size))

    def check_workers(self, n_workers: int):
        """The cluster has a worker for every rank (one rank per worker)."""
        if self.world_size > n_workers:
            raise MeshError(
                f"the mesh {self} needs {self.world_size} workers (one rank per worker) "
                f"but the cluster has {n_workers}; add workers or shrink dp/tp/sp/pp")

    def table(self) -> str:
        """The rank table as text: one line per rank with its coordinates."""
        lines = ["rank  dp  tp  sp  ep  pp"]
        for r in range(self.world_size):
            c = self.coords(r)
            lines.append(f"{r:>4}  " + "  ".join(f"{c[a]:>2}" for a in AXES))
        return "\n".join(lines)

    def __str__(self):
        pp = f", pp={self.pp}" if self.pp > 1 else ""
        return f"Mesh(dp={self.dp}, tp={self.tp}, sp={self.sp}, ep={self.ep}{pp})"
