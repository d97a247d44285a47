"""Data parallelism throughput: dp=2 against dp=1 and against one replica with both cores.

Usage: python benchmarks/data.py [--requests 32] [--new-tokens 32] [--layers 8] [--hidden 512]

All configurations run in this one process, one after the other, on the same random Llama:
  dp=1        1 worker x 1 thread
  dp=2        2 workers x 1 thread (a replica each)
  1 x 2thr    1 worker x 2 threads (one replica batching all requests with both cores)
Each serves the same concurrent requests (submitted at once); it reports generated tokens/s
and time to first token (p50 / p95), and the ratios against dp=1.
"""
from __future__ import annotations

import argparse
import statistics
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    args = parser.parse_args()
    import numpy as np
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 8000, int(rng.integers(16, 64))).tolist() for _ in range(args.requests)]
    with tempfile.TemporaryDirectory() as d:
        n_params = make_model(d, args.layers, args.hidden)
        rows = [("dp=1 (1 worker x 1 thread)", 1, 1, 1), ("dp=2 (2 workers x 1 thread)", 2, 2, 1),
                ("1 replica (1 worker x 2 threads)", 1, 1, 2)]
        results = {name: run(d, dp, w, t, prompts, args.new_tokens) for name, dp, w, t in rows}
    base = results[rows[0][0]]
    same = all(r["tokens"] == base["tokens"] for r in results.values())
    print(f"\nrandom Llama {n_params / 1e6:.0f}M params, {args.requests} concurrent requests, "
          f"{args.new_tokens} new tokens each, prompts 16-63 tokens; greedy tokens identical across rows: {same}\n")
    print(f"| {'configuration':<34} | tokens/s | vs dp=1 | wall s | TTFT p50 s | TTFT p95 s |")
    print(f"| {'-' * 34} | -------: | ------: | -----: | ---------: | ---------: |")
    for name, *_ in rows:
        r = results[name]
        print(f"| {name:<34} | {r['tok_s']:8.1f} | {r['tok_s'] / base['tok_s']:6.2f}x | {r['seconds']:6.2f} | "
              f"{r['ttft_p50']:10.2f} | {r['ttft_p95']:10.2f} |")


if __name__ == "__main__":
    main()
