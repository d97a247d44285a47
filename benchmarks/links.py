"""tp=2, pp=2 and dp=2 across hosts on slow links: bytes per token, decode step time, tokens/s.

Three hosts are network namespaces on one machine (cluster/testbed.py), each with its own sshd;
cluster/ssh.sh (dask ssh) starts the scheduler on h1 and one worker (1 thread) per host, and
`tc netem` shapes every host's link in turn. Needs root, iproute2, openssh-server and paramiko.

Run: python benchmarks/links.py [--tokens 32] [--layers 4] [--hidden 512]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "cluster"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

LINKS = [("veth, no shaping", None, None), ("1 Gbit/s, 0.2 ms", "1gbit", "0.2ms"), ("100 Mbit/s, 1 ms", "100mbit", "1ms")]
MESHES = [("tp=2", {"tp": 2}), ("pp=2", {"pp": 2}), ("dp=2", {"dp": 2})]


def _rank_bytes(llm) -> int:
    return sum(op["bytes_sent"] for rank in llm.comm_stats() for axis in rank.values() for op in axis.values())


def _calls(llm) -> int:
    return max((sum(op["calls"] for axis in rank.values() for op in axis.values()) for rank in llm.comm_stats()),
               default=0)


def measure(llm, bed, prompts, tokens) -> dict:
    """Two requests side by side: decode step time from t(1 + tokens) - t(1), bytes on the wire."""
    llm.generate(prompts, max_new_tokens=4, ignore_eos=True)                     # warm up
    start = time.perf_counter()
    llm.generate(prompts, max_new_tokens=1, ignore_eos=True)
    t1 = time.perf_counter() - start
    llm.reset_stats()
    wire0 = sum(bed.rx_bytes(h) for h in range(1, bed.n + 1))
    start = time.perf_counter()
    llm.generate(prompts, max_new_tokens=1 + tokens, ignore_eos=True)
    tn = time.perf_counter() - start
    wire = sum(bed.rx_bytes(h) for h in range(1, bed.n + 1)) - wire0
    made = len(prompts) * (1 + tokens)
    return {"step_ms": 1000 * (tn - t1) / tokens, "tok_s": made / tn, "rank_b": _rank_bytes(llm) / made,
            "wire_b": wire / made, "calls_per_step": _calls(llm) / (1 + tokens)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32, help="decode steps measured (default 32)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    args = parser.parse_args()

    import testbed
    from common import random_llama

    from daskllm import LLM
    missing = testbed.missing_tools()
    if missing:
        print(f"links.py needs: {', '.join(missing)}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp, testbed.Testbed(3) as bed:
        params = random_llama(tmp, layers=args.layers, hidden=args.hidden, vocab=8000)
        print(f"random Llama: {params / 1e6:.1f}M parameters, hidden {args.hidden}, {args.layers} layers; "
              f"2 requests x {args.tokens} decode steps; workers 1 thread each; os.cpu_count()={os.cpu_count()}")
        client = bed.launch(threads=1, timeout=120)
        prompts = [[3 + i for i in range(16)], [40 + i for i in range(16)]]
        rows = []
        try:
            for link, rate, delay in LINKS:
                applied = bed.shape(rate, delay)
                print(f"{link}: {applied}")
                for name, mesh in MESHES:
                    with LLM(tmp, client=client, **mesh) as llm:
                        rows.append((link, name, measure(llm, bed, prompts, args.tokens) | {"applied": applied,
                                                                                           "delay": delay}))
                    r = rows[-1][2]
                    print(f"  {link:18} {name}: {r['step_ms']:.1f} ms/step, {r['tok_s']:.1f} tok/s", file=sys.stderr)
        finally:
            bed.shape(None, None)
            client.close()
    base = {name: r["tok_s"] for link, name, r in rows if link == LINKS[0][0]}
    print("\n| link | mesh | rank-to-rank bytes/token | wire bytes/token | collectives/step | decode step ms "
          "| tokens/s | vs no shaping | step ms + delay (estimate) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for link, name, r in rows:
        # Where the kernel has no netem the delay was not applied: each collective of a step
        # waits one one-way delay at least (both ranks send at once), and the ranks' answers to
        # the driver one more: add (calls + 1) x delay.
        estimate = ""
        if r["delay"] and "no delay" in r["applied"]:
            estimate = f"{r['step_ms'] + (r['calls_per_step'] + 1) * float(r['delay'].rstrip('ms')):.1f}"
        print(f"| {link} | {name} | {r['rank_b']:.0f} | {r['wire_b']:.0f} | {r['calls_per_step']:.0f} | "
              f"{r['step_ms']:.1f} | {r['tok_s']:.1f} | {r['tok_s'] / base[name]:.2f}x | {estimate} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
