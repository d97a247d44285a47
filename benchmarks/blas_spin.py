"""OpenBLAS's idle spin: what 2**N cycles of spinning after each BLAS call costs the steps after it.

Run: python benchmarks/blas_spin.py                  (207M random Llama, spins 28 and a rank's 24; ~3 minutes)
     python benchmarks/blas_spin.py --spins 28 22 20 18

One process per spin, each the rank's runner (build_runner) on 2 threads with the rank's
start-up settings (runtime/tuning.apply: malloc thresholds, BLAS threads, and the spin, set the
way a rank sets it: OPENBLAS_THREAD_TIMEOUT re-read and OpenBLAS's threads restarted). 28 is
OpenBLAS's own default (~0.1 s on this host). The processes take turns, round after round,
the order reversed every other round; each figure is the median over the rounds of:
  idle spin       CPU seconds the process's other threads burn in the 0.3 s after a GEMM
  prefill         one 512-token forward
  decode 1        ms per greedy step of one sequence (median of --steps steps)
  batch of B      a B-sequence batch (64-token prompts, prefilled together), then decoding:
                  its first step after the prefill, and the median of the steps after its third
                  (2..8 rows run numba's float32 kernel: BLAS's spinning threads meet its threads)
  joins           a batch of 3 decoding while a new 32-token request is prefilled every 4th
                  step (continuous batching): the mean of a decode step over 24 steps
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from daskllm.runtime.settings import DEFAULTS  # noqa: E402
from common import LLAMA_207M, random_llama  # noqa: E402


def serve(path: str, spin: int, args):
    """Load the runner with a rank's settings and this spin; answer each "round" line with one JSON line."""
    from daskllm import kernels
    from daskllm.io.checkpoint import Checkpoint
    from daskllm.model.runner import Work
    from daskllm.parallel.build import build_runner
    from daskllm.parallel.compose import full_plan
    from daskllm.parallel.mesh import Mesh
    from daskllm.runtime import tuning
    settings = tuning.apply(args.threads, spin)
    kernels.set_threads(args.threads)
    ckpt = Checkpoint(path)
    runner = build_runner(ckpt, full_plan(ckpt.config, Mesh(), {}))
    counter = iter(range(1, 1 << 30))

    def step(work):
        t0 = time.perf_counter()
        chosen = runner.step(work)
        return chosen, time.perf_counter() - t0

    def prefill():
        seq = next(counter)
        _, seconds = step([Work(seq, tuple(range(3, 3 + args.prefill)), 0)])
        runner.release([seq])
        return seconds

    def decode_one():
        seq = next(counter)
        chosen, _ = step([Work(seq, tuple(range(100, 116)), 0)])
        times = []
        for i in range(args.steps):
            chosen, seconds = step([Work(seq, (chosen[seq],), 16 + i, counter=i + 1)])
            times.append(seconds)
        runner.release([seq])
        return statistics.median(times)

    def batch(size):
        seqs = [next(counter) for _ in range(size)]
        chosen, _ = step([Work(s, tuple(range(7 + i, 71 + i)), 0) for i, s in enumerate(seqs)])
        times = []
        for i in range(args.steps):
            chosen, seconds = step([Work(s, (chosen[s],), 64 + i, counter=i + 1) for s in seqs])
            times.append(seconds)
        runner.release(seqs)
        return times[0], statistics.median(times[3:])

    def joins():
        seqs = [next(counter) for _ in range(3)]
        chosen, _ = step([Work(s, tuple(range(9 + i, 73 + i)), 0) for i, s in enumerate(seqs)])
        lengths = {s: 64 for s in seqs}
        times = []
        for i in range(24):
            work = [Work(s, (chosen[s],), lengths[s], counter=lengths[s] - 63) for s in seqs]
            if i % 4 == 3:                                 # a new request joins: its prefill rides along
                new = next(counter)
                work.append(Work(new, tuple(range(11, 43)), 0))
            chosen, seconds = step(work)
            times.append(seconds)
            for s in seqs:
                lengths[s] += 1
            if i % 4 == 3:
                runner.release([new])
        runner.release(seqs)
        return statistics.mean(times)

    prefill(), decode_one()                                # warm: numba's caches, the KV cache
    print(json.dumps({"settings": settings}), flush=True)
    for _ in sys.stdin:
        spun = tuning.idle_spin_cpu()
        out = {"spun": spun, "prefill": prefill(), "decode": decode_one(), "joins": joins()}
        for size in args.batches:
            out[f"first {size}"], out[f"steady {size}"] = batch(size)
        print(json.dumps(out), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spins", type=int, nargs="+", default=[28, DEFAULTS["daskllm"]["blas-spin"]])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--serve", nargs=2, metavar=("PATH", "SPIN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve[0], int(args.serve[1]), args)
    with tempfile.TemporaryDirectory() as tmp:
        params = random_llama(tmp, **LLAMA_207M)
        print(f"random Llama: {params / 1e6:.0f}M parameters, float32, {args.threads} threads", flush=True)
        flags = ["--steps", str(args.steps), "--prefill", str(args.prefill), "--threads", str(args.threads),
                 "--batches", *map(str, args.batches)]
        procs = {spin: subprocess.Popen([sys.executable, __file__, "--serve", tmp, str(spin), *flags],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                 for spin in args.spins}
        for spin, proc in procs.items():
            print(f"spin 2**{spin}: {json.loads(proc.stdout.readline())['settings']}", flush=True)
        results = {spin: [] for spin in procs}
        for r in range(args.rounds):
            for spin in (args.spins if r % 2 == 0 else args.spins[::-1]):
                procs[spin].stdin.write("round\n")
                procs[spin].stdin.flush()
                results[spin].append(json.loads(procs[spin].stdout.readline()))
                print(f"  round {r + 1}, spin 2**{spin}: {results[spin][-1]}", flush=True)
        for proc in procs.values():
            proc.stdin.close()
            proc.wait()
    keys = ["spun", "prefill", "decode", "joins"] + [f"{k} {b}" for b in args.batches for k in ("first", "steady")]
    header = ["idle spin (CPU s)", "prefill 512 (ms)", "decode 1 (ms)", "joins (ms/step)"] + \
        [f"batch of {b}: {k} (ms)" for b in args.batches for k in ("first step", "steady")]
    print("\n| OpenBLAS spin | " + " | ".join(header) + " |")
    print("| :-- |" + " --: |" * len(header))
    for spin, rounds in results.items():
        cells = []
        for key in keys:
            value = statistics.median(r[key] for r in rounds)
            cells.append(f"{value:.2f}" if key == "spun" else f"{value * 1e3:.1f}")
        print(f"| 2**{spin}{' (default)' if spin == 28 else ''} | " + " | ".join(cells) + " |")
    print(f"(medians over {args.rounds} rounds, processes in turn)")


if __name__ == "__main__":
    main()
