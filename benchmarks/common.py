"""Shared pieces of the benchmark scripts: random checkpoints written on the fly, peak memory."""
from __future__ import annotations


# The issue-10 model: a 207M-parameter Llama (hidden 1024, 12 layers, 16/8 heads, MLP 2816, vocab 32000).
LLAMA_207M = dict(hidden=1024, layers=12, heads=16, kv_heads=8, intermediate=2816, vocab=32000)


def random_llama(path, layers=8, hidden=512, heads=None, kv_heads=None, vocab=8000, intermediate=None,
                 max_position=4096, seed=1) -> int:
    """Write a random Llama checkpoint to `path`; returns its parameter count."""
    from daskllm.io.builtin import random_llama_weights, write_checkpoint
    heads = heads or max(1, hidden // 64)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
           "hidden_size": hidden, "intermediate_size": intermediate or int(hidden * 2.75),
           "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv_heads or max(1, heads // 2),
           "max_position_embeddings": max_position, "rms_norm_eps": 1e-6,
           "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "tie_word_embeddings": False}
    tensors = random_llama_weights(cfg, seed=seed, scale=0.05)
    write_checkpoint(path, cfg, tensors)
    return sum(t.size for t in tensors.values())


def reset_peak_memory():
    """Reset this process's peak resident memory (Linux /proc/self/clear_refs); True if it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory() -> int:
    """Peak resident bytes of this process since the last reset (or since it started)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def resident_memory() -> int:
    """Resident bytes of this process now."""
    import psutil
    return psutil.Process().memory_info().rss


def step_split(llm, since=0) -> tuple:
    """(slowest rank's compute, control path) per decode step, medians over replica 0's engine
    turns after the first `since` + 1 (the first is the prefill): seconds each.

    The control path is the engine's loop turn minus the slowest rank's compute in it: the
    driver, the messages and Dask, all that a step costs beyond the model (benchmarks/dask_tax.py).
    """
    import numpy as np
    log = list(llm.router.engines[0].step_log)[since + 1:]
    return float(np.median([c for _, c in log])), float(np.median([t - c for t, c in log]))
