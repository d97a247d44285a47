"""Placement: which worker runs which rank, and the checks made before any actor starts."""
from __future__ import annotations

import os

from ..parallel.mesh import Mesh


class PlacementError(RuntimeError):
    """The cluster cannot host the mesh as asked."""


def worker_table(client) -> list:
    """[(address, nthreads, memory_limit)] of the cluster's workers, in a stable order."""
    info = client.scheduler_info(n_workers=-1)["workers"] if _takes_n_workers(client) else client.scheduler_info()["workers"]
    rows = [(addr, w.get("nthreads", 1), w.get("memory_limit") or 0) for addr, w in info.items()]
    return sorted(rows, key=lambda r: (r[0].rsplit(":", 1)[0], r[0]))


def _takes_n_workers(client) -> bool:
    import inspect
    return "n_workers" in inspect.signature(client.scheduler_info).parameters


def place(client, mesh: Mesh) -> list:
    """One worker per rank: [[worker of each rank] for each replica]."""
    workers = [w[0] for w in worker_table(client)]
    mesh.check_workers(len(workers))
    size = mesh.replica_size
    return [workers[d * size:(d + 1) * size] for d in range(mesh.dp)]


def _can_read(path):
    """A GGUF file, or a directory (a safetensors checkpoint's config.json, or a .gguf in it)."""
    if os.path.isfile(path):
        return os.access(path, os.R_OK)
    if not os.path.isdir(path):
        return False
    return os.access(os.path.join(path, "config.json"), os.R_OK) or any(
        f.endswith(".gguf") and os.access(os.path.join(path, f), os.R_OK) for f in os.listdir(path))


def check_checkpoint_on_workers(client, workers: list, path: str):
    """Every worker that will host a rank can read the checkpoint directory."""
    readable = client.run(_can_read, path, workers=workers)
    missing = [w for w in workers if not readable.get(w)]
    if missing:
        raise PlacementError(
            f"these workers cannot read the checkpoint {path}: {', '.join(missing)}. "
            "Put the checkpoint on a filesystem all workers share (or copy it to the same path "
            "on each machine), or pass ship_weights=True to send each rank its slices from the client.")
