"""Dask's timers against a rank: the in-process runner alone, and beside an idle LocalCluster.

Run: python benchmarks/dask_timers.py              (the 207M random Llama of issue 10; ~4 minutes)
     python benchmarks/dask_timers.py --layers 2 --rounds 1   (a quick run)

An idle Dask cluster wakes its event loops about a hundred times a second (the tick every
20 ms in the worker, the nanny and the scheduler; the worker's profiler every 10 ms; the
memory monitors every 100 ms). Here the rank's runner decodes in this process with 2 BLAS
threads on a 2-core machine, as a rank fills its worker's cores, while beside it:
- nothing (no cluster);
- an idle LocalCluster (1 worker x 2 threads, its nanny, a client), Dask's timers as they are;
- the same with the timers daskllm slows while ranks run (runtime/quiet.py: tick and memory
  monitors once a second, profiler stopped), on the worker, its nanny and the scheduler;
- the same with every periodic callback of all of them stopped (the floor: no wake-up at all).
Each round runs every row in turn; ratios are the median over the rounds of each round's own
ratio to the row without a cluster. Also printed: the wake-ups per second of the cluster's
event loops (voluntary context switches of its threads, /proc) while the row ran.
"""
import argparse
import glob
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import random_llama  # noqa: E402
from dask_tax import InProcess  # noqa: E402


def _stop_all(dask_worker=None, dask_scheduler=None):
    for timer in (dask_worker if dask_worker is not None else dask_scheduler).periodic_callbacks.values():
        timer.stop()


def _thread_ids(pid) -> set:
    return {int(task.rsplit("/", 1)[1]) for task in glob.glob(f"/proc/{pid}/task/*")}


def _wakeups(pids, skip: set) -> int:
    """Voluntary context switches so far of every thread of `pids` but those in `skip` (this
    process's own: the runner's and BLAS's), i.e. of the cluster's threads."""
    total = 0
    for pid in pids:
        for tid in _thread_ids(pid) - skip:
            try:
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    total += sum(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt"))
            except OSError:
                pass
    return total


def decode(runner, short, steps) -> float:
    """Median over the steps of the runner's own compute per decode step, in seconds."""
    runner.generate(short, 2)                                          # warm up
    runner.generate(short, 1 + steps)
    return float(np.median(runner.computes[1:]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per row")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)

    from distributed import Client, LocalCluster

    from daskllm.runtime.quiet import slow_timers
    rows = ["no cluster", "idle LocalCluster, Dask's timers as they are",
            "idle LocalCluster, timers slowed (daskllm.quiet-dask)", "idle LocalCluster, every timer stopped"]
    results = {row: [] for row in rows}
    wakes = {row: [] for row in rows[1:]}
    short = np.random.default_rng(0).integers(3, args.vocab, 8).tolist()
    with tempfile.TemporaryDirectory(prefix="daskllm-timers-") as tmp:
        params = random_llama(tmp, layers=args.layers, hidden=args.hidden, heads=16, kv_heads=8, vocab=args.vocab,
                              intermediate=args.intermediate, max_position=args.steps + 64)
        print(f"random Llama: {params / 1e6:.0f}M parameters, {args.layers} layers, float32; "
              f"2 BLAS threads, {os.cpu_count()} cores")
        runner = InProcess(tmp)
        try:
            for r in range(args.rounds):
                results[rows[0]].append(decode(runner, short, args.steps))
                if r == 0:
                    own = _thread_ids(os.getpid())                # the runner's threads, before any cluster
                for row in rows[1:]:
                    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None,
                                      host="127.0.0.1") as cluster, Client(cluster) as client:
                        nanny = next(iter(cluster.workers.values()))
                        if row == rows[2]:
                            client.run(slow_timers)
                            client.run(slow_timers, nanny=True)
                            client.run_on_scheduler(slow_timers)
                        elif row == rows[3]:
                            client.run(_stop_all)
                            _stop_all(dask_worker=nanny)          # the nanny and scheduler live in this process
                            client.run_on_scheduler(_stop_all)
                            for timer in client._periodic_callbacks.values():
                                timer.stop()
                        pids = [os.getpid(), *client.run(os.getpid).values()]
                        time.sleep(0.5)
                        w0, t0 = _wakeups(pids, own), time.perf_counter()
                        results[row].append(decode(runner, short, args.steps))
                        wakes[row].append((_wakeups(pids, own) - w0) / (time.perf_counter() - t0))
                print(f"  round {r + 1}: " + ", ".join(f"{row}: {results[row][-1] * 1e3:.2f} ms" for row in rows),
                      flush=True)
        finally:
            runner.close()
    base = results[rows[0]]
    print("\n| beside the runner | decode compute ms/token | vs no cluster | cluster's wake-ups/s |")
    print("| :-- | --: | --: | --: |")
    for row in rows:
        ratio = np.median([a / b for a, b in zip(results[row], base)])
        woke = f"{np.median(wakes[row]):.0f}" if row in wakes else ""
        print(f"| {row} | {np.median(results[row]) * 1e3:.2f} | {ratio:.3f}x | {woke} |")
    print(f"(medians of {args.rounds} rounds, the rows in turn; compute: the runner's step, median of "
          f"{args.steps} decode steps; ratio: median of each round's own ratio)")


if __name__ == "__main__":
    main()
