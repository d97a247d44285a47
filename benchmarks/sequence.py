"""Sequence parallelism on a LocalCluster: prefill time, peak memory and bytes moved against prompt length.

Run: python benchmarks/sequence.py   (about 1-3 minutes on 2 cores with the default lengths)

For sp=1 and for sp=2 with each variant (ring, allgather, ulysses), one full prefill of a
random prompt per length through `LLM(path, sp=..., sp_variant=...).logits([tokens])`.
  time      wall seconds of the call (after a short warm-up prefill)
  peak MiB  the largest peak resident memory over the workers during the call (VmHWM,
            reset before each call through /proc/self/clear_refs; ru_maxrss if that fails)
  KiB/layer bytes each sp rank sent over its sp communicator, per layer (mean over ranks),
            against the analytic volume of the variant (float32, prefill from position 0):
              ring, allgather  (p-1) * T/p * (2 Hkv hd * 4 + 8)     K/V blocks + positions
              ulysses          (p-1)/p * T/p * (2 H hd + 2 Hkv hd) * 4 + (p-1) * T/p * 8
            plus, once per call, the output gather (p-1) * T/p * D * 4 spread over the layers.
The model is a golden fixture copied with a longer context (its weights are position-free);
attention scores are (H, T, T) on one rank, so memory grows with T^2 at sp=1.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("ring", "allgather", "ulysses")


def reset_peak():
    """Reset this process's peak resident memory (Linux); True if it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def read_peak():
    """Peak resident bytes of this process since the last reset (or since start)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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
    return layer + (p - 1) * n * cfg.hidden_size * 4 / n_layers


def sent_per_layer(llm, n_layers: int) -> float:
    stats = llm.comm_stats()
    sent = [sum(op["bytes_sent"] for op in s.get("sp", {}).values()) for s in stats]
    return float(np.mean(sent)) / n_layers if sent else 0.0


def run(client, path, sp, variant, lengths, rng):
    from daskllm import LLM
    rows = []
    with LLM(str(path), sp=sp, sp_variant=variant, client=client) as llm:
        cfg = llm.config
        llm.logits([rng.integers(3, cfg.vocab_size, 64).tolist()])           # warm-up
        for t in lengths:
            tokens = rng.integers(3, cfg.vocab_size, t).tolist()
            llm.reset_stats()
            client.run(reset_peak)
            start = time.perf_counter()
            llm.logits([tokens])
            seconds = time.perf_counter() - start
            peak = max(client.run(read_peak).values())
            rows.append((t, sp, variant if sp > 1 else "-", seconds, peak / 2**20,
                         sent_per_layer(llm, cfg.n_layers) / 1024,
                         analytic_per_layer(cfg, variant, sp, t, cfg.n_layers) / 1024))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192],
                        help="prompt lengths, ascending (default: 1024 2048 4096 8192)")
    parser.add_argument("--model", default="llama_mha_tied",
                        help="golden fixture family to copy (default: llama_mha_tied, 4 KV heads)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--sp", type=int, default=2, help="sequence-parallel ranks to compare with sp=1")
    args = parser.parse_args(argv)

    from distributed import Client, LocalCluster

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp, \
            LocalCluster(n_workers=args.sp, threads_per_worker=1, processes=True,
                         dashboard_address=None) as cluster, \
            Client(cluster, direct_to_workers=True) as client:
        path = long_context_copy(args.model, 2 * max(args.lengths), Path(tmp))
        rows = run(client, path, 1, "ring", args.lengths, rng)
        for variant in args.variants:
            rows += run(client, path, args.sp, variant, args.lengths, rng)

    print(f"model {args.model} (copied, longer context); peak = max over workers; KiB sent per sp rank per layer")
    print(f"{'tokens':>7} {'sp':>3} {'variant':>9} {'time s':>8} {'peak MiB':>9} {'KiB/layer':>10} {'analytic':>9}")
    for t, sp, variant, seconds, peak, sent, analytic in sorted(rows, key=lambda r: (r[0], r[1], r[2])):
        print(f"{t:>7} {sp:>3} {variant:>9} {seconds:>8.3f} {peak:>9.0f} {sent:>10.1f} {analytic:>9.1f}")


if __name__ == "__main__":
    main()
