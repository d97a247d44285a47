"""Plain-process speed for a rank inside any Dask worker: undo what the nanny imposes.

Applied by the rank actor at start-up, on whatever worker it lands on (daskllm's own
LocalCluster, `dask-ssh`, SLURM), so nothing depends on how the cluster was started:
- The nanny sets MALLOC_TRIM_THRESHOLD_=65536 for every worker. Any such variable turns
  off glibc's dynamic mmap threshold, so each large temporary array of a step is mmapped,
  page-faulted and unmapped again (a 512-token prefill measured 1.17 s in a plain
  process, 1.79 s with the variable set). `mallopt` puts the thresholds back where the
  dynamic rule ends up: temporaries up to 32 MiB come from the heap and stay there.
- The nanny sets OMP/OPENBLAS/MKL_NUM_THREADS=1; the rank gets its worker's threads.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# The largest mmap threshold glibc accepts (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit), where
# the dynamic rule stops; the trim threshold follows it at twice that, as glibc does.
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD


def _libc():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


def set_malloc_thresholds() -> dict:
    """Large fixed mmap and trim thresholds (glibc only; elsewhere nothing to undo)."""
    libc = _libc()
    if libc is None:
        return {"malloc": "not glibc"}
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        return {"malloc": "mallopt refused"}
    return {"malloc": "set", "mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD}


def set_blas_threads(threads: int) -> int:
    """BLAS (and OpenMP) pools of this process to `threads`; the threads actually in force."""
    from threadpoolctl import threadpool_info, threadpool_limits
    threadpool_limits(threads)
    pools = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    return min(pools) if pools else threads


def apply(threads: int) -> dict:
    """Every setting for a rank with `threads` cores; what is now in force (reported in load info)."""
    return {"pid": os.getpid(), "blas_threads": set_blas_threads(threads), **set_malloc_thresholds()}


def in_force() -> dict:
    """What a test can observe from inside the process: BLAS threads, and whether a 16 MiB
    temporary is mmapped (glibc's count of mmapped blocks goes up while it lives) or not."""
    import numpy as np
    from threadpoolctl import threadpool_info
    pools = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    before = _mmapped_blocks()
    a = np.empty(16 * 1024 * 1024, np.uint8)   # noqa: F841 - alive while counted
    during = _mmapped_blocks()
    del a
    return {"blas_threads": min(pools) if pools else None,
            "temporary_mmapped": None if before is None else during > before}


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def _mmapped_blocks():
    libc = _libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2().hblks
