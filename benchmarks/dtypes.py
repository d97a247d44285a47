"""Weights at their own size: decode and prefill per weight dtype against the memory-bandwidth bound.

Run: python benchmarks/dtypes.py            (207M random Llama, about 3-4 min on 2 cores)
     python benchmarks/dtypes.py --big      (adds a 0.9B Llama: ~7 GB of disk and memory, ~8 min more)

One random Llama checkpoint (float32 on disk) per size, written to a temporary directory;
each dtype loaded as one rank (build_runner, the code every rank runs) in a process of its
own (so resident memory is that dtype's alone), BLAS and the numba kernels on --threads
threads. All the dtypes' processes stay up and take turns, one at a time, round after
round (the order reversed every other round), so that a busy spell of the machine falls on
every dtype alike; each figure is the median over the --rounds rounds. For each dtype:
  resident   weight bytes the rank holds (Weights.nbytes) against the analytic size
             (params x bytes per weight: 4, 2, or 34/32 for Q8_0 plus float32 norms), and
             the process's anonymous resident-memory growth over the load
  decode     ms per greedy step of one sequence after a 16-token prompt (median of --steps
             steps in a round)
  bound      the decode bytes (every weight once, the embedding table one row) over a
             bandwidth measured in this run (the median of one measurement before each round):
             copy   numpy copy, bytes read + written per second (the issue's bound)
             read   the faster of two read-only streams (a byte reduction; BLAS's float32
                    matrix-vector product), what a decode step does; on this 2-core AMD host
                    ~20-23 GB/s against the copy's 26-30 (benchmarks/reference.py)
  prefill    seconds for one 512-token forward (one per round), ratio to float32
  GEMM rate  numpy's float32 x (512, in) @ W.T over every layer matrix, timed in the float32
             process each round: the float32 prefill's time against it (the prefill also
             runs attention, norms and RoPE, which this does not count in its favour)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import LLAMA_207M, random_llama  # noqa: E402
from reference import copy_bandwidth, read_bandwidth  # noqa: E402

DTYPES = ("float32", "bfloat16", "float16", "int8")
SIZES = {"207M": LLAMA_207M,
         "0.9B": dict(hidden=2048, layers=16, heads=16, kv_heads=8, intermediate=5632, vocab=32000)}


def load(path, dtype):
    from daskllm.io.checkpoint import Checkpoint
    from daskllm.parallel.build import build_runner
    from daskllm.parallel.compose import full_plan
    from daskllm.parallel.mesh import Mesh
    ckpt = Checkpoint(path)
    return build_runner(ckpt, full_plan(ckpt.config, Mesh(), {"dtype": dtype}), dtype=dtype), ckpt


def analytic_bytes(ckpt, dtype) -> int:
    from daskllm import kernels
    from daskllm.io.loader import target_dtype
    return sum(kernels.weight_bytes(ckpt.shape(n), target_dtype(n, ckpt.shape(n), "float32", dtype))
               for n in ckpt.entries)


def decode_bytes(runner) -> int:
    """Bytes one decode step streams: every weight, but only one row of the embedding table."""
    w = runner.model.weights
    embed = w.embed.nbytes if w.embed is not w.lm_head else 0
    return w.nbytes() - embed + embed // w.embed.shape[0]


def time_decode(runner, steps: int) -> float:
    from daskllm.model.runner import Work
    prompt = tuple(range(100, 116))
    tok = runner.step([Work(0, prompt, 0)])[0]
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        tok = runner.step([Work(0, (tok,), len(prompt) + i, counter=i + 1)])[0]
        times.append(time.perf_counter() - t0)
    runner.release([0])
    return statistics.median(times)


def time_prefill(runner, tokens: int, rounds: int) -> float:
    from daskllm.model.runner import Work
    times = []
    for r in range(rounds):
        t0 = time.perf_counter()
        runner.step([Work(r + 1, tuple(range(3, 3 + tokens)), 0)])
        times.append(time.perf_counter() - t0)
        runner.release([r + 1])
    return statistics.median(times)


def anonymous_memory() -> int:
    """Anonymous resident bytes of this process (not the checkpoint's file pages)."""
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) * 1024
    return 0


def serve(path, dtype, args):
    """Load `dtype` in this process, report its memory, then time what the parent asks for:
    one JSON line in answer to each "decode" or "prefill" line on stdin."""
    from threadpoolctl import threadpool_limits

    from daskllm import kernels
    threadpool_limits(args.threads)
    kernels.set_threads(args.threads)
    gc.collect()
    before = anonymous_memory()
    runner, ckpt = load(path, dtype)
    ckpt.close()
    gc.collect()
    grown = anonymous_memory() - before
    time_decode(runner, 3)                                   # warm-up: kernels, caches
    print(json.dumps({"held": runner.model.weights.nbytes(), "analytic": analytic_bytes(ckpt, dtype),
                      "grown": grown, "decode_bytes": decode_bytes(runner)}), flush=True)
    timers = {"decode": lambda: time_decode(runner, args.steps), "prefill": lambda: time_prefill(runner, args.prefill, 1),
              "gemm": lambda: time_gemm(runner, args.prefill)}
    for line in sys.stdin:
        what = line.strip()
        print(json.dumps({what: timers[what]()}), flush=True)


def layer_matrices(runner) -> list:
    """The (out, in) weight matrices of the layers: what a prefill multiplies all its rows by."""
    return [w for layer in runner.model.weights.layers for w in layer.values() if getattr(w, "ndim", 0) == 2]


def time_gemm(runner, tokens: int) -> float:
    """Seconds numpy takes for x (tokens, in) @ W.T over every layer matrix, float32 (the prefill's
    matmuls without the model around them: the GEMM rate on the same shapes)."""
    import numpy as np
    x = {w.shape[1]: np.ones((tokens, w.shape[1]), np.float32) for w in layer_matrices(runner)}
    t0 = time.perf_counter()
    for w in layer_matrices(runner):
        x[w.shape[1]] @ w.T
    return time.perf_counter() - t0


class Contender:
    """One dtype's process (serve), asked in turn by the parent."""

    def __init__(self, path, dtype, args):
        cmd = [sys.executable, __file__, "--one", path, dtype, "--threads", str(args.threads),
               "--steps", str(args.steps), "--prefill", str(args.prefill)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=os.environ)
        self.info = self._answer()

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"a dtype process ended early (exit status {self.proc.wait()})")
        return json.loads(line)

    def ask(self, what: str) -> float:
        # OpenBLAS's threads in the process asked last spin ~0.1 s after its work and would take a
        # core from this one's first tenth of a second (the GEMM, asked right after int8's prefill,
        # measured 0.66 s without the pause; blas_spin.py)
        time.sleep(0.3)
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        return self._answer()[what]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--big", action="store_true", help="also the 0.9B model (886M parameters)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--one", nargs=2, metavar=("PATH", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return serve(*args.one, args)
    for size in ["207M"] + (["0.9B"] if args.big else []):
        with tempfile.TemporaryDirectory() as tmp:
            params = random_llama(tmp, max_position=2048, **SIZES[size])
            contenders = {}
            try:
                for dtype in DTYPES:
                    contenders[dtype] = Contender(tmp, dtype, args)
                bandwidths, reads, gemm, decode, prefill = [], [], [], {d: [] for d in DTYPES}, {d: [] for d in DTYPES}
                for r in range(args.rounds):
                    bandwidths.append(copy_bandwidth(args.threads))
                    reads.append(read_bandwidth(args.threads))
                    order = DTYPES if r % 2 == 0 else DTYPES[::-1]
                    for dtype in order:
                        decode[dtype].append(contenders[dtype].ask("decode"))
                    for dtype in order:
                        prefill[dtype].append(contenders[dtype].ask("prefill"))
                    gemm.append(contenders["float32"].ask("gemm"))
            finally:
                for c in contenders.values():
                    c.close()
            bandwidth, read = statistics.median(bandwidths), statistics.median(reads)
            print(f"\n{size} Llama ({params / 1e6:.0f}M parameters), threads {args.threads}, {args.rounds} rounds "
                  f"of {args.steps} decode steps and one {args.prefill}-token prefill per dtype")
            print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + written; rounds: "
                  f"{', '.join(f'{b / 1e9:.1f}' for b in bandwidths)}); read bandwidth {read / 1e9:.1f} GB/s "
                  f"(read only; rounds: {', '.join(f'{b / 1e9:.1f}' for b in reads)})")
            print(f"{'dtype':9s} {'held MB':>8s} {'analytic':>8s} {'anon +MB':>8s} {'decode ms':>9s} "
                  f"{'bound ms':>8s} {'of bound':>8s} {'of read':>7s} {'vs f32':>6s} {'prefill s':>9s} {'vs f32':>6s}")
            f32_decode, f32_prefill = statistics.median(decode["float32"]), statistics.median(prefill["float32"])
            for dtype in DTYPES:
                info, dec, pre = contenders[dtype].info, statistics.median(decode[dtype]), statistics.median(prefill[dtype])
                bound = info["decode_bytes"] / bandwidth                  # as benchmarks/reference.py
                print(f"{dtype:9s} {info['held'] / 1e6:8.0f} {info['analytic'] / 1e6:8.0f} {info['grown'] / 1e6:8.0f} "
                      f"{dec * 1e3:9.2f} {bound * 1e3:8.2f} {bound / dec:8.2f} {info['decode_bytes'] / read / dec:7.2f} "
                      f"{dec / f32_decode:6.2f} {pre:9.2f} {pre / f32_prefill:6.2f}", flush=True)
            print(f"numpy GEMM on the prefill's shapes ({args.prefill} rows x every layer matrix, float32): "
                  f"{statistics.median(gemm):.2f} s; the float32 prefill runs at {statistics.median(gemm) / f32_prefill:.2f} "
                  f"of that GEMM rate (rounds: {', '.join(f'{g:.2f}' for g in gemm)} s)", flush=True)

if __name__ == "__main__":
    main()
