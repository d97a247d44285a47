"""How a rank waits, as shipped and as before, in one LLM, alternating:
- for the driver's next step: polling for a millisecond, then blocking, against blocking at once
  (comm/control.py, NEXT_MESSAGE_SPIN);
- for a peer in a shared-memory collective (tp=2): giving way with sched_yield while it spins,
  against sleep(0), which only released the GIL (comm/base.py, give_way).

Run: python benchmarks/rank_waits.py            (tp=1 and tp=2 on the 207M random Llama; ~6 minutes)
     python benchmarks/rank_waits.py --tp 2 --rounds 4

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
from common import LLAMA_207M, random_llama  # noqa: E402


def _set_waits(spin_seconds, collective_yield):
    """In a worker: how its rank waits for the next step, and for a peer in a collective."""
    import time

    import daskllm.comm.control as control
    import daskllm.comm.shared as shared
    from daskllm.comm.base import give_way
    control.NEXT_MESSAGE_SPIN = spin_seconds
    shared.give_way = give_way if collective_yield else (lambda: time.sleep(0))


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
    rows = {1: {"polls, then blocks (shipped)": (NEXT_MESSAGE_SPIN, True), "blocks at once": (0.0, True)},
            2: {"polls, then blocks; sched_yield in collectives (shipped)": (NEXT_MESSAGE_SPIN, True),
                "blocks at once": (0.0, True),
                "polls, then blocks; sleep(0) in collectives": (NEXT_MESSAGE_SPIN, False)}}
    with tempfile.TemporaryDirectory(prefix="daskllm-control-") as tmp:
        params = random_llama(tmp, **{**LLAMA_207M, "layers": args.layers}, max_position=args.steps + 64)
        print(f"random Llama: {params / 1e6:.0f}M parameters, float32; 2 cores")
        print("\n| tp | how a rank waits | control path/step | vs shipped | rank compute | vs shipped |")
        print("| --: | :-- | --: | --: | --: | --: |")
        for tp in args.tp:
            with LocalCluster(n_workers=tp, threads_per_worker=2 // tp, processes=True, dashboard_address=None,
                              host="127.0.0.1") as cluster, Client(cluster, direct_to_workers=True) as client, \
                    LLM(tmp, tp=tp, client=client) as llm:
                waits = rows[min(tp, 2)]
                results = {name: [] for name in waits}
                for _ in range(args.rounds):
                    for name, (spin, collective_yield) in waits.items():
                        client.run(_set_waits, spin, collective_yield)
                        results[name].append(measure(llm, list(range(5, 13)), args.steps))
                base = next(iter(results.values()))         # the shipped row
                for name, runs in results.items():
                    control, compute = np.median(np.array(runs), axis=0)
                    ratios = [np.median([r[i] / b[i] for r, b in zip(runs, base)]) for i in (0, 1)]
                    print(f"| {tp} | {name} | {control * 1e3:.3f} ms | {ratios[0]:.2f}x | {compute * 1e3:.2f} ms | "
                          f"{ratios[1]:.3f}x |", flush=True)
        print(f"(medians of {args.rounds} rounds in turn, {args.steps} decode steps each; ratios: median of each "
              "round's own ratio)")


if __name__ == "__main__":
    main()
