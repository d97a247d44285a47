"""Data parallelism throughput: dp=2 against dp=1 and against one replica with both cores.

Usage: python benchmarks/data.py [--requests 32] [--new-tokens 32] [--layers 8] [--hidden 512]

All configurations run in this one process, one after the other, on the same random Llama:
  dp=1        1 worker x 1 thread
  dp=2        2 workers x 1 thread (a replica each)
  1 x 2thr    1 worker x 2 threads (one replica batching all requests with both cores)
  limit       two independent plain processes (no Dask), each serving half of the requests
              with one replica and 1 BLAS thread through the same scheduler, at the same time:
              what two replicas can reach on this machine's shared memory bus
Each serves the same concurrent requests (submitted at once); it reports generated tokens/s
and time to first token (p50 / p95), and the ratios against dp=1 and against the limit.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from common import random_llama


def make_model(path, layers, hidden):
    return random_llama(path, layers=layers, hidden=hidden)


def run(path, dp, workers, threads, prompts, new_tokens):
    from distributed import Client, LocalCluster

    from daskllm import LLM
    with LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster, direct_to_workers=True) as client, LLM(path, dp=dp, client=client) as llm:
        llm.generate(prompts[:2], max_new_tokens=2, ignore_eos=True)              # warm-up
        start = time.monotonic()
        requests = llm.submit(prompts, max_new_tokens=new_tokens, ignore_eos=True)
        outs = [r.wait(timeout=1800) for r in requests]
        elapsed = time.monotonic() - start
        ttft = sorted(r.first_token_at - r.submitted_at for r in requests)
        tokens = sum(len(o.token_ids) for o in outs)
        return {"tok_s": tokens / elapsed, "seconds": elapsed, "ttft_p50": statistics.median(ttft),
                "ttft_p95": ttft[int(0.95 * (len(ttft) - 1))], "tokens": [o.token_ids for o in outs]}


class _LocalReplica:
    """One replica in this process, shaped as the scheduler expects (no Dask)."""

    index, last_compute = 0, 0.0

    def __init__(self, path):
        from daskllm.io.checkpoint import Checkpoint
        from daskllm.parallel.local_mesh import InProcessReplica
        from daskllm.parallel.mesh import Mesh
        self.inner = InProcessReplica(Checkpoint(path), Mesh(), timeout=1800)

    def step(self, work, release=()):
        self.inner.runners[0].release(release)
        return self.inner.runners[0].step(work)


def serve_half(path, prompts, new_tokens):
    """In a plain process with 1 BLAS thread: load, say ready, wait for go, serve, print the result."""
    from threadpoolctl import threadpool_limits

    from daskllm.engine.request import Request
    from daskllm.engine.scheduler import ReplicaEngine
    from daskllm.model.sampling import SamplingParams
    threadpool_limits(1)
    engine = ReplicaEngine(_LocalReplica(path), 10 ** 9, 4096, on_lost=None)
    engine.replica.step([], [])
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.monotonic()
    requests = [Request(p, SamplingParams(), new_tokens) for p in prompts]
    for r in requests:
        engine.submit(r)
    outs = [r.wait(timeout=1800) for r in requests]
    elapsed = time.monotonic() - start
    engine.close()
    print(json.dumps({"seconds": elapsed, "ttft": [r.first_token_at - start for r in requests],
                      "tokens": [o.token_ids for o in outs]}), flush=True)


def run_limit(path, prompts, new_tokens):
    """Two plain processes, half of the requests each, started together once both are loaded."""
    halves = [prompts[0::2], prompts[1::2]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, "--serve-half", path, json.dumps(h), str(new_tokens)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env) for h in halves]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    results = [json.loads(p.stdout.readline()) for p in procs]
    for p in procs:
        p.wait(timeout=60)
    elapsed = max(r["seconds"] for r in results)
    ttft = sorted(t for r in results for t in r["ttft"])
    tokens = [None] * len(prompts)
    tokens[0::2], tokens[1::2] = results[0]["tokens"], results[1]["tokens"]
    return {"tok_s": sum(map(len, tokens)) / elapsed, "seconds": elapsed, "ttft_p50": statistics.median(ttft),
            "ttft_p95": ttft[int(0.95 * (len(ttft) - 1))], "tokens": tokens}


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-half":
        return serve_half(sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    args = parser.parse_args()
    import numpy as np
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 8000, int(rng.integers(16, 64))).tolist() for _ in range(args.requests)]
    limit = "limit: 2 plain processes x 1 thread"
    with tempfile.TemporaryDirectory() as d:
        n_params = make_model(d, args.layers, args.hidden)
        rows = [("dp=1 (1 worker x 1 thread)", 1, 1, 1), ("dp=2 (2 workers x 1 thread)", 2, 2, 1),
                ("1 replica (1 worker x 2 threads)", 1, 1, 2)]
        results = {name: run(d, dp, w, t, prompts, args.new_tokens) for name, dp, w, t in rows}
        results[limit] = run_limit(d, prompts, args.new_tokens)
    base, top = results[rows[0][0]], results[limit]
    same = all(r["tokens"] == base["tokens"] for r in results.values())
    print(f"\nrandom Llama {n_params / 1e6:.0f}M params, {args.requests} concurrent requests, "
          f"{args.new_tokens} new tokens each, prompts 16-63 tokens; greedy tokens identical across rows: {same}\n")
    print(f"| {'configuration':<36} | tokens/s | vs dp=1 | vs limit | wall s | TTFT p50 s | TTFT p95 s |")
    print(f"| {'-' * 36} | -------: | ------: | -------: | -----: | ---------: | ---------: |")
    for name in [r[0] for r in rows] + [limit]:
        r = results[name]
        print(f"| {name:<36} | {r['tok_s']:8.1f} | {r['tok_s'] / base['tok_s']:6.2f}x | "
              f"{r['tok_s'] / top['tok_s']:7.2f}x | {r['seconds']:6.2f} | {r['ttft_p50']:10.2f} | {r['ttft_p95']:10.2f} |")


if __name__ == "__main__":
    main()
