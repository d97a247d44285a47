"""What an all-reduce costs between bursts of compute: two plain processes, no Dask.

Run: python benchmarks/collective_jitter.py [--spin SECONDS] [--shared-memory] [--kib N]

Each of two processes runs `matmuls` (1 x 1024) @ (1024 x 704) products (one BLAS thread),
then an all-reduce of --kib KiB (default 4, a decode step's) through daskllm's communicator over
its TCP transport, 500 times (50 above 1 MiB); it prints the median and mean time spent in the
all-reduce and the time per iteration. With no compute between them the all-reduce shows the
transport's own latency; with compute it also shows how late the other rank arrives
(compute-time jitter between the two processes) and any wake-up cost.
--shared-memory gives the communicator its shared-memory segment, as ranks on one host have
(comm.shared: each rank writes its vector and a sequence number, then spins until the other's
appears; no system call, no wake-up; above 256 KiB in pieces).
"""
import argparse
import multiprocessing as mp
import time

import numpy as np


def time_all_reduce(all_reduce, r, results, matmuls, kib):
    """The measured loop, the same for both exchanges: n x (matmuls, then one all-reduce of kib KiB)."""
    w = np.random.rand(1024, 704).astype(np.float32)
    x, y = np.random.rand(1, 1024).astype(np.float32), np.random.rand(kib * 256).astype(np.float32)
    n = 500 if kib <= 1024 else 50
    for _ in range(min(n, 50)):
        all_reduce(y)
    waits, start = [], time.perf_counter()
    for _ in range(n):
        for _ in range(matmuls):
            x @ w
        t0 = time.perf_counter()
        all_reduce(y)
        waits.append(time.perf_counter() - t0)
    results.put((r, matmuls, np.median(waits) * 1e6, np.mean(waits) * 1e6, (time.perf_counter() - start) / n * 1e6))


def rank(r, addresses_out, addresses_in, results, matmuls, spin, shared, kib):
    from threadpoolctl import threadpool_limits

    from daskllm.comm.collectives import GroupCommunicator
    from daskllm.comm.shared import share_memory
    from daskllm.comm.tcp import TcpTransport
    threadpool_limits(1)
    transport = TcpTransport(r, 2, spin=spin)
    addresses_out.put((r, transport.listen()))
    addresses = addresses_in.get()
    transport.connect({k: v for k, v in addresses.items() if k != r}, 10)
    comm = GroupCommunicator(transport, [0, 1], "tp")
    if shared and not share_memory(comm, lambda j: transport.peer_alive(comm.ranks[j])):
        raise SystemExit("no shared memory here (x86-64 Linux with /dev/shm only)")
    time_all_reduce(comm.all_reduce, r, results, matmuls, kib)
    transport.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spin", type=float, default=0.0, help="seconds a waiting rank polls before sleeping")
    parser.add_argument("--shared-memory", action="store_true", help="through the shared-memory segment, not TCP")
    parser.add_argument("--kib", type=int, default=4, help="size of the all-reduce in KiB")
    args = parser.parse_args()
    what = "shared memory, spinning" if args.shared_memory else f"TCP, spin {args.spin} s"
    print(f"| matmuls between | rank | all_reduce median us | mean us | iteration us |   ({what}, {args.kib} KiB)")
    print("| --: | --: | --: | --: | --: |")
    for matmuls in (0, 4, 16):
        addresses, results, inboxes = mp.Queue(), mp.Queue(), [mp.Queue(), mp.Queue()]
        procs = [mp.Process(target=rank, args=(r, addresses, inboxes[r], results, matmuls, args.spin,
                                               args.shared_memory, args.kib)) for r in range(2)]
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
