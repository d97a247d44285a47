"""Reaching a Dask cluster for an LLM: a scheduler address, or a private LocalCluster.

Clients made here are never the default client: the user's own Dask work must not land on
an LLM's cluster, and closing the LLM closes them.
"""
from __future__ import annotations

import os

from . import settings


def client_for_address(address: str, security=None):
    """A private Client of the scheduler at `address`, within daskllm.connect-timeout; a
    ConnectionError that says what was tried (and what to change when TLS is on one side only)."""
    from distributed import Client
    timeout = settings.get("connect-timeout")
    try:
        return Client(address, security=security, direct_to_workers=True, set_as_default=False, timeout=timeout)
    except (OSError, TimeoutError, ValueError) as e:
        hint = _tls_hint(address, security)
        raise ConnectionError(
            f"could not reach a Dask scheduler at {address!r} within {timeout:g} s "
            f"(daskllm.connect-timeout): {type(e).__name__}: {e}. " + (hint or "Check that a scheduler "
            "runs there and the address is right (e.g. tcp://host:8786, tls://... for TLS clusters)")) from e


def local_cluster(n_workers: int, threads_per_worker=None) -> tuple:
    """(LocalCluster, private Client) with one worker process per rank, the cores shared out."""
    from distributed import Client, LocalCluster
    threads = threads_per_worker or max(1, (os.cpu_count() or 1) // n_workers)
    cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads, processes=True, dashboard_address=":0")
    try:
        return cluster, Client(cluster, direct_to_workers=True, set_as_default=False)
    except BaseException:
        cluster.close()
        raise


def _tls_hint(address, security):
    """What to change when TLS is on one side only (placement.tls_mismatch), else None."""
    from .placement import tls_mismatch
    try:
        return tls_mismatch(address, security, timeout=2.0)
    except (OSError, ValueError):       # an address it cannot parse or resolve: no hint
        return None
