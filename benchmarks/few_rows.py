"""Few rows: float32 matmuls of decode batches (1-8 rows), and decode steps of 1-8 sequences.

Run: python benchmarks/few_rows.py                     (kernels, then the model against --baseline; ~6 minutes)
     python benchmarks/few_rows.py --baseline aa776dc  (the model rows against that commit, in turn)
     python benchmarks/few_rows.py --skip-model

Kernels: every weight matrix of the 207M random Llama's 12 layers (566 MB, out of cache), x of
T rows, 2 threads, each way in its own block after a pause (OpenBLAS's and numba's idle
threads spin for a while after their work and slow whatever runs next):
  BLAS, W.T contiguous  (how io.loader held float32 weights before)
  BLAS, W row-major     (how it holds them now on the CPU)
  numba matvec_f32      (kernels.cpu, what kernels.matmul runs now for <= DECODE_ROWS rows)
Model: the in-process runner (InProcessReplica, 2 threads) decoding B sequences at once, the
median step time over 16 steps, this checkout against --baseline (a git revision, checked out
into a temporary worktree), each in its own process, rounds in turn.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import LLAMA_207M, random_llama  # noqa: E402

SHAPES = [(2048, 1024), (1024, 1024), (5632, 1024), (1024, 2816)]    # a layer's wqkv, wo, w_gate_up, w_down


def kernels_table(rows_list, rounds=3):
    from threadpoolctl import threadpool_limits

    from daskllm import kernels
    from daskllm.kernels import cpu
    threadpool_limits(2)
    kernels.set_threads(2)
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal(s, dtype=np.float32) for s in SHAPES * 12]
    transposed = [np.asfortranarray(w) for w in weights]
    total = sum(w.nbytes for w in weights)
    print(f"{total / 1e6:.0f} MB of float32 weights (12 layers' matrices), 2 threads")
    print("\n| rows | BLAS, W.T contiguous (before) | BLAS, W row-major | numba matvec_f32 | numba vs before |")
    print("| --: | --: | --: | --: | --: |")
    for rows in rows_list:
        xs = {k: rng.standard_normal((rows, k), dtype=np.float32) for k in (1024, 2048, 2816)}
        outs = [np.empty((rows, w.shape[0]), np.float32) for w in weights]

        def blas(ws):
            for w, o in zip(ws, outs):
                np.matmul(xs[w.shape[1]], w.T, out=o)

        def numba():
            for w, o in zip(weights, outs):
                cpu.matvec_f32(xs[w.shape[1]], w, o)
        ways = {"before": lambda: blas(transposed), "row-major": lambda: blas(weights), "numba": numba}
        times = {name: [] for name in ways}
        for _ in range(rounds):
            for name, run in ways.items():
                time.sleep(0.3)                     # the other pool's threads stop spinning
                run()
                for _ in range(2):
                    t0 = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - t0)
        med = {name: float(np.median(t)) for name, t in times.items()}
        cells = " | ".join(f"{med[n] * 1e3:.1f} ms ({total / med[n] / 1e9:.1f} GB/s)" for n in ways)
        print(f"| {rows} | {cells} | {med['before'] / med['numba']:.2f}x faster |", flush=True)


def model_child(path, batches, steps):
    """In a child process: {batch: median decode step seconds} of the in-process runner."""
    from threadpoolctl import threadpool_limits

    from daskllm.io.checkpoint import Checkpoint
    from daskllm.parallel.local_mesh import InProcessReplica
    from daskllm.parallel.mesh import Mesh
    threadpool_limits(2)
    replica = InProcessReplica(Checkpoint(path), Mesh(), timeout=600)
    runner = replica.runners[0]
    step, computes = runner.step, []

    def timed(work):
        t0 = time.perf_counter()
        try:
            return step(work)
        finally:
            computes.append(time.perf_counter() - t0)
    runner.step = timed
    rng = np.random.default_rng(0)
    out = {}
    for batch in batches:
        prompts = [rng.integers(3, 32000, 8).tolist() for _ in range(batch)]
        replica.generate(prompts, 3)                                       # warm up
        computes.clear()
        replica.generate(prompts, steps + 1)
        out[batch] = float(np.median(computes[1:]))                        # the decode steps
    replica.close()
    print(json.dumps(out))


def model_table(baseline, batches, steps, rounds):
    with tempfile.TemporaryDirectory(prefix="daskllm-few-") as tmp:
        model = Path(tmp) / "model"
        random_llama(model, **LLAMA_207M, max_position=steps + 64)
        trees = {"this checkout": HERE.parent}
        if baseline:
            tree = Path(tmp) / "baseline"
            subprocess.run(["git", "-C", str(HERE.parent), "worktree", "add", "--detach", str(tree), baseline],
                           check=True, capture_output=True)
            trees[f"baseline {baseline}"] = tree
        try:
            results = {name: [] for name in trees}
            for _ in range(rounds):
                for name, tree in trees.items():
                    env = {**os.environ, "PYTHONPATH": str(tree)}
                    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import few_rows; "
                            f"few_rows.model_child({str(model)!r}, {batches!r}, {steps})")
                    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                          check=True, cwd=tree)
                    results[name].append({int(k): v for k, v in json.loads(done.stdout.splitlines()[-1]).items()})
                print("  round: " + "; ".join(f"{n}: " + ", ".join(f"B={b} {r[-1][b] * 1e3:.1f} ms" for b in batches)
                                              for n, r in results.items()), flush=True)
        finally:
            if baseline:
                subprocess.run(["git", "-C", str(HERE.parent), "worktree", "remove", "--force", str(tree)],
                               capture_output=True)
    names = list(results)
    print("\n| sequences decoding | " + " | ".join(f"{n} ms/step" for n in names) + " | per sequence, this checkout |"
          + (" this checkout vs baseline |" if baseline else ""))
    print("| --: |" + " --: |" * (len(names) + 1 + bool(baseline)))
    for b in batches:
        med = [float(np.median([r[b] for r in results[n]])) for n in names]
        ratio = f" {np.median([a[b] / z[b] for a, z in zip(results[names[0]], results[names[1]])]):.2f}x |" \
            if baseline else ""
        print(f"| {b} | " + " | ".join(f"{m * 1e3:.1f}" for m in med) + f" | {med[0] / b * 1e3:.1f} ms |" + ratio)
    print(f"(in-process runner, 2 threads; median step over {steps} decode steps, then over {rounds} rounds in turn, "
          "each run in its own process)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="*", default=[1, 2, 3, 4, 6, 8])
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 2, 4, 8])
    parser.add_argument("--baseline", default=None, help="a git revision to compare the model rows with")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--skip-model", action="store_true")
    args = parser.parse_args(argv)
    if not args.skip_kernels:
        kernels_table(args.rows)
    if not args.skip_model:
        model_table(args.baseline, args.batches, args.steps, args.rounds)


if __name__ == "__main__":
    main()
