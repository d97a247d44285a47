"""GGUFCheckpoint: a llama.cpp GGUF file as a checkpoint — config from its metadata, tensors by slice.

It offers Checkpoint's interface (config, entries, shape, nbytes, read, close), so plans,
loaders and ranks treat both formats alike. Each rank reads only its slices: whole rows
of a quantized matrix, and for a column slice the whole blocks that cover it (a slice
that starts or ends inside a block reads that block and drops the values outside).
Quantized blocks are dequantized to float32 with `gguf.quants.dequantize`, on the slice only.

Weights at their own size (issue 11's `dtype=`): "auto" holds F32/F16/BF16 as stored and every
quantized type as int8 (`auto_dtype`; io.loader.resolve_dtype decides per tensor). `read_q8_0` hands a
rank its Q8_0 blocks as stored (`raw_blocks`, Q/K rows unpermuted) mapped onto kernels.formats.Q8_0
with from_interleaved and no arithmetic; the 4-bit and K types are requantized to Q8_0 by the loader
from the dequantized slice (measured on SmolLM2 Q4_1: +0.55-0.63% relative RMS weight error, max
logit change 3.6% of the largest logit, the same 24 greedy tokens). dtype "float32" dequantizes all.

llama.cpp's converter reorders the rows of each Llama query and key head so that RoPE
rotates interleaved pairs (GGML's "normal" rope); our forward, like Hugging Face's, rotates
halves. `read` undoes that permutation per head (so slices must hold whole heads):
    GGUF row of head h:  2 i + j   <->   Hugging Face row:  j * hd/2 + i     (i < hd/2, j < 2)
"""
from __future__ import annotations

import re
from pathlib import Path

import ml_dtypes
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from ..kernels.formats import from_interleaved
from ..model.config import ModelConfig, RopeConfig, UnsupportedModelError
from .checkpoint import CheckpointError
from .gguf_file import GGUFError, GGUFFile
from .names import expected_shapes

# GGUF tensor name -> ours ({i} is the layer).
GGUF_TO_OURS = {
    "token_embd.weight": "embed", "output_norm.weight": "norm", "output.weight": "lm_head",
    "blk.{i}.attn_norm.weight": "layers.{i}.attn_norm", "blk.{i}.ffn_norm.weight": "layers.{i}.mlp_norm",
    "blk.{i}.attn_q.weight": "layers.{i}.wq", "blk.{i}.attn_k.weight": "layers.{i}.wk",
    "blk.{i}.attn_v.weight": "layers.{i}.wv", "blk.{i}.attn_output.weight": "layers.{i}.wo",
    "blk.{i}.attn_q.bias": "layers.{i}.bq", "blk.{i}.attn_k.bias": "layers.{i}.bk",
    "blk.{i}.attn_v.bias": "layers.{i}.bv",
    "blk.{i}.attn_q_norm.weight": "layers.{i}.q_norm", "blk.{i}.attn_k_norm.weight": "layers.{i}.k_norm",
    "blk.{i}.ffn_gate.weight": "layers.{i}.w_gate", "blk.{i}.ffn_up.weight": "layers.{i}.w_up",
    "blk.{i}.ffn_down.weight": "layers.{i}.w_down",
}
_PATTERNS = [(re.compile(re.escape(g).replace(r"\{i\}", r"(\d+)") + r"\Z"), o) for g, o in GGUF_TO_OURS.items()]
_OURS_TO_GGUF = {o: g for g, o in GGUF_TO_OURS.items()}

# general.architecture -> our family. llama.cpp files Mistral checkpoints as "llama".
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
PERMUTED_QK = {"llama"}     # the converter permutes q/k rows for these (Qwen uses NEOX rope: no permutation)

# Types read: the float types and those gguf.quants dequantizes (held as int8 under dtype "auto").
TYPES = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1,
         T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS)
_STORED = {T.F32: np.float32, T.F16: np.float16, T.BF16: ml_dtypes.bfloat16}


def find_gguf(path) -> Path | None:
    """The GGUF file `path` names: the file itself, or the one .gguf in a directory; else None."""
    path = Path(path)
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            raise CheckpointError(f"{path} holds {len(found)} .gguf files ({', '.join(f.name for f in found)}); "
                                  "pass the one to use")
        return found[0] if found else None
    return None


def gguf_to_ours(name: str) -> str | None:
    for pattern, ours in _PATTERNS:
        m = pattern.match(name)
        if m:
            return ours.format(i=m.group(1) if m.groups() else "")
    return None


def ours_to_gguf(ours: str) -> str:
    layer = re.match(r"layers\.(\d+)\.(.+)", ours)
    if layer:
        return _OURS_TO_GGUF["layers.{i}." + layer.group(2)].format(i=layer.group(1))
    return _OURS_TO_GGUF[ours]


def config_from_gguf(meta: dict, tensor_names, path="") -> ModelConfig:
    """ModelConfig from GGUF metadata ({arch}.* keys) and the tensors present (ties, biases)."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}")
    if meta.get(f"{arch}.expert_count", 0):
        raise UnsupportedModelError(f"{path}: mixture-of-experts GGUF files ({arch} with "
                                    f"{meta[f'{arch}.expert_count']} experts) are not supported yet; "
                                    "use the safetensors checkpoint")
    if "rope_freqs.weight" in tensor_names:
        raise UnsupportedModelError(f"{path}: per-dimension RoPE frequency factors (rope_freqs.weight, Llama 3.1 "
                                    "scaling) are not supported in GGUF files yet; use the safetensors checkpoint")

    def key(name, default=None):
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise CheckpointError(f"{path}: GGUF metadata lacks {arch}.{name}")
        if isinstance(value, np.ndarray):        # per-layer values: daskllm needs one for all layers
            if len(set(value.tolist())) != 1:
                raise UnsupportedModelError(f"{path}: {arch}.{name} differs between layers ({value.tolist()})")
            value = value.tolist()[0]
        return value

    hidden, n_heads = key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length", hidden // n_heads)
    if key("rope.dimension_count", head_dim) != head_dim:
        raise UnsupportedModelError(f"{path}: partial rotary embeddings ({arch}.rope.dimension_count "
                                    f"{key('rope.dimension_count')} < head dim {head_dim}) are not supported")
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise UnsupportedModelError(f"{path}: RoPE scaling {scaling!r} is not supported; supported: none, linear")
    rope = RopeConfig(theta=float(key("rope.freq_base", 10000.0)), type="default" if scaling == "none" else "linear",
                      factor=float(meta.get(f"{arch}.rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0)
    tokens = meta.get("tokenizer.ggml.tokens")
    window = meta.get(f"{arch}.attention.sliding_window")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        family=ARCHITECTURES[arch],
        vocab_size=int(key("vocab_size", len(tokens) if tokens is not None else None)),
        hidden_size=int(hidden), n_layers=int(key("block_count")), n_heads=int(n_heads),
        n_kv_heads=int(key("attention.head_count_kv", n_heads)), head_dim=int(head_dim),
        intermediate_size=int(key("feed_forward_length")), max_position=int(key("context_length")),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")), rope=rope,
        tie_embeddings="output.weight" not in tensor_names,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        qk_norm="head" if "blk.0.attn_q_norm.weight" in tensor_names else "none",
        sliding_window=int(window) if arch == "llama" and window and window < key("context_length") else None,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
    )


def _dequantize(raw: np.ndarray, qtype, chunk_bytes: int = 1 << 21) -> np.ndarray:
    """gguf.quants.dequantize over many rows at once.  (rows, bytes) uint8 -> (rows, values) float32

    gguf dequantizes in groups of 16 rows (one numpy pass per group: 10.9 s for SmolLM2's 135M
    values here); handing it a run of rows as one long row makes one pass per ~2 MB chunk.
    """
    rows = max(1, chunk_bytes // max(raw.shape[1], 1))
    parts = [dequantize(raw[r:r + rows].reshape(1, -1), qtype).reshape(min(rows, raw.shape[0] - r), -1)
             for r in range(0, raw.shape[0], rows)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


class GGUFCheckpoint:
    """A GGUF file read lazily by slice, with our tensor names.

    Example
    -------
    >>> ckpt = GGUFCheckpoint("SmolLM2-135M-Instruct.Q4_1.gguf")       # doctest: +SKIP
    >>> ckpt.read("layers.0.wq", (slice(0, 64), slice(None))).shape     # doctest: +SKIP
    (64, 576)
    """

    def __init__(self, path):
        self.path = Path(path)
        try:
            self.file = GGUFFile(self.path)
        except GGUFError as e:
            raise CheckpointError(str(e)) from None
        self.metadata = self.file.metadata
        self.config = config_from_gguf(self.metadata, self.file.tensors, self.path)
        self.arch = self.metadata["general.architecture"]
        self.entries = {}                      # our name -> TensorInfo
        for name, info in self.file.tensors.items():
            ours = gguf_to_ours(name)
            if ours is None:
                raise CheckpointError(f"unexpected tensor {name!r} in {self.path.name} for a {self.arch} model")
            if info.qtype not in TYPES:
                raise CheckpointError(
                    f"tensor {name!r} in {self.path.name} has type {info.qtype.name}, which daskllm does not read; "
                    f"supported: {', '.join(t.name for t in TYPES)}")
            self.entries[ours] = info
        self.validate()

    def validate(self):
        """Every tensor the metadata implies is present with the right shape, and nothing else."""
        expected = expected_shapes(self.config)
        missing = [n for n in expected if n not in self.entries]
        if missing:
            raise CheckpointError(
                f"missing tensor {ours_to_gguf(missing[0])!r} in {self.path.name} (expected shape {expected[missing[0]]})"
                + (f"; {len(missing) - 1} more missing" if len(missing) > 1 else ""))
        for name, info in self.entries.items():
            if name not in expected:
                raise CheckpointError(f"unexpected tensor {info.name!r} in {self.path.name}: the metadata has no place for it")
            if info.shape != expected[name]:
                raise CheckpointError(f"tensor {info.name!r} in {self.path.name} has shape {info.shape}, "
                                      f"expected {expected[name]} from the GGUF metadata")

    def shape(self, name: str) -> tuple:
        return self.entries[name].shape

    def nbytes(self, name: str) -> int:
        """Bytes of the tensor on disk (quantized blocks)."""
        return self.entries[name].nbytes

    def stored_dtype(self, name: str) -> str:
        """The dtype `read(name, dtype=None)` gives: "float32", "float16" or "bfloat16" (quantized: "float32")."""
        qtype = self.entries[name].qtype
        return {T.F16: "float16", T.BF16: "bfloat16"}.get(qtype, "float32")

    def auto_dtype(self, name: str) -> str:
        """The dtype "auto" holds a linear weight in: F32/F16/BF16 as stored, quantized types "int8" (Q8_0)."""
        qtype = self.entries[name].qtype
        return {T.F32: "float32", T.F16: "float16", T.BF16: "bfloat16"}.get(qtype, "int8")

    def read_q8_0(self, name: str, index=None):
        """A Q8_0 tensor's slice as kernels.formats.Q8_0 built from the stored blocks, unchanged
        (None for other types: the loader requantizes their dequantized values)."""
        info = self.entries[name]
        if info.qtype != T.Q8_0 or len(info.shape) != 2:
            return None
        index = tuple(index) if index is not None else (slice(None), slice(None))
        lo, hi, _ = index[1].indices(info.shape[1])
        _, raw = self.raw_blocks(name, index)                         # (rows, blocks * 34) uint8
        return from_interleaved(raw, raw.shape[0], hi - lo)

    def raw_blocks(self, name: str, index=None) -> tuple:
        """(GGML type, raw bytes (rows, blocks * block bytes)) of a 2-D slice whose columns fall on block
        boundaries: the rank's quantized blocks as stored, for a kernel that reads them as they are
        (e.g. Q8_0 blocks -> kernels.formats.from_interleaved). Q/K rows are unpermuted: a block never
        spans rows, so whole rows move as they are."""
        info = self.entries[name]
        rows, cols = (index or (slice(None), slice(None)))
        lo, hi, _ = cols.indices(info.shape[1])
        size, _ = info.block
        if lo % size or (hi % size and hi != info.shape[1]):
            raise ValueError(f"{name}: columns {lo}:{hi} do not fall on {info.qtype.name} block boundaries "
                             f"(blocks of {size})")
        raw = self.file.blocks(info.name, rows, lo // size, -(-hi // size) - lo // size)
        if self.arch in PERMUTED_QK and name.rsplit(".", 1)[-1] in ("wq", "wk"):
            raw = self._unpermute(name, raw, rows.indices(info.shape[0])[0])
        return info.qtype, raw

    def read(self, name: str, index=None, dtype=np.float32) -> np.ndarray:
        """Tensor `name` (or `index`, a tuple of slices, of it) as `dtype`, reading only whole blocks of it.

        dtype None keeps F32/F16/BF16 as stored and gives float32 for quantized types.
        """
        info = self.entries[name]
        index = tuple(index) if index is not None else tuple(slice(None) for _ in info.shape)
        rows = index[0] if len(info.shape) == 2 else slice(None)
        cols = index[-1].indices(info.shape[-1])
        if cols[2] != 1:
            raise ValueError(f"{name}: only contiguous column slices can be read from GGUF blocks")
        size, _ = info.block
        first, last = cols[0] // size, -(-cols[1] // size)         # the whole blocks covering the columns
        raw = self.file.blocks(info.name, rows, first, last - first)
        if info.qtype in _STORED:
            values = raw.view(_STORED[info.qtype])                  # (rows, cols) as stored
        else:
            values = _dequantize(raw, info.qtype)                   # (rows, blocks * size) float32
        values = values[:, cols[0] - first * size:cols[1] - first * size]
        first_row = cols[0] if len(info.shape) == 1 else rows.indices(info.shape[0])[0]
        if len(info.shape) == 1:
            values = values[0]
        if self.arch in PERMUTED_QK and name.rsplit(".", 1)[-1] in ("wq", "wk", "bq", "bk"):
            values = self._unpermute(name, values, first_row)
        return np.ascontiguousarray(values, dtype=dtype or (np.float32 if info.qtype not in _STORED else None))

    def _unpermute(self, name, values, first_row: int):
        """Undo the converter's per-head interleaving of a slice of whole heads.  (heads*hd, ...) -> same"""
        hd = self.config.head_dim
        if first_row % hd or values.shape[0] % hd:
            raise ValueError(f"{name}: a GGUF query/key slice must hold whole heads of {hd} rows")
        heads = values.shape[0] // hd
        rest = values.shape[1:]
        return values.reshape(heads, hd // 2, 2, *rest).swapaxes(1, 2).reshape(values.shape)   # (h, 2, hd/2, ...)

    def close(self):
        """Unmap the file (pages a rank touched while loading would otherwise count as its memory)."""
        self.file.close()
