"""Placement: which worker runs which rank, and the checks made before any actor starts."""
from __future__ import annotations

import os

from ..parallel.mesh import Mesh, MeshError


class PlacementError(RuntimeError):
    """The cluster cannot host the mesh as asked."""


class TooFewWorkers(PlacementError, MeshError):
    """The mesh needs more workers (one per rank) than the cluster has."""


def host_of(worker: str) -> str:
    """The host part of a worker address: tcp://10.0.0.2:4242 -> 10.0.0.2."""
    return worker.split("://")[-1].rsplit(":", 1)[0].strip("[]")


def describe_hosts(workers: list) -> str:
    """'h1, h2 (2 workers), h3': the hosts of `workers`, in order, with their worker counts."""
    counts = {}
    for w in workers:
        counts[host_of(w)] = counts.get(host_of(w), 0) + 1
    return ", ".join(h if n == 1 else f"{h} ({n} workers)" for h, n in counts.items())


def peer_hint(error, workers: list) -> str:
    """'; its peer, local rank 1, is on worker W (host H)' for an error between ranks that names
    its peer, so that a link cut or a host lost shows which host it is; '' otherwise.

    error: the exception, or the rest of a control reply after its message ([peer] or [])."""
    peer = error[0] if isinstance(error, (list, tuple)) and error else getattr(error, "peer", None)
    if not isinstance(peer, int) or not 0 <= peer < len(workers):
        return ""
    return f"; its peer, local rank {peer}, is on worker {workers[peer]} (host {host_of(workers[peer])})"


def worker_table(client) -> list:
    """[(address, nthreads, memory_limit)] of the cluster's workers, in a stable order."""
    info = client.scheduler_info(n_workers=-1)["workers"] if _takes_n_workers(client) else client.scheduler_info()["workers"]
    rows = [(addr, w.get("nthreads", 1), w.get("memory_limit") or 0) for addr, w in info.items()]
    return sorted(rows, key=lambda r: (r[0].rsplit(":", 1)[0], r[0]))


def _takes_n_workers(client) -> bool:
    import inspect
    return "n_workers" in inspect.signature(client.scheduler_info).parameters


def rank_counts(client) -> dict:
    """{worker: daskllm ranks it hosts now} (the rank actors of every LLM on the cluster)."""
    return {w: sum(str(k).startswith("daskllm-rank-") for k in keys) for w, keys in client.has_what().items()}


def place(client, mesh: Mesh, load=None) -> list:
    """One worker per rank: [[worker of each rank] for each replica].

    The workers hosting the fewest ranks (`load`: {worker: ranks}) come first; among equals
    the table's host order is kept, so a replica's ranks stay on one host where they can."""
    load = load or {}
    table = [w[0] for w in worker_table(client)]
    if mesh.world_size > len(table):
        where = f" at {client.scheduler.address}" if getattr(client, "scheduler", None) is not None else ""
        raise TooFewWorkers(
            f"the mesh {mesh} needs {mesh.world_size} workers (one rank per worker) but the cluster has "
            f"{len(table)}{where}: " + (f"workers on {describe_hosts(table)}" if table else "no workers yet")
            + "; start more workers (cluster/ssh.sh starts one per host), wait for them "
            "(client.wait_for_workers), or shrink dp/tp/sp")
    workers = sorted(table, key=lambda w: load.get(w, 0))     # stable: host order among equals
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
            f"these workers cannot read the checkpoint {path}: "
            + ", ".join(f"{w} (host {host_of(w)})" for w in missing) + ". "
            "Put the checkpoint on a filesystem all workers share (or copy it to the same path "
            "on each machine), or pass ship_weights=True to send each rank its slices from the client.")


def tls_mismatch(address: str, security=None, timeout: float = 5.0) -> str | None:
    """Why a client cannot talk to the scheduler at `address` when the cause is TLS on one side
    only (a sentence that says what would be right), or None when TLS is not the problem.

    Meant for a failed connect: it probes the port once (one TLS handshake, at most `timeout` s).
    """
    scheme, _, hostport = address.rpartition("://")
    host, _, port = hostport.rpartition(":")
    speaks = _speaks_tls(host.strip("[]"), int(port), timeout)
    if speaks is None:
        return None
    if speaks and scheme != "tls":
        return (f"the scheduler at {address} speaks TLS: connect to tls://{hostport} with security= a "
                "distributed.security.Security holding the cluster's CA and a client certificate "
                "(cluster/tls.py security_from(DIR)), or with that Security in your Dask config")
    if speaks and (security is None or not getattr(security, "tls_client_cert", None)):
        return (f"the scheduler at {address} needs a client certificate: pass security=Security(tls_ca_file=..., "
                "tls_client_cert=..., tls_client_key=...) made from the cluster's certificates")
    if not speaks and scheme == "tls":
        return f"the scheduler at {address} does not speak TLS (a plain cluster): connect to tcp://{hostport}"
    return None


def _speaks_tls(host: str, port: int, timeout: float) -> bool | None:
    """True: a TLS server answers there; False: something else does; None: nothing answers."""
    import socket
    import ssl
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE     # only asking whether it speaks TLS
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return None
    try:
        with ctx.wrap_socket(sock, server_hostname=None):
            return True
    except (ssl.SSLError, ConnectionResetError):      # a Dask server greets in its own framing
        return False
    except OSError:
        return None
    finally:
        sock.close()
