"""Plain-process speed for a rank inside any Dask worker: undo what the nanny imposes.

Applied by the rank actor at start-up, on whatever worker it lands on (daskllm's own
LocalCluster, `dask-ssh`, SLURM), so nothing depends on how the cluster was started:
- The nanny sets MALLOC_TRIM_THRESHOLD_=65536 for every worker. Any such variable turns
  off glibc's dynamic mmap threshold, so each large temporary array of a step is mmapped,
  page-faulted and unmapped again (a 512-token prefill measured 1.17 s in a plain
  process, 1.79 s with the variable set). `mallopt` puts the thresholds back where the
  dynamic rule ends up: temporaries up to 32 MiB come from the heap and stay there.
- The nanny sets OMP/OPENBLAS/MKL_NUM_THREADS=1; the rank gets its worker's threads.
- OpenBLAS's idle threads spin 2**28 clock cycles (0.1 s at 2.6 GHz) after each call before
  they sleep. A batched decode step runs its matmuls on numba's threads (kernels.matvec_f32),
  and its first step after a prefill met BLAS threads still spinning there: 111 ms against
  37 for a batch of 2 on the 207M Llama, and a batch that new requests join every 4th step
  averaged 82 ms a step against 65. At 2**24 cycles (~6 ms) the threads stay awake through
  a prefill's gaps between matmuls (its time unchanged; 2**22 made it 3% slower) and sleep
  a few milliseconds after the last one (benchmarks/blas_spin.py). OpenBLAS reads this only from
  OPENBLAS_THREAD_TIMEOUT at start-up, so the rank sets the variable, has OpenBLAS read it
  again and restarts its threads: once per process, before any step.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time

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


_blas_lock = threading.Lock()


def _openblas_libraries() -> list:
    """The OpenBLAS libraries loaded in this process that export what set_blas_spin needs."""
    import numpy  # noqa: F401 - loads numpy's BLAS, which threadpoolctl then finds
    from threadpoolctl import ThreadpoolController
    found = []
    for pool in ThreadpoolController().info():
        if pool.get("internal_api") != "openblas" or pool.get("threading_layer") != "pthreads":
            continue                                   # an OpenMP build: its threads follow OMP_WAIT_POLICY
        try:
            lib = ctypes.CDLL(pool["filepath"])
        except OSError:
            continue
        if all(hasattr(lib, name) for name in ("openblas_thread_timeout", "openblas_read_env", "blas_thread_shutdown_")):
            found.append(lib)
    return found


def set_blas_spin(log2_cycles) -> dict:
    """OpenBLAS's idle threads spin 2**log2_cycles cycles before sleeping (None: leave them).

    Shutting OpenBLAS's threads down is only safe while no BLAS call runs in this process:
    it happens at a rank's start-up, under a lock, and only where the value is not yet in
    force (a second rank in the process finds it set and leaves the threads alone). OpenBLAS
    starts them again at its next call.
    """
    if log2_cycles is None:
        return {"blas_spin": "untouched"}
    log2_cycles = int(log2_cycles)                     # 4..30: settings.blas_spin checked it
    with _blas_lock:
        libraries = _openblas_libraries()
        if not libraries:
            return {"blas_spin": "not a pthreads OpenBLAS"}
        os.environ["OPENBLAS_THREAD_TIMEOUT"] = str(log2_cycles)   # what openblas_read_env reads
        for lib in libraries:
            if lib.openblas_thread_timeout() != log2_cycles:
                lib.openblas_read_env()
                lib.blas_thread_shutdown_()
    return {"blas_spin": log2_cycles}


def blas_spin_in_force():
    """The spin OpenBLAS's threads start with (log2 cycles; 0: OpenBLAS's default, 28), or None."""
    libraries = _openblas_libraries()
    return libraries[0].openblas_thread_timeout() if libraries else None


def set_blas_threads(threads: int) -> int:
    """BLAS (and OpenMP) pools of this process to `threads`; the threads actually in force."""
    from threadpoolctl import threadpool_info, threadpool_limits
    threadpool_limits(threads)
    pools = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    return min(pools) if pools else threads


def apply(threads: int, blas_spin=None) -> dict:
    """Every setting for a rank with `threads` cores; what is now in force (reported in load info).
    The spin first: OpenBLAS's restart may read the nanny's thread count, which the next call undoes."""
    spin = set_blas_spin(blas_spin)
    return {"pid": os.getpid(), **spin, "blas_threads": set_blas_threads(threads), **set_malloc_thresholds()}


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
    return {"blas_threads": min(pools) if pools else None, "blas_spin": blas_spin_in_force(),
            "temporary_mmapped": None if before is None else during > before}


def idle_spin_cpu(pause: float = 0.3) -> float:
    """CPU seconds this process's other threads (OpenBLAS's idle ones) burn in the `pause` after a
    small GEMM: ~0.1 s at OpenBLAS's default spin, ~0 at a rank's (Linux /proc)."""
    import numpy as np
    tick, me = os.sysconf("SC_CLK_TCK"), str(threading.get_native_id())

    def sample():
        seconds = {}
        for tid in os.listdir("/proc/self/task"):
            fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
            seconds[tid] = (int(fields[11]) + int(fields[12])) / tick       # utime + stime
        return seconds
    a = np.ones((256, 256), np.float32)
    a @ a
    before = sample()
    time.sleep(pause)
    after = sample()
    return sum(cpu - before.get(tid, 0.0) for tid, cpu in after.items() if tid != me)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def _mmapped_blocks():
    libc = _libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2().hblks
