"""The weight layouts the kernels read: 16-bit matrices and llama.cpp's Q8_0 int8 blocks.

Every layout here is an (out, in) matrix W used as x @ W.T, stored row-major so that one
output reads one contiguous row. Arrays may be numpy or cupy (the GPU holds the same bytes).

Q8_0 (llama.cpp's `block_q8_0`): each row is cut along the input dim into blocks of 32;
a block is 32 int8 values q and one float16 scale d, its weights are d * q. A row whose
width is not a multiple of 32 ends in a partial block, padded with zeros. Quantizing
follows llama.cpp: d = max|w| / 127 over the block, q = round(w / d), d stored as float16.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 32                                  # Q8_0 values per block (GGML_QK8_0)
KINDS = ("bfloat16", "float16")             # the 16-bit layouts
_HALF = {"bfloat16": "bfloat16", "float16": "float16"}


def array_module(x):
    mod = type(x).__module__
    if mod.startswith("cupy"):
        import cupy
        return cupy
    return np


@dataclass(frozen=True, eq=False)
class Half:
    """A 16-bit weight matrix held as its bits: uint16 (out, in), row-major; kind bfloat16 or float16.

    The bits are kept as uint16 (not an ml_dtypes array) so that numpy and cupy hold the same
    thing and no NumPy operation silently runs on a slow 16-bit dtype.
    """
    bits: object        # (out, in) uint16
    kind: str           # "bfloat16" | "float16"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"16-bit kind must be one of {KINDS}, got {self.kind!r}")
        if self.bits.dtype != np.uint16 or self.bits.ndim != 2:
            raise ValueError(f"Half needs (out, in) uint16 bits, got {self.bits.dtype} {self.bits.shape}")

    @property
    def shape(self) -> tuple:
        return tuple(self.bits.shape)

    @property
    def nbytes(self) -> int:
        return int(self.bits.nbytes)

    @property
    def dtype_name(self) -> str:
        return self.kind


@dataclass(frozen=True, eq=False)
class Q8_0:
    """llama.cpp's Q8_0 layout as two arrays: W[o, k] = d[o, k // 32] * qs[o, k] for k < cols.

    qs  int8 (out, n_blocks * 32), zeros past `cols` (the partial last block's padding)
    d   float16 (out, n_blocks), one scale per block; GGUF's block_q8_0 {d, qs[32]} maps
        onto these two arrays without any arithmetic (see `from_interleaved`)
    cols  the true input width
    """
    qs: object
    d: object
    cols: int

    def __post_init__(self):
        nb = -(-self.cols // BLOCK)
        out = self.qs.shape[0]
        if self.qs.dtype != np.int8 or tuple(self.qs.shape) != (out, nb * BLOCK):
            raise ValueError(f"Q8_0 values must be int8 ({out}, {nb * BLOCK}) for {self.cols} columns, "
                             f"got {self.qs.dtype} {tuple(self.qs.shape)}")
        if self.d.dtype != np.float16 or tuple(self.d.shape) != (out, nb):
            raise ValueError(f"Q8_0 scales must be float16 ({out}, {nb}), got {self.d.dtype} {tuple(self.d.shape)}")

    @property
    def shape(self) -> tuple:
        return (int(self.qs.shape[0]), int(self.cols))

    @property
    def nbytes(self) -> int:
        return int(self.qs.nbytes + self.d.nbytes)

    @property
    def dtype_name(self) -> str:
        return "int8"


# -- building layouts -------------------------------------------------------------------

def to_half(w, kind: str) -> Half:
    """Round a float (out, in) matrix (float32, bfloat16 or float16) to `kind`; numpy in, numpy out."""
    import ml_dtypes  # noqa: F401  (registers bfloat16)
    w = np.asarray(w)
    target = np.dtype(_HALF[kind])
    if w.dtype != target:
        if kind == "float16":
            big = float(np.abs(w.astype(np.float32)).max(initial=0.0))
            if not big <= 65504.0:
                raise OverflowError(f"a weight of magnitude {big:g} does not fit float16 (max 65504); "
                                    "use dtype='bfloat16' or 'float32'")
        w = w.astype(target)
    return Half(np.ascontiguousarray(w).view(np.uint16), kind)


def quantize_q8_0(w) -> Q8_0:
    """Quantize a float (out, in) matrix to Q8_0 as llama.cpp's quantize_row_q8_0 does.  numpy."""
    w = np.asarray(w, np.float32)
    out, cols = w.shape
    nb = -(-cols // BLOCK)
    padded = np.zeros((out, nb * BLOCK), np.float32)
    padded[:, :cols] = w
    blocks = padded.reshape(out, nb, BLOCK)                                 # (out, nb, 32)
    d = np.abs(blocks).max(axis=2) / 127.0                                  # (out, nb), float32
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    qs = np.rint(blocks * inv[:, :, None]).astype(np.int8)                  # ties to even, as roundf on .5 rarely
    return Q8_0(qs.reshape(out, nb * BLOCK), d.astype(np.float16), cols)


def q8_0_from_blocks(qs, d, cols: int) -> Q8_0:
    """A Q8_0 matrix from already-quantized blocks: qs int8 (out, n_blocks*32), d float16 (out, n_blocks)."""
    return Q8_0(qs, d, int(cols))


def from_interleaved(raw, out: int, cols: int) -> Q8_0:
    """A Q8_0 matrix from GGUF/llama.cpp bytes: `out` rows of n_blocks x {float16 d, int8 qs[32]} (34 bytes).

    raw: uint8 array of out * n_blocks * 34 bytes, as stored in a GGUF tensor of type Q8_0.
    Any columns past a multiple of 32 must be zero padding (GGUF rows are whole blocks).
    """
    nb = -(-cols // BLOCK)
    block = np.dtype([("d", "<f2"), ("qs", "i1", (BLOCK,))])
    blocks = np.frombuffer(np.ascontiguousarray(raw).data, block, count=out * nb).reshape(out, nb)
    return Q8_0(np.ascontiguousarray(blocks["qs"]).reshape(out, nb * BLOCK),
                np.ascontiguousarray(blocks["d"]), cols)


def convert(w, dtype: str):
    """A float (out, in) matrix as the layout of `dtype` ("float32", "bfloat16", "float16", "int8"). numpy."""
    if dtype == "float32":
        return np.asarray(w, np.float32)
    if dtype in KINDS:
        return to_half(w, dtype)
    if dtype == "int8":
        return quantize_q8_0(w)
    raise ValueError(f"unknown weight dtype {dtype!r}")


def to_device(w, xp):
    """The same layout with its arrays moved to `xp` (numpy -> cupy)."""
    if xp is np:
        return w
    if isinstance(w, Half):
        return Half(xp.asarray(w.bits), w.kind)
    if isinstance(w, Q8_0):
        return Q8_0(xp.asarray(w.qs), xp.asarray(w.d), w.cols)
    return xp.asarray(w)


# -- reading layouts back as float32 (references, prefill tiles, GPU) --------------------

def half_to_float32(bits, kind: str):
    """uint16 bits -> float32, numpy or cupy (cupy has no bfloat16: widen the bits by hand)."""
    if kind == "bfloat16":
        return (bits.astype(np.uint32) << 16).view(np.float32)
    return bits.view(np.float16).astype(np.float32)


def dequantize(w, rows=None):
    """float32 (out, in) of any layout (or of rows `rows`, a slice), numpy or cupy."""
    if isinstance(w, Half):
        bits = w.bits if rows is None else w.bits[rows]
        return half_to_float32(bits, w.kind)
    if isinstance(w, Q8_0):
        xp = array_module(w.qs)
        qs = w.qs if rows is None else w.qs[rows]
        d = (w.d if rows is None else w.d[rows]).astype(np.float32)
        out = qs.reshape(qs.shape[0], -1, BLOCK).astype(np.float32) * d[:, :, None]  # (out, nb, 32)
        return xp.ascontiguousarray(out.reshape(qs.shape[0], -1)[:, :w.cols])
    return w if rows is None else w[rows]


def take_rows(w, ids):
    """float32 rows `ids` of a matrix of any layout (embedding lookup).  (V, D), (N,) -> (N, D)"""
    if isinstance(w, Half):
        return half_to_float32(w.bits[ids], w.kind)
    if isinstance(w, Q8_0):
        return dequantize(Q8_0(w.qs[ids], w.d[ids], w.cols))
    return w[ids]


def concat_rows(parts):
    """Stack matrices of one layout by rows (fused q/k/v, gate/up).  [(o_i, in)] -> (sum o_i, in)"""
    first = parts[0]
    if isinstance(first, Half):
        xp = array_module(first.bits)
        return Half(xp.concatenate([p.bits for p in parts], axis=0), first.kind)
    if isinstance(first, Q8_0):
        xp = array_module(first.qs)
        return Q8_0(xp.concatenate([p.qs for p in parts], axis=0),
                    xp.concatenate([p.d for p in parts], axis=0), first.cols)
    return array_module(first).concatenate(parts, axis=0)


def dtype_name(w) -> str:
    """"float32", "bfloat16", "float16" or "int8" for a weight of any layout."""
    return getattr(w, "dtype_name", None) or str(w.dtype)
