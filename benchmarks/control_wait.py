"""How a rank waits for the driver's next step: polling for a millisecond, then blocking, against
blocking at once (comm/control.py, NEXT_MESSAGE_SPIN), in one LLM, alternating.

Run: python benchmarks/control_wait.py            (tp=1 and tp=2 on the 207M random Llama; ~5 minutes)
     python benchmarks/control_wait.py --tp 2 --rounds 4

Per row and round: 32 decode steps of one sequence. Control path: the engine's loop turn minus
the slowest rank's compute, median over the steps (as benchmarks/dask_tax.py); rank compute:
the slowest rank's runner.step, median. Ratios: median over the rounds of each round's own ratio.
"""
import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import random_llama  # noqa: E402


def _set_spin(seconds):
    import daskllm.comm.control as control
    control.NEXT_MESSAGE_SPIN = seconds


def measure(llm, tokens, steps) -> tuple:
    engine = llm.router.engines[0]
    llm.generate([tokens], max_new_tokens=3, ignore_eos=True)           # warm up
    engine.step_log.clear()
    llm.generate([tokens], max_new_tokens=steps + 1, ignore_eos=True)
    log = list(engine.step_log)[1:]                                     # the decode steps
    return float(np.median([t - c for t, c in log])), float(np.median([c for _, c in log]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)

    from distributed import Client, LocalCluster

    from daskllm import LLM
    from daskllm.comm.control import NEXT_MESSAGE_SPIN
    waits = {"polls, then blocks": NEXT_MESSAGE_SPIN, "blocks at once": 0.0}
    with tempfile.TemporaryDirectory(prefix="daskllm-control-") as tmp:
        params = random_llama(tmp, layers=args.layers, hidden=1024, heads=16, kv_heads=8, vocab=32000,
                              intermediate=2816, max_position=args.steps + 64)
        print(f"random Llama: {params / 1e6:.0f}M parameters, float32; 2 cores")
        print("\n| tp | the rank between steps | control path/step | vs blocking | rank compute | vs blocking |")
        print("| --: | :-- | --: | --: | --: | --: |")
        for tp in args.tp:
            with LocalCluster(n_workers=tp, threads_per_worker=2 // tp, processes=True, dashboard_address=None,
                              host="127.0.0.1") as cluster, Client(cluster, direct_to_workers=True) as client, \
                    LLM(tmp, tp=tp, client=client) as llm:
                results = {name: [] for name in waits}
                for _ in range(args.rounds):
                    for name, seconds in waits.items():
                        client.run(_set_spin, seconds)
                        results[name].append(measure(llm, list(range(5, 13)), args.steps))
                base = results["blocks at once"]
                for name, runs in results.items():
                    control, compute = np.median(np.array(runs), axis=0)
                    ratios = [np.median([r[i] / b[i] for r, b in zip(runs, base)]) for i in (0, 1)]
                    print(f"| {tp} | {name} | {control * 1e3:.3f} ms | {ratios[0]:.2f}x | {compute * 1e3:.2f} ms | "
                          f"{ratios[1]:.3f}x |", flush=True)
        print(f"(medians of {args.rounds} rounds in turn, {args.steps} decode steps each; ratios: median of each "
              "round's own ratio)")


if __name__ == "__main__":
    main()
