"""The Dask tax: a rank inside a Dask worker against the same runner in this process.

Run: python benchmarks/dask_tax.py             (the 207M random Llama of issue 10; ~4 minutes quiet)
     python benchmarks/dask_tax.py --layers 2 --rounds 1  (a quick run)
     python benchmarks/dask_tax.py --micro     (the control path's parts alone, seconds)

Rows, each on its own fresh LocalCluster, one after the other, all of them --rounds times in turn:
- in-process: the rank's runner (InProcessReplica) in this process, 2 BLAS threads;
- LLM at one rank (1 worker x 2 threads) as daskllm runs it now (rank tuning, Dask's fast timers
  slowed, control connection); with Dask's timers as they are (daskllm.quiet-dask off); and with
  all of those turned off (the nanny's malloc setting, Dask's timers, actor calls);
- tp=2 (2 workers x 1 thread), control connection and actor calls;
- both with runs of 4 decode steps per message (daskllm.decode-steps=4; the default "auto"
  runs as many as fit in 50 ms, so 1 at this model's ~40 ms steps);
- tp=2 with its all-reduces over TCP instead of shared memory (daskllm.shared-memory off).
Prefill: a 512-token prompt and one sampled token. Decode: (t(1 + K tokens) - t(1 token)) / K.
Rank compute: the slowest rank's time inside `runner.step` per decode step (per-rank stats).
Control path per step: the engine's loop turn minus the slowest rank's compute in it, median
over the decode steps (all the driver, Dask and socket time a step costs beyond the model).
Empty step: `Replica.step` with no work, the control path's floor (messages only).
Host steal: the share of this VM's CPU time the hypervisor gave to others while the row ran
(/proc/stat), the noise a row's own figures cannot show.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import random_llama  # noqa: E402


class InProcess:
    name = "in-process runner (2 threads)"

    def __init__(self, path, **_):
        from threadpoolctl import threadpool_limits

        from daskllm.io.checkpoint import Checkpoint
        from daskllm.parallel.local_mesh import InProcessReplica
        from daskllm.parallel.mesh import Mesh
        self._limits = threadpool_limits(2)
        self.replica = InProcessReplica(Checkpoint(path), Mesh(), timeout=600)
        runner = self.replica.runners[0]
        step = runner.step

        def timed(work):                     # compute of each step, as a rank reports it
            t0 = time.perf_counter()
            try:
                return step(work)
            finally:
                self.computes.append(time.perf_counter() - t0)
        runner.step = timed
        self.computes = []

    def generate(self, prompt, n):
        self.computes.clear()
        return self.replica.generate([prompt], n)[0]

    def control(self):
        return None

    def empty_step(self):
        return None

    def close(self):
        self.replica.close()
        self._limits.restore_original_limits()


class Cluster:
    def __init__(self, path, tp, threads, control, tuning, name, decode_steps="auto", shared_memory=True,
                 quiet=True):
        import dask
        from distributed import Client, LocalCluster

        from daskllm import LLM
        self.name = name
        self.cluster = LocalCluster(n_workers=tp, threads_per_worker=threads, processes=True,
                                    dashboard_address=None, host="127.0.0.1")
        self.client = Client(self.cluster, direct_to_workers=True)
        with dask.config.set({"daskllm.control": control, "daskllm.rank-tuning": tuning,
                              "daskllm.decode-steps": decode_steps, "daskllm.shared-memory": shared_memory,
                              "daskllm.quiet-dask": quiet}):
            self.llm = LLM(str(path), tp=tp, client=self.client)
        self.engine = self.llm.router.engines[0]
        self.computes = []

    def generate(self, prompt, n):
        self.engine.step_log.clear()
        out = self.llm.generate([prompt], max_new_tokens=n, ignore_eos=True)[0].token_ids
        log = list(self.engine.step_log)
        self.computes = [c for _, c in log]
        self.turns = [t for t, _ in log]
        return out

    def control(self):
        """Median over this run's decode steps of (loop turn - slowest rank's compute)."""
        return float(np.median([t - c for t, c in zip(self.turns[1:], self.computes[1:])]))

    def empty_step(self, n=200):
        """Median round trip of a step with no work: the control path's floor, no model, no engine."""
        replica, times = self.llm.replicas[0], []
        for _ in range(n):
            t0 = time.perf_counter()
            replica.step([], [])
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    def close(self):
        self.llm.close()
        self.client.close()
        self.cluster.close()


def over_rounds(runs, bases) -> dict:
    """One row from its rounds: each figure's median, each ratio to the in-process row the median of
    the rounds' own ratios (rows measured minutes apart drift with the host; rows of a round less)."""
    out = {k: (None if runs[0][k] is None else float(np.median([r[k] for r in runs])))
           for k in runs[0] if k != "tokens"}
    out["tokens"] = runs[0]["tokens"]
    for key in ("prefill", "step"):
        out[f"{key}_ratio"] = float(np.median([r[key] / b[key] for r, b in zip(runs, bases)]))
    return out


def cpu_ticks():
    """(all, steal) CPU ticks of this machine so far (Linux /proc/stat; (0, 0) elsewhere): time the
    hypervisor gave this VM's CPUs to others, which a row's figures cannot show by themselves."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return sum(ticks), (ticks[7] if len(ticks) > 7 else 0)


def measure(runner, short, longs, steps) -> dict:
    """Medians over the long prompts of the prefill, decode step, rank compute and control path,
    and the host's steal time over all of them (a share of the CPU time)."""
    runner.generate(short, 2)                                          # warm up
    all0, steal0 = cpu_ticks()
    runs = []
    for long in longs:
        t0 = time.perf_counter()
        runner.generate(long, 1)
        t_prefill = time.perf_counter() - t0
        prefill_compute = runner.computes[0]
        t0 = time.perf_counter()
        runner.generate(short, 1)
        t_one = time.perf_counter() - t0
        t0 = time.perf_counter()
        tokens = runner.generate(short, 1 + steps)
        t_many = time.perf_counter() - t0
        runs.append({"prefill": t_prefill, "prefill_compute": prefill_compute,
                     "step": (t_many - t_one) / steps,
                     "compute": float(np.median(runner.computes[1:])),
                     "control": runner.control()})
    med = {k: (None if runs[0][k] is None else float(np.median([r[k] for r in runs]))) for k in runs[0]}
    med["tokens"] = tokens
    all1, steal1 = cpu_ticks()
    med["steal"] = (steal1 - steal0) / max(1, all1 - all0)
    med["empty"] = runner.empty_step()
    return med


class _Instant:
    """A replica that answers at once: what the engine's loop costs by itself."""

    index, last_compute = 0, 0.0

    def step(self, work, release=()):
        return {w.seq: 5 for w in work if w.sample}


def micro(steps=2000):
    """A step message's round trip to another process, and the engine's CPU per step."""
    import subprocess

    from daskllm.comm.control import ControlLink
    from daskllm.engine.request import Request
    from daskllm.engine.scheduler import ReplicaEngine
    from daskllm.model.sampling import SamplingParams
    server = subprocess.Popen([sys.executable, __file__, "--serve-control"], stdout=subprocess.PIPE, text=True)
    link = ControlLink(("127.0.0.1", int(server.stdout.readline())), 10.0)
    message = ["step", [[7, [123], 40, True, [0.0, 0, 1.0, 12345678901], 3]], []]
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        link.send(message)
        link.recv(10.0)
        times.append(time.perf_counter() - t0)
    link.close()
    server.wait(timeout=10)
    print(f"control message round trip to another process: median {np.median(times) * 1e6:.0f} us, "
          f"p10 {np.percentile(times, 10) * 1e6:.0f} us ({steps} messages)")
    engine = ReplicaEngine(_Instant(), 10 ** 9, 4096, on_lost=None)
    for batch in (1, 8):
        requests = [Request([1, 2, 3], SamplingParams(), steps) for _ in range(batch)]
        c0 = time.process_time()
        for r in requests:
            engine.submit(r)
        for r in requests:
            r.wait(timeout=600)
        print(f"engine loop, batch {batch}: {(time.process_time() - c0) / steps * 1e6:.0f} us CPU per step")
    engine.close()


def serve_control():
    from daskllm.comm.control import ControlServer
    server = ControlServer(lambda message: ["ok", {message[1][0][0]: 5}, 0.0], accept_timeout=60)
    print(server.address[1], flush=True)
    server._thread.join()


def main(argv=None):
    if sys.argv[1:] == ["--serve-control"]:
        return serve_control()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2,
                        help="times every row runs, the rows in turn (the host's drift then hits them alike)")
    parser.add_argument("--skip-off", action="store_true", help="leave out the rows with the fixes turned off")
    parser.add_argument("--micro", action="store_true", help="only the control path's parts, no model")
    args = parser.parse_args(argv)
    if args.micro:
        return micro()

    configs = [(InProcess, {}),
               (Cluster, dict(tp=1, threads=2, control="direct", tuning=True, name="LLM 1 rank")),
               (Cluster, dict(tp=1, threads=2, control="direct", tuning=True, quiet=False,
                              name="LLM 1 rank, Dask's timers as they are")),
               (Cluster, dict(tp=1, threads=2, control="actor", tuning=False, quiet=False,
                              name="LLM 1 rank, no tuning, actor calls")),
               (Cluster, dict(tp=1, threads=2, control="direct", tuning=True, decode_steps=4,
                              name="LLM 1 rank, runs of 4 steps")),
               (Cluster, dict(tp=2, threads=1, control="direct", tuning=True, name="LLM tp=2")),
               (Cluster, dict(tp=2, threads=1, control="direct", tuning=True, decode_steps=4,
                              name="LLM tp=2, runs of 4 steps")),
               (Cluster, dict(tp=2, threads=1, control="direct", tuning=True, shared_memory=False,
                              name="LLM tp=2, all-reduces over TCP")),
               (Cluster, dict(tp=2, threads=1, control="actor", tuning=True, name="LLM tp=2, actor calls"))]
    if args.skip_off:
        configs = [c for c in configs if c[1].get("control", "direct") == "direct" and c[1].get("quiet", True)]
    rng = np.random.default_rng(0)
    short = rng.integers(3, args.vocab, 8).tolist()
    longs = [rng.integers(3, args.vocab, args.prefill).tolist() for _ in range(args.repeats)]
    with tempfile.TemporaryDirectory(prefix="daskllm-tax-") as tmp:
        params = random_llama(tmp, layers=args.layers, hidden=args.hidden, heads=args.heads,
                              kv_heads=args.kv_heads, vocab=args.vocab, intermediate=args.intermediate,
                              max_position=args.prefill + args.steps + 64)
        print(f"random Llama: {params / 1e6:.0f}M parameters, {args.layers} layers, hidden {args.hidden}, "
              f"{args.heads}/{args.kv_heads} heads, MLP {args.intermediate}, vocab {args.vocab}, float32")
        rounds = []                                          # rounds[r] = [(name, measures), ...]
        for r in range(args.rounds):
            rounds.append([])
            for cls, kw in configs:
                runner = cls(tmp, **kw)
                try:
                    rounds[-1].append((runner.name, measure(runner, short, longs, args.steps)))
                finally:
                    runner.close()
                m = rounds[-1][-1][1]
                print(f"  round {r + 1}, {runner.name}: prefill {m['prefill'] * 1e3:.0f} ms, decode "
                      f"{m['step'] * 1e3:.2f} ms/token, rank compute {m['compute'] * 1e3:.2f} ms", flush=True)
    rows = [(name, over_rounds([rnd[i][1] for rnd in rounds], [rnd[0][1] for rnd in rounds]))
            for i, (name, _) in enumerate(rounds[0])]

    base = rows[0][1]
    for name, m in rows[1:]:
        if m["tokens"] != base["tokens"]:
            print(f"WARNING: {name} generated other tokens than the in-process runner: {m['tokens']} vs {base['tokens']}")
    print(f"\n| {'path':<36} | prefill {args.prefill} | vs in-process | its compute | decode ms/token | "
          "vs in-process | rank compute | control path/step | empty step | host steal |")
    print("| :-- | --: | --: | --: | --: | --: | --: | --: | --: | --: |")
    for name, m in rows:
        control = "" if m["control"] is None else f"{m['control'] * 1e3:.2f} ms"
        empty = "" if m["empty"] is None else f"{m['empty'] * 1e3:.2f} ms"
        print(f"| {name:<36} | {m['prefill'] * 1e3:8.0f} ms | {m['prefill_ratio']:12.2f}x | "
              f"{m['prefill_compute'] * 1e3:8.0f} ms | {m['step'] * 1e3:12.2f} | "
              f"{m['step_ratio']:12.2f}x | {m['compute'] * 1e3:9.2f} ms | {control:>17} | {empty:>10} | "
              f"{m['steal']:9.1%} |")
    print(f"(medians of {args.repeats} prompts in a round, then of {args.rounds} rounds, the rows in turn; ratios: "
          f"median over the rounds of each round's own ratio; decode over {args.steps} steps; rank compute: the "
          "slowest rank's runner.step per decode step; control path: loop turn minus it, median per step; "
          "empty step: Replica.step with no work, median of 200)")
    names = [name for name, _ in rows]
    if "LLM 1 rank" in names and "LLM tp=2" in names:
        one, tp2 = names.index("LLM 1 rank"), names.index("LLM tp=2")
        for what, key in (("decode", "step"), ("prefill", "prefill")):
            print(f"tp=2 / LLM 1 rank, {what}, each round: " +
                  " ".join(f"{rnd[tp2][1][key] / rnd[one][1][key]:.2f}" for rnd in rounds))


if __name__ == "__main__":
    main()
