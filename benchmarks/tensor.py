"""Time tensor parallelism (tp=2, 2 workers x 1 thread) against one rank (1 worker x 2 threads).

Run: python benchmarks/tensor.py              (a ~300M-parameter random Llama; minutes on 2 cores)
     python benchmarks/tensor.py --layers 2   (a quick run)
     python benchmarks/tensor.py --in-process (threads in this process, no Dask: checks the script)

Writes a random Llama checkpoint (float16 on disk, float32 in memory) to a temp dir, then
for each configuration measures the 512-token prefill (generate 1 token: prefill + one
sample, no full-logit transfer) and the decode step ((t(1 + K tokens) - t(1 token)) / K).
Bytes per decoded token are rank 0's bytes sent in collectives during the decode steps, against the analytic
all-reduce payload 2 x layers x hidden x 4 bytes; "comm share" is the collectives' wall
time over the decode wall time.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import step_split  # noqa: E402
from tp_checkpoints import write_checkpoint  # noqa: E402


def _sum_stats(tree) -> tuple:
    """(bytes sent, seconds) summed over every op dict nested in a rank's stats."""
    if isinstance(tree, dict) and "bytes_sent" in tree:
        return tree["bytes_sent"], tree["seconds"]
    sent = secs = 0
    for v in (tree.values() if isinstance(tree, dict) else ()):
        s, t = _sum_stats(v)
        sent, secs = sent + s, secs + t
    return sent, secs


class Dask:
    """`daskllm.LLM` on a LocalCluster of `workers` processes x `threads` threads."""

    def __init__(self, path, tp, workers, threads, spin=0.0):
        import dask
        from distributed import Client, LocalCluster

        from daskllm import LLM
        self.cluster = LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True,
                                    dashboard_address=None, host="127.0.0.1")
        self.client = Client(self.cluster, direct_to_workers=True)
        with dask.config.set({"daskllm.comm-spin": spin}):
            self.llm = LLM(str(path), tp=tp, client=self.client)

    def generate(self, prompts, n):
        return self.llm.generate(prompts, max_new_tokens=n, ignore_eos=True)

    def comm(self):
        return _sum_stats(self.llm.comm_stats()[0])

    def mark(self):
        self.llm.router.engines[0].step_log.clear()

    def split(self):
        return step_split(self.llm)

    def close(self):
        self.client.close()
        self.cluster.close()


class InProcess:
    """The same replica as threads of this process (no Dask, one BLAS pool shared)."""

    def __init__(self, path, tp, workers, threads, spin=0.0):
        from daskllm.io.checkpoint import Checkpoint
        from daskllm.parallel.local_mesh import InProcessReplica
        from daskllm.parallel.mesh import Mesh
        self.replica = InProcessReplica(Checkpoint(path), Mesh(tp=tp), timeout=600)

    def generate(self, prompts, n):
        return self.replica.generate(prompts, n)

    def comm(self):
        return _sum_stats({axis: c.stats.as_dict() for axis, c in self.replica.comms[0].items() if c.size > 1})

    def mark(self):
        pass

    def split(self):
        return float("nan"), float("nan")

    def close(self):
        self.replica.close()


def measure(runner, vocab, prefill, steps, rng, repeats=3) -> dict:
    """Medians over `repeats` of the prefill time and of the decode step (time, bytes, comm share)."""
    short = rng.integers(3, vocab, 8).tolist()
    runner.generate([short], 2)                                       # warm up
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        runner.generate([rng.integers(3, vocab, prefill).tolist()], 1)
        t_prefill = time.perf_counter() - t0
        sent0, secs0 = runner.comm()
        t0 = time.perf_counter()
        runner.generate([short], 1)
        t_one = time.perf_counter() - t0
        sent1, secs1 = runner.comm()
        runner.mark()
        t0 = time.perf_counter()
        runner.generate([short], 1 + steps)
        t_many = time.perf_counter() - t0
        compute, control = runner.split()
        sent2, secs2 = runner.comm()
        # the decode steps alone: the longer run minus the one-token run (same prefill)
        decode_sent = (sent2 - sent1) - (sent1 - sent0)
        decode_secs = (secs2 - secs1) - (secs1 - secs0)
        t_decode = max(t_many - t_one, 1e-9)
        runs.append({"prefill": t_prefill, "step": t_decode / steps, "bytes_per_token": decode_sent / steps,
                     "comm_share": max(decode_secs, 0.0) / t_decode,
                     "compute": compute, "control": control})
    return {key: float(np.median([r[key] for r in runs])) for key in runs[0]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24, help="decoder layers (24: ~300M parameters)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill")
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed")
    parser.add_argument("--in-process", action="store_true", help="threads in this process instead of Dask")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    backend = InProcess if args.in_process else Dask
    with tempfile.TemporaryDirectory(prefix="daskllm-tp-") as tmp:
        path = write_checkpoint(tmp, hidden=args.hidden, layers=args.layers, heads=args.heads,
                                kv_heads=args.kv_heads, intermediate=args.intermediate, vocab=args.vocab,
                                max_position=args.prefill + args.steps + 16, dtype=np.float16, scale=0.02)
        params = sum(int(np.prod(s)) for s in _shapes(path).values())
        print(f"random Llama: {params / 1e6:.0f}M parameters, {args.layers} layers, hidden {args.hidden}, "
              f"{args.heads}/{args.kv_heads} heads, MLP {args.intermediate}, vocab {args.vocab}"
              f"{' (in-process threads)' if args.in_process else ''}")
        rows = []
        for name, tp, workers, threads, spin in (("1 rank (1 worker x 2 threads)", 1, 1, 2, 0.0),
                                                 ("tp=2 (2 workers x 1 thread)", 2, 2, 1, 0.0),
                                                 ("tp=2, comm-spin 200 us", 2, 2, 1, 2e-4)):
            runner = backend(path, tp, workers, threads, spin)
            try:
                rows.append((name, tp, measure(runner, args.vocab, args.prefill, args.steps, rng)))
            finally:
                runner.close()

    analytic = 2 * args.layers * args.hidden * 4
    base = rows[0][2]
    print(f"\n| {'configuration':<31} | {'prefill ' + str(args.prefill):>12} | {'ratio':>6} | {'decode step':>11} | "
          f"{'ratio':>6} | {'bytes/token':>11} | {'analytic':>8} | {'comm share':>10} | {'rank step':>12} | "
          f"{'control':>12} |")
    print("| :-- | --: | --: | --: | --: | --: | --: | --: | --: | --: |")
    for name, tp, m in rows:
        print(f"| {name:<31} | {m['prefill'] * 1e3:>9.1f} ms | {m['prefill'] / base['prefill']:>5.2f}x | "
              f"{m['step'] * 1e3:>8.2f} ms | {m['step'] / base['step']:>5.2f}x | {m['bytes_per_token']:>11.0f} | "
              f"{analytic if tp > 1 else 0:>8} | {m['comm_share']:>10.1%} | {m['compute'] * 1e3:>9.2f} ms | "
              f"{m['control'] * 1e3:>9.2f} ms |")
    print("(ratio: this configuration's time / 1 rank's, medians of 3; bytes/token: rank 0 sent, all "
          "collectives; analytic: 2 all-reduces x layers x hidden x 4 B; rank step: the slowest rank's "
          "runner.step per decode step, collectives included; control: the engine's turn minus it)")


def _shapes(path):
    from daskllm.io.checkpoint import Checkpoint
    ckpt = Checkpoint(path)
    return {n: ckpt.shape(n) for n in ckpt.entries}


if __name__ == "__main__":
    main()
