"""Time the single-rank forward (prefill and decode) against transformers and the memory-bandwidth bound.

Run: /work/golden-venv/bin/python benchmarks/reference.py   (about 3 min on 2 cores; --quick: about 1 min)

One process, one random Llama checkpoint written to a temporary directory, three
contenders measured in alternating rounds (medians over the rounds):
  daskllm in-process    InProcessReplica(Checkpoint(dir), Mesh()), BLAS limited to --threads
  daskllm LLM (cluster) LLM(dir, client=...) on a LocalCluster of 1 worker x --threads threads
  transformers          LlamaForCausalLM, float32, torch.set_num_threads(--threads)
Prefill: a full forward of --prompt tokens with logits for every position (median over rounds).
Decode: --new greedy steps with a KV cache after that prompt; ms per token is the median
over all steps of all rounds (for the cluster: the median over rounds of (time for --new + 1
tokens - time for 1) / --new, which includes the driver's per-step actor call).
Bandwidth bound: decode reads every weight once per token, except the embedding table
(one row), so tokens/s <= copy bandwidth / those bytes. Copy bandwidth is a numpy copy of
512 MiB (bytes read + written over the time), with 1 and with --threads threads; the best.
Needs torch and transformers (exits 2 without them).
"""

import argparse
import gc
import statistics
import sys
import tempfile
import threading
import time


def llama_config(hidden: int, layers: int, vocab: int) -> dict:
    """A Llama config with head dim 64, 3 query heads per KV head, MLP width ~8/3 hidden."""
    heads = max(1, hidden // 64)
    kv_heads = next(k for k in range(max(1, heads // 3), 0, -1) if heads % k == 0)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 256 * round(8 * hidden / 3 / 256),
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1, "dtype": "float32",
    }


def decode_bytes_per_token(tensors: dict, cfg: dict) -> int:
    """float32 weight bytes one decode step reads: all of them but the embedding table (one row)."""
    embed = tensors["model.embed_tokens.weight"]
    return sum(t.nbytes for t in tensors.values()) - embed.nbytes + embed[0].nbytes


def copy_bandwidth(threads: int, mib: int = 512, repeats: int = 5) -> float:
    """Bytes read + written per second by a numpy copy of `mib` MiB, split over `threads` threads."""
    import numpy as np
    src = np.ones(mib << 18, np.float32)
    dst = np.empty_like(src)
    parts = np.array_split(np.arange(src.size), threads)
    bounds = [(p[0], p[-1] + 1) for p in parts]

    def copy(lo, hi):
        np.copyto(dst[lo:hi], src[lo:hi])

    best = 0.0
    for _ in range(repeats):
        workers = [threading.Thread(target=copy, args=b) for b in bounds]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, 2 * src.nbytes / (time.perf_counter() - t0))
    return best


def read_bandwidth(threads: int, mib: int = 512, repeats: int = 5) -> float:
    """Bytes read per second by the faster of two read-only streams over `mib` MiB on `threads` threads.

    A decode step only reads its weights, and on some hosts a read-only stream runs well below
    a copy's read + written rate (AMD EPYC under KVM, 2 cores: ~20 GB/s read-only against 26-30
    GB/s copied), so this is the bound a decode step can reach. The two streams: numpy's max over
    bytes split over threads (SIMD compares), and BLAS's float32 matrix-vector product with the
    array as the matrix (hardware prefetch at its best; it writes one short vector). Both write
    nothing of note; either may be the faster on a given run.
    """
    import numpy as np
    from threadpoolctl import threadpool_limits
    src = np.ones(mib << 20, np.uint8)
    parts = np.array_split(src, threads)
    matrix = src.view(np.float32).reshape(-1, 1024)
    vector = np.ones((1, 1024), np.float32)
    best = 0.0
    for _ in range(repeats):
        workers = [threading.Thread(target=part.max) for part in parts]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, src.nbytes / (time.perf_counter() - t0))
        with threadpool_limits(threads, "blas"):
            t0 = time.perf_counter()
            vector @ matrix.T
            best = max(best, src.nbytes / (time.perf_counter() - t0))
    return best


# -- the contenders ---------------------------------------------------------------------
# Each has prefill() -> seconds, and decode(n) -> an iterator that yields seconds per
# greedy step (the cluster: one figure per run).

class InProcess:
    def __init__(self, rep, prompt):
        self.rep, self.prompt = rep, prompt

    def prefill(self):
        t0 = time.perf_counter()
        self.rep.logits([self.prompt])
        return time.perf_counter() - t0

    def decode(self, n):
        from daskllm.model.runner import Work
        token = self.rep.step([Work(0, tuple(self.prompt), 0)])[0]
        for i in range(n):
            t0 = time.perf_counter()
            token = self.rep.step([Work(0, (token,), len(self.prompt) + i, counter=i + 1)])[0]
            yield time.perf_counter() - t0
        self.rep.runners[0].release([0])


class Transformers:
    def __init__(self, model, prompt):
        import torch
        self.torch, self.model, self.ids = torch, model, torch.tensor([prompt])   # (1, T)

    def prefill(self):
        with self.torch.inference_mode():
            t0 = time.perf_counter()
            self.model(self.ids, use_cache=False)
            return time.perf_counter() - t0

    def decode(self, n):
        with self.torch.inference_mode():
            out = self.model(self.ids, use_cache=True, logits_to_keep=1)
        for _ in range(n):
            with self.torch.inference_mode():
                t0 = time.perf_counter()
                token = out.logits[:, -1].argmax(-1, keepdim=True)                  # (1, 1)
                out = self.model(token, cache=out["cache"], use_cache=True)
                yield time.perf_counter() - t0


class Cluster:
    """LLM(dir, client=...): decode per token = (time for n + 1 tokens - time for 1) / n."""

    def __init__(self, llm, prompt):
        self.llm, self.prompt = llm, prompt

    def prefill(self):
        t0 = time.perf_counter()
        self.llm.logits([self.prompt])
        return time.perf_counter() - t0

    def decode(self, n):
        timed = []
        for count in (1, n + 1):
            t0 = time.perf_counter()
            out = self.llm.generate([self.prompt], max_new_tokens=count, ignore_eos=True)
            timed.append(time.perf_counter() - t0)
            assert len(out[0].token_ids) == count, out[0].finish_reason
        yield (timed[1] - timed[0]) / n


def one_round(contenders, n_new, prefill, decode):
    """Prefill each contender, then decode each, one after the other.

    Whole runs alternate, not single steps: torch's OpenMP threads and NumPy's BLAS
    threads each spin a while after their work, and stepping the two in turn made each
    compete with the other's spinning threads for the 2 cores.
    """
    for name, c in contenders.items():
        gc.collect()
        prefill[name].append(c.prefill())
    for name, c in contenders.items():
        gc.collect()
        decode[name].extend(c.decode(n_new))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768, help="hidden size (head dim 64)")
    parser.add_argument("--layers", type=int, default=12, help="decoder layers")
    parser.add_argument("--vocab", type=int, default=16000, help="vocabulary size")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (prefill length)")
    parser.add_argument("--new", type=int, default=32, help="decode steps timed per round")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; medians are reported")
    parser.add_argument("--threads", type=int, default=2, help="BLAS / torch / worker threads")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 8 decode steps, no cluster row")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.new = 2, 8

    try:
        import torch
        from transformers import LlamaForCausalLM
    except ImportError as e:
        print(f"benchmarks/reference.py needs torch and transformers to compare against: {e}\n"
              "  run it with the venv that has them, e.g. /work/golden-venv/bin/python benchmarks/reference.py",
              file=sys.stderr)
        sys.exit(2)
    import numpy as np
    from threadpoolctl import threadpool_limits

    from daskllm.io.builtin import random_llama_weights, write_checkpoint
    from daskllm.io.checkpoint import Checkpoint
    from daskllm.parallel.local_mesh import InProcessReplica
    from daskllm.parallel.mesh import Mesh

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    cfg = llama_config(args.hidden, args.layers, args.vocab)
    prompt = np.random.default_rng(1).integers(2, args.vocab, args.prompt).tolist()

    with tempfile.TemporaryDirectory(prefix="daskllm-reference-") as path:
        tensors = random_llama_weights(cfg, seed=0)
        n_params = sum(t.size for t in tensors.values())
        per_token = decode_bytes_per_token(tensors, cfg)
        write_checkpoint(path, cfg, tensors)
        del tensors
        print(f"model: {n_params / 1e6:.1f}M parameters (hidden {cfg['hidden_size']}, {args.layers} layers, "
              f"{cfg['num_attention_heads']}/{cfg['num_key_value_heads']} heads, MLP {cfg['intermediate_size']}, "
              f"vocab {args.vocab}); decode reads {per_token / 2**20:.0f} MiB of weights per token", flush=True)

        rep = InProcessReplica(Checkpoint(path), Mesh(), timeout=600)
        model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
        contenders = {"daskllm in-process": InProcess(rep, prompt), "transformers": Transformers(model, prompt)}
        cluster = client = llm = None
        if not args.quick:
            from distributed import Client, LocalCluster

            from daskllm import LLM
            cluster = LocalCluster(n_workers=1, threads_per_worker=args.threads, processes=True,
                                   dashboard_address=None, host="127.0.0.1")
            client = Client(cluster, direct_to_workers=True)
            llm = LLM(path, client=client)
            contenders["daskllm LLM (cluster)"] = Cluster(llm, prompt)
        try:
            one_round(contenders, 2, {n: [] for n in contenders}, {n: [] for n in contenders})   # warm-up
            prefill, decode = {n: [] for n in contenders}, {n: [] for n in contenders}
            for r in range(args.rounds):
                before = {name: len(decode[name]) for name in contenders}
                one_round(contenders, args.new, prefill, decode)
                print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                    f"{name} {1e3 * statistics.median(decode[name][before[name]:]):.1f} ms/token"
                    for name in contenders), flush=True)
        finally:
            if llm is not None:
                llm.close()
                client.close()
                cluster.close()
            rep.close()

    bandwidth = max(copy_bandwidth(1), copy_bandwidth(args.threads))
    bound_tps = bandwidth / per_token
    medians = {name: (statistics.median(prefill[name]), statistics.median(decode[name])) for name in contenders}
    ref_decode = medians["transformers"][1]
    order = ["daskllm in-process", "daskllm LLM (cluster)", "transformers"]

    print(f"\n{args.prompt}-token prompt, {args.new} decode steps, {args.threads} threads, "
          f"median of {args.rounds} rounds; copy bandwidth {bandwidth / 1e9:.1f} GB/s\n")
    print("| | prefill tok/s | decode ms/token | decode tok/s | decode time vs transformers | of bandwidth bound |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in order:
        if name not in medians:
            continue
        prefill, decode = medians[name]
        print(f"| {name} | {args.prompt / prefill:.0f} | {1e3 * decode:.1f} | {1 / decode:.1f} | "
              f"{decode / ref_decode:.2f}x | {1 / decode / bound_tps:.2f} |")
    print(f"| bandwidth bound | | {1e3 / bound_tps:.1f} | {bound_tps:.1f} | {1 / bound_tps / ref_decode:.2f}x | 1.00 |")


if __name__ == "__main__":
    main()
