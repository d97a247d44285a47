"""What an all-reduce costs between bursts of compute: two plain processes, no Dask.

Run: python benchmarks/collective_jitter.py [--spin SECONDS] [--shared-memory]

Each of two processes runs `matmuls` (1 x 1024) @ (1024 x 704) products (one BLAS thread),
then a 4 KiB all-reduce over daskllm's TCP transport, 500 times; it prints the median and
mean time spent in the all-reduce and the time per iteration. With no compute between them
the all-reduce shows the transport's own latency; with compute it also shows how late the
other rank arrives (compute-time jitter between the two processes) and any wake-up cost.
--shared-memory runs the same loop over daskllm's shared-memory exchange instead
(comm.shared, what ranks on one host use for small all-reduces: each rank writes its vector
and a sequence number, then spins until the other's appears; no system call, no wake-up).
"""
import argparse
import multiprocessing as mp
import time

import numpy as np


def time_all_reduce(all_reduce, r, results, matmuls):
    """The measured loop, the same for both exchanges: 500 x (matmuls, then one 4 KiB all-reduce)."""
    w = np.random.rand(1024, 704).astype(np.float32)
    x, y = np.random.rand(1, 1024).astype(np.float32), np.random.rand(1, 1024).astype(np.float32)
    for _ in range(50):
        all_reduce(y)
    waits, start = [], time.perf_counter()
    for _ in range(500):
        for _ in range(matmuls):
            x @ w
        t0 = time.perf_counter()
        all_reduce(y)
        waits.append(time.perf_counter() - t0)
    results.put((r, matmuls, np.median(waits) * 1e6, np.mean(waits) * 1e6, (time.perf_counter() - start) / 500 * 1e6))


def rank(r, addresses_out, addresses_in, results, matmuls, spin):
    from threadpoolctl import threadpool_limits

    from daskllm.comm.collectives import GroupCommunicator
    from daskllm.comm.tcp import TcpTransport
    threadpool_limits(1)
    transport = TcpTransport(r, 2, spin=spin)
    addresses_out.put((r, transport.listen()))
    addresses = addresses_in.get()
    transport.connect({k: v for k, v in addresses.items() if k != r}, 10)
    comm = GroupCommunicator(transport, [0, 1], "tp")
    time_all_reduce(comm.all_reduce, r, results, matmuls)
    transport.close()


def shared_memory_rank(r, path, size, results, matmuls):
    """rank() over daskllm's shared-memory exchange (comm.shared.SharedSlots) on a segment the
    parent made; no TCP link, so no liveness check."""
    import mmap

    from threadpoolctl import threadpool_limits

    from daskllm.comm.shared import SharedSlots
    threadpool_limits(1)
    with open(path, "r+b") as f:
        slots = SharedSlots(mmap.mmap(f.fileno(), size), r, 2, alive=lambda j: True)
    time_all_reduce(lambda y: slots.all_reduce(y, time.monotonic() + 60), r, results, matmuls)


def run_shared_memory(matmuls) -> list:
    import tempfile

    from daskllm.comm import shared
    size = shared.segment_bytes(2)
    with tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="daskllm-bench-") as f:
        f.truncate(size)
        results = mp.Queue()
        procs = [mp.Process(target=shared_memory_rank, args=(r, f.name, size, results, matmuls)) for r in range(2)]
        for p in procs:
            p.start()
        rows = sorted(results.get(timeout=120) for _ in range(2))
        for p in procs:
            p.join(timeout=30)
        return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spin", type=float, default=0.0, help="seconds a waiting rank polls before sleeping")
    parser.add_argument("--shared-memory", action="store_true", help="a bare shared-memory exchange, not TCP")
    args = parser.parse_args()
    what = "shared memory, spinning" if args.shared_memory else f"TCP, spin {args.spin} s"
    print(f"| matmuls between | rank | all_reduce median us | mean us | iteration us |   ({what})")
    print("| --: | --: | --: | --: | --: |")
    for matmuls in (0, 4, 16):
        if args.shared_memory:
            for r, m, median, mean, iteration in run_shared_memory(matmuls):
                print(f"| {m} | {r} | {median:.0f} | {mean:.0f} | {iteration:.0f} |")
            continue
        addresses, results, inboxes = mp.Queue(), mp.Queue(), [mp.Queue(), mp.Queue()]
        procs = [mp.Process(target=rank, args=(r, addresses, inboxes[r], results, matmuls, args.spin)) for r in range(2)]
        for p in procs:
            p.start()
        table = dict(addresses.get(timeout=30) for _ in range(2))
        for q in inboxes:
            q.put(table)
        rows = sorted(results.get(timeout=120) for _ in range(2))
        for p in procs:
            p.join(timeout=30)
        for r, m, median, mean, iteration in rows:
            print(f"| {m} | {r} | {median:.0f} | {mean:.0f} | {iteration:.0f} |")


if __name__ == "__main__":
    main()
