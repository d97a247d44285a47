"""Single-rank decode of the same model by the code of several git revisions, side by side.

Run: python benchmarks/decode_history.py                       (main's history: see REVISIONS)
     python benchmarks/decode_history.py --revs 25c57b3,HEAD --dtype int8 --threads 1

Each revision's `daskllm/` is extracted with `git archive` into a temporary directory and
loaded in a process of its own (InProcessReplica's rank runner, BLAS and numba on --threads
threads), all on one random Llama checkpoint written by this tree's code (the issue-10 model:
hidden 1024, 12 layers, 16/8 heads, MLP 2816, vocab 32000). The processes stay up and take
turns, the order reversed every other round; each round times --steps greedy decode steps
one by one (runner.step, after a 16-token prompt). Figures: the median over rounds of each
round's median step (wall), the fastest round, and the median CPU time of a step (process
time: on a shared machine it moves less than wall time when the process waits for a core).
A revision older than a dtype (issue 11) can only run float32.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import random_llama  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# 25c57b3: the reference benchmark's 0.57 of the bound; c72e01d: issue 10 (rank tuning),
# before issue 11's kernels; HEAD: this tree's commit.
REVISIONS = "25c57b3,c72e01d,HEAD"


def serve(code, path, dtype, threads, steps):
    """In a child: load `path` with the daskllm at `code`, then time `steps` steps per stdin line."""
    sys.path.insert(0, code)
    from threadpoolctl import threadpool_limits
    threadpool_limits(threads)
    from daskllm.io.checkpoint import Checkpoint
    from daskllm.model.runner import Work
    from daskllm.parallel.local_mesh import InProcessReplica
    from daskllm.parallel.mesh import Mesh
    options = {}
    if dtype != "float32":
        from daskllm import kernels
        kernels.set_threads(threads)
        options = {"options": {"dtype": dtype}}
    replica = InProcessReplica(Checkpoint(path), Mesh(), timeout=600, **options)
    runner = replica.runners[0]
    replica.close()                                   # its thread pool; the runner stays
    prompt = tuple(range(100, 116))
    print("ready", flush=True)
    for _ in sys.stdin:
        tok = runner.step([Work(0, prompt, 0)])[0]
        wall, cpu = [], []
        for i in range(steps):
            t0, c0 = time.perf_counter(), time.process_time()
            tok = runner.step([Work(0, (tok,), len(prompt) + i, counter=i + 1)])[0]
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        runner.release([0])
        print(json.dumps({"wall": statistics.median(wall), "cpu": statistics.median(cpu)}), flush=True)


def extract(rev: str, into: Path) -> Path:
    """`daskllm/` of git revision `rev` under into/<rev>."""
    dest = into / rev
    dest.mkdir()
    archive = subprocess.run(["git", "archive", rev, "daskllm"], cwd=ROOT, check=True, capture_output=True).stdout
    tar = into / f"{rev}.tar"
    tar.write_bytes(archive)
    with tarfile.open(tar) as t:
        t.extractall(dest, filter="data")
    return dest


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--revs", default=REVISIONS, help="comma-separated git revisions")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--serve", nargs=2, metavar=("CODE", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve(*args.serve, args.dtype, args.threads, args.steps)
    revs = args.revs.split(",")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}   # each child its own daskllm
    with tempfile.TemporaryDirectory(prefix="daskllm-history-") as tmp:
        tmp = Path(tmp)
        ckpt = tmp / "model"
        params = random_llama(ckpt, layers=12, hidden=1024, heads=16, kv_heads=8, vocab=32000,
                              intermediate=2816, max_position=2048)
        procs = {}
        try:
            for rev in revs:
                cmd = [sys.executable, __file__, "--serve", str(extract(rev, tmp)), str(ckpt), "--dtype", args.dtype,
                       "--threads", str(args.threads), "--steps", str(args.steps)]
                procs[rev] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
                if procs[rev].stdout.readline().strip() != "ready":
                    raise RuntimeError(f"revision {rev} did not load the model (exit status {procs[rev].wait()})")
            results = {rev: [] for rev in revs}
            for r in range(args.rounds):
                for rev in (revs if r % 2 == 0 else revs[::-1]):
                    procs[rev].stdin.write("go\n")
                    procs[rev].stdin.flush()
                    results[rev].append(json.loads(procs[rev].stdout.readline()))
        finally:
            for p in procs.values():
                p.stdin.close()
                p.wait(timeout=60)
    print(f"random Llama {params / 1e6:.0f}M parameters, {args.dtype}, {args.threads} threads, "
          f"{args.rounds} rounds x {args.steps} decode steps")
    print("| revision | decode ms/step | fastest round | CPU ms/step |")
    print("| :-- | --: | --: | --: |")
    for rev, rounds in results.items():
        print(f"| {rev} | {statistics.median(x['wall'] for x in rounds) * 1e3:.2f} | "
              f"{min(x['wall'] for x in rounds) * 1e3:.2f} | {statistics.median(x['cpu'] for x in rounds) * 1e3:.2f} |")


if __name__ == "__main__":
    main()
