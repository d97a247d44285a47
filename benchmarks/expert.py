"""Expert parallelism on a random MoE: bytes moved per token against the minimum, time against one rank.

Run: python benchmarks/expert.py   (about a minute and a half on 2 cores)

Writes a random Mixtral-style checkpoint (16 experts, top-2; the experts hold most of
the parameters), then serves it four ways through `daskllm.LLM`:
  single  one rank on a LocalCluster of 1 worker x 2 threads
  ep=2    two ranks on a LocalCluster of 2 workers x 1 thread
  ep=2 over TCP   the same with daskllm.shared-memory off: every collective over loopback TCP
  tp=2 ep=2       the same two workers, the dense parts split too (the ep groups are the tp groups)
Reported, per MoE layer and token, summed over ranks:
  measured   bytes the ep ranks sent (ep alone: one all_reduce of the ranks' expert sums)
  analytic   that all_reduce: ep x (ep - 1) x hidden x 4 bytes (each rank sends its N x D sums
             to every other); beside it, what token routing (dispatch, combine, gather: the
             design ep keeps with tp or sp) would need at least: hidden x 4 bytes x 2 (there and
             back) x remote destination ranks per token, for the routing this model really
             made, plus (ep - 1) x hidden x 4 to gather the shares
  imbalance  (token, expert) pairs of the busiest ep rank / the mean over ranks
The three configurations run --rounds times, in turn. Times are medians over --repeats runs
within a round, then over the rounds; the decode ratio is given per round: prefill of --batch prompts of --prompt-len tokens
(one generated token) and seconds per decode step of the batch.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def write_random_moe(path: Path, hidden, layers, experts, top_k, width, vocab, seed=0) -> Path:
    """A Mixtral checkpoint with N(0, 0.02^2) weights (routers N(0, 1)), all layers sparse."""
    from safetensors.numpy import save_file
    rng = np.random.default_rng(seed)

    def w(*shape, std=0.02):
        return (rng.standard_normal(shape) * std).astype(np.float32)
    t = {"model.embed_tokens.weight": w(vocab, hidden, std=1.0), "model.norm.weight": np.ones(hidden, np.float32),
         "lm_head.weight": w(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": np.ones(hidden, np.float32),
                  p + "post_attention_layernorm.weight": np.ones(hidden, np.float32),
                  p + "block_sparse_moe.gate.weight": w(experts, hidden, std=1.0)})
        for name in "qkvo":
            t[p + f"self_attn.{name}_proj.weight"] = w(hidden, hidden)
        for e in range(experts):
            q = p + f"block_sparse_moe.experts.{e}."
            t.update({q + "w1.weight": w(width, hidden), q + "w3.weight": w(width, hidden),
                      q + "w2.weight": w(hidden, width)})
    path.mkdir(parents=True, exist_ok=True)
    save_file(t, path / "model.safetensors", metadata={"format": "pt"})
    config = {"architectures": ["MixtralForCausalLM"], "vocab_size": vocab, "hidden_size": hidden,
              "num_hidden_layers": layers, "num_attention_heads": max(1, hidden // 64),
              "num_key_value_heads": max(1, hidden // 64), "intermediate_size": width,
              "num_local_experts": experts, "num_experts_per_tok": top_k, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": False, "eos_token_id": 1}
    (path / "config.json").write_text(json.dumps(config))
    return path


class RecordIds:
    """An ExpertLoad stand-in that keeps every routing decision: {layer: (N, A) ids}."""

    def __init__(self):
        self.ids = {}

    def record_routing(self, layer, ids, n_experts):
        self.ids[layer] = np.asarray(ids)


def routed_minimum(path, prompts, ep):
    """Remote destination ranks per token per MoE layer for the routing the model makes here."""
    from daskllm.io.checkpoint import Checkpoint
    from daskllm.model.runner import Work
    from daskllm.parallel.build import build_runner
    from daskllm.parallel.compose import full_plan
    from daskllm.parallel.expert import expert_owners, share_bounds
    from daskllm.parallel.mesh import Mesh
    ckpt = Checkpoint(path)
    rec = RecordIds()
    build_runner(ckpt, full_plan(ckpt.config, Mesh()), moe_stats=rec).step(
        [Work(i, tuple(p), 0) for i, p in enumerate(prompts)])
    owner = expert_owners(ckpt.config.moe.n_experts, ep)
    remote = []
    for ids in rec.ids.values():                                     # (N, A)
        home = np.empty(ids.shape[0], np.int64)
        for r in range(ep):
            lo, hi = share_bounds(ids.shape[0], ep, r)
            home[lo:hi] = r
        dest = owner[ids]                                            # (N, A)
        remote.append(np.mean([len(set(d.tolist()) - {h}) for d, h in zip(dest, home)]))
    return float(np.mean(remote))


def measure(llm, prompts, new_tokens, repeats):
    """(prefill seconds, decode seconds per step, tokens, rank compute and control path per
    decode step) medians over repeats."""
    from common import step_split
    prefill, decode, compute, control = [], [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        llm.generate(prompts, max_new_tokens=1, ignore_eos=True)
        t1 = time.perf_counter()
        llm.router.engines[0].step_log.clear()
        out = llm.generate(prompts, max_new_tokens=new_tokens, ignore_eos=True)
        t2 = time.perf_counter()
        prefill.append(t1 - t0)
        decode.append(((t2 - t1) - (t1 - t0)) / (new_tokens - 1))
        c, k = step_split(llm)
        compute.append(c)
        control.append(k)
    return (statistics.median(prefill), statistics.median(decode), [o.token_ids for o in out],
            statistics.median(compute), statistics.median(control))


def serve(path, n_workers, threads, ep, prompts, args, shared_memory=True, tp=1):
    import dask
    from distributed import Client, LocalCluster

    from daskllm import LLM
    with dask.config.set({"daskllm.shared-memory": shared_memory}), LocalCluster(n_workers=n_workers, threads_per_worker=threads, processes=True,
                      dashboard_address=None, host="127.0.0.1") as cluster, \
            Client(cluster, direct_to_workers=True) as client, LLM(path, ep=ep, tp=tp, client=client) as llm:
        llm.generate(prompts[:1], max_new_tokens=2, ignore_eos=True)            # warm up
        prefill, decode, tokens, compute, control = measure(llm, prompts, args.new_tokens, args.repeats)
        llm.reset_stats()
        llm.logits(prompts)                                                      # one counted forward
        comm, load = llm.comm_stats(), llm.expert_load()
    return {"prefill": prefill, "decode": decode, "tokens": tokens, "comm": comm, "load": load,
            "compute": compute, "control": control}


def rounds_median(runs):
    """The first round's tokens and counters, each time's median over the rounds."""
    out = dict(runs[0])
    for key in ("prefill", "decode", "compute", "control"):
        out[key] = statistics.median(r[key] for r in runs)
    return out


def sent(comm):
    return sum(op["bytes_sent"] for c in comm for op in c.get("ep", {}).values() if isinstance(op, dict))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-width", type=int, default=512, help="hidden width of one expert")
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4, help="prompts per step")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps timed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="times each configuration runs, in turn")
    parser.add_argument("--dir", help="where to write the checkpoint (default: a temporary folder)")
    args = parser.parse_args(argv)

    from daskllm.parallel.expert import load_per_rank
    ep = 2
    with tempfile.TemporaryDirectory() as tmp:
        path = str(write_random_moe(Path(args.dir or tmp) / "random_moe", args.hidden, args.layers,
                                    args.experts, args.top_k, args.expert_width, args.vocab))
        rng = np.random.default_rng(1)
        prompts = [rng.integers(3, args.vocab, args.prompt_len).tolist() for _ in range(args.batch)]
        runs = {"single": [], "split": [], "tcp": [], "tp": []}
        for _ in range(args.rounds):                     # in turn, so the host's drift hits all alike
            runs["single"].append(serve(path, 1, 2, 1, prompts, args))
            runs["split"].append(serve(path, 2, 1, ep, prompts, args))
            runs["tcp"].append(serve(path, 2, 1, ep, prompts, args, shared_memory=False))
            runs["tp"].append(serve(path, 2, 1, ep, prompts, args, tp=ep))
        single, split, tcp, tp = (rounds_median(runs[k]) for k in ("single", "split", "tcp", "tp"))
        ratios = {k: [r["decode"] / s["decode"] for r, s in zip(runs[k], runs["single"])] for k in ("split", "tcp", "tp")}
        measured_min = routed_minimum(path, prompts, ep)

    n = args.batch * args.prompt_len * args.layers                   # token x MoE layer of the counted forward
    d4 = args.hidden * 4
    counts = np.asarray(split["load"][0]["total"])                   # (L, E), rank 0 sees all tokens
    per_rank = np.array([load_per_rank(c, ep) for c in counts])      # (L, P)
    imbalance = float((per_rank.max(axis=1) / per_rank.mean(axis=1)).mean())
    expert_share = args.experts * 3 * args.expert_width / (args.experts * 3 * args.expert_width + 4 * args.hidden)
    def each(fmt, key, scale=1):
        return tuple(fmt.format(r[key] * scale) for r in (single, split, tcp, tp))
    rows = [
        ("ep bytes sent / token / MoE layer", "-", f"{sent(split['comm']) / n:.0f}", f"{sent(tcp['comm']) / n:.0f}",
         f"{sent(tp['comm']) / n:.0f}"),
        ("  analytic: all_reduce of the sums", "-", f"{ep * (ep - 1) * d4}", "-", "0"),
        ("  token routing's minimum, this routing", "-", f"{d4 * 2 * measured_min + (ep - 1) * d4:.0f}", "-", "-"),
        ("load imbalance (max / mean rank)", "-", f"{imbalance:.2f}", "-", "-"),
        ("prefill s (batch)", *each("{:.3f}", "prefill")),
        ("decode s / step", *each("{:.1f} ms", "decode", 1e3)),
        ("  slowest rank's compute / step", *each("{:.1f} ms", "compute", 1e3)),
        ("  control path / step", *each("{:.2f} ms", "control", 1e3)),
        ("decode vs single, each round", "1.00x", *(" ".join(f"{x:.2f}" for x in ratios[k]) for k in ("split", "tcp", "tp"))),
        ("greedy tokens equal", "-", *(str(single["tokens"] == r["tokens"]) for r in (split, tcp, tp))),
    ]
    print(f"random MoE: hidden {args.hidden}, {args.layers} layers, {args.experts} experts top-{args.top_k}, "
          f"expert width {args.expert_width} (experts ~{expert_share:.0%} of a layer's weights); "
          f"batch {args.batch} x {args.prompt_len} tokens")
    head = (f"{'metric':<40} | {'single (1w x 2t)':>16} | {'ep=2 (2w x 1t)':>16} | {'ep=2 over TCP':>16} | "
            f"{'tp=2 ep=2 (2w x 1t)':>19}")
    print(head)
    print("-" * len(head))
    for name, *cells in rows:
        print(f"{name:<40} | " + " | ".join(f"{c:>16}" for c in cells[:-1]) + f" | {cells[-1]:>19}")


if __name__ == "__main__":
    main()
