"""Integrity checks on safetensors files: the header against the file, and the weights finite.

safetensors' own reader refuses a damaged file with a terse code ("MetadataIncompleteBuffer",
"InvalidOffset") that names neither the file nor the tensor; `check_header` reads the header
(never the data) first and says what is wrong and where. Layout, per the safetensors spec:

    [8 bytes: header length N, u64 little-endian][N bytes: JSON header][data]

Each tensor's `data_offsets` [begin, end) are relative to the data; the tensors cover the
data exactly, without holes or overlaps, and each spans prod(shape) * itemsize bytes.

Weights holding NaN or inf are refused, not warned about: every token the model produces
after them would be garbage. `check_finite` runs on each slice as a rank reads it (so every
byte is checked once, in memory, by the rank that holds it) and costs one pass over the
slice's bit patterns, without converting it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

# Bytes per element of each safetensors dtype.
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
            "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
# safetensors' own limit on the header (its MAX_HEADER_SIZE): beyond it a file is refused anyway.
MAX_HEADER_BYTES = 100_000_000
# Floating-point widths -> (unsigned view, sign mask, smallest |bit pattern| with an all-ones exponent).
_NONFINITE_FROM = {
    ("f", 2, "float16"): (np.uint16, 0x7FFF, 0x7C00),
    ("V", 2, "bfloat16"): (np.uint16, 0x7FFF, 0x7F80),
    ("f", 4, "float32"): (np.uint32, 0x7FFF_FFFF, 0x7F80_0000),
    ("f", 8, "float64"): (np.uint64, 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000),
}
_CHUNK = 1 << 20      # elements per pass of the finite check: a bounded temporary


class CheckpointError(ValueError):
    """The checkpoint on disk is not what its config says, is damaged, or is not safetensors."""


def check_header(path) -> dict:
    """The parsed header of safetensors file `path`, after checking it against the file itself.

    Refuses, naming the file and the tensor: a file shorter than its header, a header length
    beyond the file or safetensors' limit, a header that is not a JSON object of tensor
    entries, an unknown dtype, a shape whose size disagrees with the tensor's byte range,
    byte ranges that overlap, leave holes, or run past the end of the file (truncated).
    """
    path = Path(path)
    size = os.path.getsize(path)
    where = f"safetensors file {path}"
    if size < 8:
        raise CheckpointError(f"{where} is {size} bytes long, too short to hold the 8-byte header length "
                              "(truncated or not safetensors); re-download or re-save it")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise CheckpointError(
                f"{where} declares a header of {n} bytes, but the file holds {size - 8} bytes after the length "
                f"field (and safetensors allows at most {MAX_HEADER_BYTES}): the file is truncated or not "
                "safetensors; re-download or re-save it")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{where} has a header that is not UTF-8 JSON ({e}); the file is damaged "
                              "or not safetensors") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{where} has a header that is a JSON {type(header).__name__}, not an object "
                              "of tensor entries")
    data_bytes = size - 8 - n
    spans = sorted((_check_entry(where, name, entry), name)
                   for name, entry in header.items() if name != "__metadata__")
    _check_coverage(where, spans, data_bytes)
    return header


def _check_entry(where: str, name: str, entry) -> tuple:
    """(begin, end) of one tensor entry, after checking its dtype, shape and byte count agree."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise CheckpointError(f"{where}: the header entry of tensor {name!r} is {entry!r}; "
                              "expected {'dtype': ..., 'shape': [...], 'data_offsets': [begin, end]}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in ITEMSIZE:
        raise CheckpointError(f"{where}: tensor {name!r} has dtype {dtype!r}, which safetensors does not define "
                              f"(known: {', '.join(ITEMSIZE)})")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CheckpointError(f"{where}: tensor {name!r} has shape {shape!r}; a list of integers >= 0 expected")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets)
            or offsets[0] > offsets[1]):
        raise CheckpointError(f"{where}: tensor {name!r} has data_offsets {offsets!r}; "
                              "[begin, end] with 0 <= begin <= end expected")
    expected = ITEMSIZE[dtype] * _product(shape)
    if offsets[1] - offsets[0] != expected:
        raise CheckpointError(
            f"{where}: tensor {name!r} ({dtype}, shape {tuple(shape)}) needs {expected} bytes, but its "
            f"data_offsets {offsets} span {offsets[1] - offsets[0]}: the header lies about its dtype, shape "
            "or offsets")
    return offsets[0], offsets[1]


def _check_coverage(where: str, spans: list, data_bytes: int):
    """The tensors' byte ranges tile the data region exactly, as the safetensors format requires."""
    pos, previous = 0, None
    for (begin, end), name in spans:
        if begin < pos:
            raise CheckpointError(f"{where}: tensor {name!r} starts at data byte {begin}, inside tensor "
                                  f"{previous!r} (which ends at {pos}): the header's data_offsets overlap")
        if begin > pos:
            raise CheckpointError(f"{where}: {begin - pos} data bytes before tensor {name!r} (at {pos}..{begin}) "
                                  "belong to no tensor: the header's data_offsets leave a hole")
        pos, previous = end, name
    if pos > data_bytes:
        raise CheckpointError(
            f"{where} is truncated: its header places tensor {previous!r} up to data byte {pos}, but the file "
            f"holds only {data_bytes} data bytes ({pos - data_bytes} missing); re-download or re-save it")
    if pos < data_bytes:
        raise CheckpointError(f"{where} has {data_bytes - pos} bytes after the last tensor's data that the "
                              "header does not account for; the file is damaged or not safetensors")


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _product(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def has_nonfinite(array: np.ndarray) -> bool:
    """Whether a float array holds a NaN or an inf: its bit patterns with the sign cleared,
    compared with the all-ones exponent (one pass, no conversion, even for bfloat16)."""
    key = (array.dtype.kind, array.dtype.itemsize, array.dtype.name)
    if key not in _NONFINITE_FROM:
        return False                      # integer (or unknown) storage holds no NaN
    uint, mask, threshold = _NONFINITE_FROM[key]
    bits = np.ascontiguousarray(array).reshape(-1).view(uint)
    for i in range(0, bits.size, _CHUNK):
        if (bits[i:i + _CHUNK] & uint(mask)).max() >= threshold:
            return True
    return False


def check_finite(array: np.ndarray, tensor: str, file, index=None):
    """Refuse a slice of `tensor` (as read from `file`) that holds NaN or inf, counting both."""
    if array.size == 0 or not has_nonfinite(array):
        return
    wide = np.asarray(array, dtype=np.float32)
    nan, inf = int(np.isnan(wide).sum()), int(np.isinf(wide).sum())
    part = "" if index is None else f" (in the slice {_format_index(index)} this rank reads)"
    raise CheckpointError(
        f"tensor {tensor} in {Path(file).name} holds {nan} NaN and {inf} inf values{part}: the checkpoint is "
        "corrupt (or was saved after a diverged training step); daskllm refuses to load it. "
        "Re-download or re-convert it")


def _format_index(index) -> str:
    def one(s):
        return f"{'' if s.start is None else s.start}:{'' if s.stop is None else s.stop}"
    return "[" + ", ".join(one(s) if isinstance(s, slice) else str(s) for s in index) + "]"
