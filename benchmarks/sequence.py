"""Sequence parallelism on a LocalCluster: prefill time, peak memory and bytes moved against prompt length.

Run: python benchmarks/sequence.py [--lengths ...] [--sp 2 4]   (about 10 minutes on 2 cores)

sp=1 is the single-rank path with both cores (1 worker x 2 threads); sp=N runs N workers x
1 thread (N=4 oversubscribes the 2 cores). For each length, one prefill of a random prompt
plus one sampled token, `LLM(path, sp=..., sp_variant=...).generate([tokens], max_new_tokens=1)`:
  time        wall seconds of the call (after a short warm-up)
  peak MiB    the largest peak resident memory over the workers during the call (VmHWM,
              reset before each call through /proc/self/clear_refs; ru_maxrss if that fails)
  prompt MiB  peak minus the worker's resident memory just before the call: what the prompt
              costs (KV cache, activations, attention tiles), without the replicated weights
  KiB/layer   bytes each sp rank sent over its sp communicator, per layer (mean over ranks),
              against the analytic volume of the variant (float32, prefill from position 0):
                ring, allgather  (p-1) * T/p * (2 Hkv hd * 4 + 8)     K/V blocks + positions
                ulysses          (p-1)/p * T/p * (2 H hd + 2 Hkv hd) * 4 + (p-1) * T/p * 8
              (the gather of the last token's hidden row, a few KiB, is left out).
The model is a random Llama (hidden 512, 8 layers, 8 heads, 4 KV heads) written on the fly,
or a golden fixture copied with a longer context (--model FAMILY).
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from common import peak_memory, random_llama, reset_peak_memory, resident_memory

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("ring", "allgather", "ulysses")


def long_context_copy(family: str, max_position: int, root: Path) -> Path:
    path = root / family
    shutil.copytree(ROOT / "tests" / "fixtures" / "golden" / family, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["max_position_embeddings"] = max_position
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def analytic_per_layer(cfg, variant: str, p: int, t: int, n_layers: int) -> float:
    """Bytes one sp rank sends per layer in a prefill of t tokens (see the module docstring)."""
    if p == 1:
        return 0.0
    n, hd, h, kv = t / p, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    if variant == "ulysses":
        layer = (p - 1) / p * n * (2 * h * hd + 2 * kv * hd) * 4 + (p - 1) * n * 8
    else:
        layer = (p - 1) * n * (2 * kv * hd * 4 + 8)
    return layer


def sent_per_layer(llm, n_layers: int) -> float:
    stats = llm.comm_stats()
    sent = [sum(op["bytes_sent"] for op in s.get("sp", {}).values()) for s in stats]
    return float(np.mean(sent)) / n_layers if sent else 0.0


def run(path, sp, variant, t, threads):
    """One prefill of t tokens on a fresh cluster (so peak memory is this prompt's alone)."""
    import dask
    from distributed import Client, LocalCluster

    from daskllm import LLM
    rng = np.random.default_rng(t)
    # One step per prefill on every configuration, so the volumes compare with the analytic ones.
    with dask.config.set({"daskllm.max-batch-tokens": t}), \
            LocalCluster(n_workers=sp, threads_per_worker=threads, processes=True, dashboard_address=None) as cluster, \
            Client(cluster, direct_to_workers=True) as client, \
            LLM(str(path), sp=sp, sp_variant=variant, client=client) as llm:
        cfg = llm.config
        llm.generate([rng.integers(3, cfg.vocab_size, 64).tolist()], max_new_tokens=1)   # warm-up
        tokens = rng.integers(3, cfg.vocab_size, t).tolist()
        llm.reset_stats()
        resident = client.run(resident_memory)                              # weights + runtime, no prompt
        client.run(reset_peak_memory)
        start = time.perf_counter()
        llm.generate([tokens], max_new_tokens=1, ignore_eos=True)         # a prefill, then one sampled token
        seconds = time.perf_counter() - start
        peaks = client.run(peak_memory)
        return (t, sp, variant if sp > 1 else "-", seconds, max(peaks.values()) / 2**20,
                max(peaks[w] - resident[w] for w in peaks) / 2**20, sent_per_layer(llm, cfg.n_layers) / 1024,
                analytic_per_layer(cfg, variant, sp, t, cfg.n_layers) / 1024)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384],
                        help="prompt lengths, ascending (default: 1024 .. 16384)")
    parser.add_argument("--model", default="random",
                        help="'random' (a random Llama: hidden 512, 8 layers, 8 heads, 4 KV heads) or a "
                             "golden fixture family to copy with a longer context")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--sp", type=int, nargs="+", default=[2, 4],
                        help="sequence-parallel sizes to compare with sp=1 (default: 2 4; 4 is oversubscribed)")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "random":
            path = Path(tmp) / "random"
            random_llama(path, layers=8, hidden=512, heads=8, kv_heads=4, max_position=2 * max(args.lengths))
        else:
            path = long_context_copy(args.model, 2 * max(args.lengths), Path(tmp))
        # sp=1 is the single-rank path with both cores (1 worker x 2 threads); sp=N uses N workers x 1 thread.
        for t in args.lengths:
            for sp, threads in [(1, 2)] + [(p, 1) for p in args.sp]:
                for variant in (["ring"] if sp == 1 else args.variants):
                    rows.append(run(path, sp, variant, t, threads))
                    print(*rows[-1][:4], flush=True)

    base = {r[0]: r for r in rows if r[1] == 1}
    print(f"model {args.model}; sp=1: 1 worker x 2 threads, sp=N: N workers x 1 thread; peak = max over workers;")
    print("prompt MiB = peak minus the resident memory before the prompt (weights, runtime);")
    print("KiB sent per sp rank per layer against the analytic volume of the variant\n")
    print(f"| {'tokens':>6} | {'sp':>2} | {'variant':>9} | {'time s':>7} | {'vs sp=1':>7} | {'peak MiB':>8} | "
          f"{'vs sp=1':>7} | {'prompt MiB':>10} | {'vs sp=1':>7} | {'KiB/layer':>9} | {'analytic':>8} |")
    print("| -----: | -: | --------: | ------: | ------: | -------: | ------: | ---------: | ------: | --------: | -------: |")
    for t, sp, variant, seconds, peak, prompt, sent, analytic in sorted(rows, key=lambda r: (r[0], r[1], r[2])):
        b = base[t]
        print(f"| {t:>6} | {sp:>2} | {variant:>9} | {seconds:>7.2f} | {seconds / b[3]:>6.2f}x | {peak:>8.0f} | "
              f"{peak / b[4]:>6.2f}x | {prompt:>10.0f} | {prompt / b[5]:>6.2f}x | {sent:>9.1f} | {analytic:>8.1f} |")


if __name__ == "__main__":
    main()
