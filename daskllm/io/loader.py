"""Read one rank's weights (the slices its plan names) from a checkpoint into a `Weights`.

Each matrix is read in its stored dtype and turned into the layout of the chosen weight
dtype (kernels.formats) one tensor at a time; norms, biases, the MoE router and the shared
expert's gate stay float32.
"""
from __future__ import annotations

import re

import numpy as np

from .. import kernels
from ..model.forward import Weights
from ..model.layers import array_module

_LAYER = re.compile(r"layers\.(\d+)\.(.+)")


def structure(flat: dict, n_layers: int, tie_embeddings: bool, vocab_start: int = 0) -> Weights:
    """Flat {our name: array} -> Weights, with expert and shared-expert weights nested per layer."""
    layers = [dict() for _ in range(n_layers)]
    held = sorted({int(m.group(1)) for m in map(_LAYER.match, flat) if m})
    first, end = (held[0], held[-1] + 1) if held else (0, 0)     # a pipeline stage holds a run of layers
    for name, array in flat.items():
        m = _LAYER.match(name)
        if not m:
            continue
        layer, part = layers[int(m.group(1))], m.group(2)
        if part.startswith("experts."):
            _, e, leaf = part.split(".")
            layer.setdefault("experts", {}).setdefault(int(e), {})[leaf] = array
        elif part.startswith("shared."):
            layer.setdefault("shared", {})[part.split(".")[1]] = array
        else:
            layer[part] = array
    layers = layers[first:end]
    for layer in layers:   # an expert-parallel rank may hold no expert of a layer
        if "router" in layer:
            layer.setdefault("experts", {})
        for part in [layer] + list(layer.get("experts", {}).values()) + [layer.get("shared", {})]:
            fuse_projections(part)
            as_matmul_layout(part)
    embed, norm, lm_head = flat.get("embed"), flat.get("norm"), None   # a pipeline stage holds only its ends
    if norm is not None:                                                  # the last stage (or the only one)
        lm_head = embed if tie_embeddings else _matmul_layout(flat["lm_head"])
    return Weights(embed=embed, norm=norm, lm_head=lm_head,
                   layers=layers, vocab_start=vocab_start, first_layer=first)


def fuse_projections(weights: dict):
    """Join the matrices that read the same input into one, so a step makes fewer, larger matmuls.

    wq, wk, wv -> wqkv (rows stacked) with qkv_sizes; their biases -> bqkv;
    w_gate, w_up -> w_gate_up (gate rows first). Works on whatever slices this rank holds.
    """
    if "wq" in weights:
        parts = [weights.pop(n) for n in ("wq", "wk", "wv")]
        weights["qkv_sizes"] = tuple(p.shape[0] for p in parts)
        weights["wqkv"] = kernels.concat_rows(parts)                                  # (Hq+2Hkv)*hd, D
        if "bq" in weights:
            weights["bqkv"] = array_module(parts[0]).concatenate([weights.pop(n) for n in ("bq", "bk", "bv")])
    if "w_gate" in weights:
        gate, up = weights.pop("w_gate"), weights.pop("w_up")
        weights["w_gate_up"] = kernels.concat_rows([gate, up])                       # (2I, D)


def as_matmul_layout(weights: dict):
    """Store each (out, in) matrix in the order its matmul reads fastest. Values and shapes are
    unchanged. 16-bit and int8 weights are always row-major (their kernels read W one output
    row at a time); float32 (benchmarks/README.md, "Few rows"):
    - CPU, a rank of 2 or more threads: row-major. Batched decode's numba kernel reads it, and
      OpenBLAS ran as fast or faster on it than on W.T contiguous at every size tried (1-512
      rows; one row 13.5 against 15.1 ms on 2 threads).
    - CPU, a rank of one thread: column-major (W.T contiguous), where one row's matrix-vector
      product ran 10% faster (22.3 against 24.9 ms); batched decode then stays on BLAS.
    - GPU: column-major, as before, for cuBLAS.
    """
    for name, w in weights.items():
        if name != "router":
            weights[name] = _matmul_layout(w)


def _matmul_layout(w):
    if getattr(w, "ndim", 0) != 2 or kernels.is_low_bit(w):
        return w
    xp = array_module(w)
    if xp is np and kernels.threads() != 1:
        return np.ascontiguousarray(w)
    return xp.asfortranarray(w)


STORED = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
KEPT_FLOAT32 = ("router", "shared_gate")    # tiny, and routing decisions are discrete: kept exact


def is_linear(name: str, shape: tuple) -> bool:
    """A matrix the chosen weight dtype applies to: every projection, expert, embedding and LM head."""
    return len(shape) == 2 and name.rsplit(".", 1)[-1] not in KEPT_FLOAT32


def target_dtype(name: str, shape: tuple, auto: str, dtype: str) -> str:
    """The dtype tensor `name` is held in: `dtype` for linear weights ("auto": `auto`), else float32."""
    if not is_linear(name, shape):
        return "float32"
    return auto if dtype == "auto" else dtype


def auto_dtype(checkpoint, name: str) -> str:
    """What dtype "auto" holds a linear weight in: its stored float dtype, or "int8" for a GGUF
    quantized type (Q8_0 as its own blocks, the 4-bit and K types requantized to Q8_0)."""
    held = getattr(checkpoint, "auto_dtype", None)
    return held(name) if held is not None else checkpoint.stored_dtype(name)


def resolve_dtype(checkpoint, requested: str) -> dict:
    """{tensor: the dtype it is held in} for weight dtype `requested`: the one place "auto" is decided.

    api.LLM calls it before any worker is touched; its result (options["dtypes"]) sizes the
    weights and KV budget, aligns tensor-parallel cuts to int8 blocks and tells each rank what to load.
    """
    if requested not in kernels.DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(repr, kernels.DTYPES))}, got {requested!r}")
    return {name: target_dtype(name, checkpoint.shape(name), auto_dtype(checkpoint, name), requested)
            for name in checkpoint.entries}


def dtype_label(requested: str, dtypes: dict) -> str:
    """`requested`, or for "auto" the dtypes it resolved to, e.g. "auto: float32, int8" (norms stay float32)."""
    if requested != "auto":
        return requested
    held = sorted(set(dtypes.values()))
    return "auto: " + ", ".join(held)


def read_weights(checkpoint, slices: dict, xp=np, dtype: str = "float32", dtypes: dict | None = None) -> dict:
    """{our name: weight} for each name in `slices` (value: a tuple of slices, or None for all).

    Each tensor is read from disk in its stored dtype, sliced by safetensors, turned into the
    layout of its target dtype (`dtypes`, else `resolve_dtype(checkpoint, dtype)`) and moved to
    `xp` (numpy or cupy) one at a time, so peak host memory stays near one tensor (never a
    float32 checkpoint). GGUF Q8_0 tensors held as int8 keep the file's blocks unchanged.
    """
    if dtype not in kernels.DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(kernels.DTYPES)}, got {dtype!r}")
    targets = dtypes if dtypes is not None else resolve_dtype(checkpoint, dtype)
    out = {}
    for name, index in slices.items():
        target = targets[name]
        stored_int8 = getattr(checkpoint, "read_q8_0", None)
        weight = stored_int8(name, index) if target == "int8" and stored_int8 is not None else None
        if weight is None:
            array = checkpoint.read(name, index, None)                    # as stored on disk
            try:
                weight = kernels.convert(array, target) if array.ndim == 2 else np.asarray(array, np.float32)
            except OverflowError as e:
                raise OverflowError(f"{name}: {e}") from None
        out[name] = kernels.to_device(weight, xp)
    return out


def held_bytes(checkpoint, slices: dict, dtype: str, dtypes: dict | None = None) -> int:
    """Bytes `read_weights(checkpoint, slices, dtype=dtype, dtypes=dtypes)` will hold, from the headers alone."""
    targets = dtypes if dtypes is not None else resolve_dtype(checkpoint, dtype)
    total = 0
    for name, index in slices.items():
        shape = checkpoint.shape(name)
        if index is not None:
            shape = tuple(len(range(*s.indices(n))) for s, n in zip(index, shape))
        total += kernels.weight_bytes(shape, targets[name])
    return total


class ShippedShards:
    """One rank's slices, read on the client and shipped to the rank (workers without the files).

    Offers the part of Checkpoint's interface that build_runner uses: config, shape, read.
    """

    def __init__(self, config, shapes: dict, arrays: dict):
        self.config, self._shapes, self._arrays = config, shapes, arrays
        self.entries = dict.fromkeys(arrays)

    def stored_dtype(self, name: str) -> str:
        return np.dtype(self._arrays[name].dtype).name

    def shape(self, name: str) -> tuple:
        return self._shapes[name]

    def read(self, name: str, index=None, dtype=np.float32) -> np.ndarray:
        return np.asarray(self._arrays[name], dtype=dtype)   # already this rank's slice

    def close(self):
        self._arrays = {}


def read_rank_shards(checkpoint, slices: dict) -> dict:
    """{name: the rank's slice, in the dtype stored on disk} for shipping to a rank."""
    return {name: checkpoint.read(name, index, dtype=None) for name, index in slices.items()}
