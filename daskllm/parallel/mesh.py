"""Mesh(dp, tp, sp, ep): the rank table, written down once.

Global rank r of a mesh: replica d = r // (tp*sp); inside a replica the local index
l = r % (tp*sp) = s*tp + t, so tensor-parallel ranks are neighbours (they talk most).
Expert parallelism spreads experts over groups of ep ranks inside a replica
(ep divides tp*sp): expert rank l % ep, group l // ep. With ep == tp the ep groups are
the tp groups; with ep == tp*sp a group is the whole replica. With ep alone
(tp = sp = 1) a replica is ep ranks whose dense parts are replicated.
"""
from __future__ import annotations

from dataclasses import dataclass

AXES = ("dp", "tp", "sp", "ep")


class MeshError(ValueError):
    """The mesh does not fit the model or the cluster."""


@dataclass(frozen=True)
class Mesh:
    dp: int = 1     # replicas serving requests side by side
    tp: int = 1     # ranks splitting every weight (Megatron)
    sp: int = 1     # ranks splitting the tokens of a sequence
    ep: int = 1     # ranks splitting the experts of MoE layers, inside a replica

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
    def replica_size(self) -> int:
        return max(self.tp * self.sp, self.ep)   # ep alone: a replica of ep ranks

    @property
    def world_size(self) -> int:
        return self.dp * self.replica_size

    def coords(self, rank: int) -> dict:
        """{axis: index} of a global rank."""
        local = rank % self.replica_size
        return {"dp": rank // self.replica_size, "tp": local % self.tp, "sp": (local // self.tp) % self.sp,
                "ep": local % self.ep}

    def group(self, rank: int, axis: str) -> list:
        """The global ranks that share a communicator with `rank` on `axis`, in axis order."""
        base = rank - rank % self.replica_size
        local = rank % self.replica_size
        if axis == "tp":
            first = base + (local // self.tp) * self.tp
            return list(range(first, first + self.tp))
        if axis == "sp":
            block = local - local % (self.tp * self.sp)   # ep alone: each rank is its own sp group
            return [base + block + s * self.tp + local % self.tp for s in range(self.sp)]
        if axis == "ep":
            first = base + (local // self.ep) * self.ep
            return list(range(first, first + self.ep))
        if axis == "replica":
            return list(range(base, base + self.replica_size))
        if axis == "dp":
            return [d * self.replica_size + local for d in range(self.dp)]
        raise MeshError(f"unknown axis {axis!r}; axes are {', '.join(AXES)} and replica")

    def replica_ranks(self, replica: int) -> list:
        return list(range(replica * self.replica_size, (replica + 1) * self.replica_size))

    def check_workers(self, n_workers: int):
        """The cluster has a worker for every rank (one rank per worker)."""
        if self.world_size > n_workers:
            raise MeshError(
                f"the mesh {self} needs {self.world_size} workers (one rank per worker) "
                f"but the cluster has {n_workers}; add workers or shrink dp/tp/sp")

    def table(self) -> str:
        """The rank table as text: one line per rank with its coordinates."""
        lines = ["rank  dp  tp  sp  ep"]
        for r in range(self.world_size):
            c = self.coords(r)
            lines.append(f"{r:>4}  {c['dp']:>2}  {c['tp']:>2}  {c['sp']:>2}  {c['ep']:>2}")
        return "\n".join(lines)

    def __str__(self):
        return f"Mesh(dp={self.dp}, tp={self.tp}, sp={self.sp}, ep={self.ep})"
