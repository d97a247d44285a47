"""GGUFFile: the header of a GGUF file (metadata and tensor table), and raw blocks read by slice.

The layout follows the GGUF spec (ggml's docs/gguf.md) and the `gguf` package's constants
(value types, tensor types, block sizes). We parse the header ourselves instead of with
`gguf.GGUFReader` because the reader makes a numpy view per string: opening
SmolLM2-135M (49152 tokens + 48900 merges) took 6.3 s with it and 0.1 s here, and every
rank opens the file. tests/test_gguf.py checks this parser against `gguf.GGUFReader`.

Tensor data stays on disk (a read-only memory map); `blocks` returns the bytes of some rows
and some whole blocks of columns, so a rank touches only the pages of its slice.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType


class GGUFError(ValueError):
    """The file is not a GGUF file daskllm can read: truncated, corrupt, or of an unknown type."""


_SCALARS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_NUMPY = {GGUFValueType.UINT8: np.uint8, GGUFValueType.INT8: np.int8, GGUFValueType.UINT16: np.uint16,
          GGUFValueType.INT16: np.int16, GGUFValueType.UINT32: np.uint32, GGUFValueType.INT32: np.int32,
          GGUFValueType.FLOAT32: np.float32, GGUFValueType.BOOL: np.bool_, GGUFValueType.UINT64: np.uint64,
          GGUFValueType.INT64: np.int64, GGUFValueType.FLOAT64: np.float64}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple          # numpy order (rows, ..., columns): GGUF's dims reversed
    qtype: GGMLQuantizationType
    offset: int           # absolute byte offset of the data in the file

    @property
    def block(self) -> tuple:
        """(values per block, bytes per block) of this tensor's type."""
        return GGML_QUANT_SIZES[self.qtype]

    @property
    def row_bytes(self) -> int:
        size, nbytes = self.block
        return self.shape[-1] // size * nbytes

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape[:-1], dtype=np.int64)) * self.row_bytes


class _Cursor:
    """Sequential little-endian reads from a buffer; running past its end is a truncated file."""

    def __init__(self, buf, path):
        self.buf, self.pos, self.path = buf, 0, path

    def need(self, n: int):
        if self.pos + n > len(self.buf):
            raise GGUFError(f"{self.path} is truncated: its header needs more than its {len(self.buf)} bytes "
                            "(an interrupted download? fetch the file again)")

    def scalar(self, fmt: str):
        n = struct.calcsize(fmt)
        self.need(n)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        self.need(n)
        text = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return text

    def value(self, vtype: int):
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            item, count = self.scalar("<I"), self.scalar("<Q")
            if item in _NUMPY:                      # numeric arrays in one read (token types, scores)
                dtype = np.dtype(_NUMPY[GGUFValueType(item)])
                self.need(count * dtype.itemsize)
                out = np.frombuffer(self.buf, dtype, count, self.pos).copy()
                self.pos += count * dtype.itemsize
                return out
            return [self.value(item) for _ in range(count)]
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[GGUFValueType(vtype)])
        raise GGUFError(f"{self.path}: unknown metadata value type {vtype} (corrupt header?)")


class GGUFFile:
    """A GGUF file's metadata (`metadata`: key -> value) and tensors (`tensors`: name -> TensorInfo)."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self.data = np.memmap(self.path, mode="r")
        except ValueError as e:             # numpy refuses to map an empty file
            raise GGUFError(f"{self.path} is empty or unreadable as GGUF: {e}") from None
        cur = _Cursor(memoryview(self.data), self.path)
        if len(self.data) < 4 or cur.scalar("<I") != GGUF_MAGIC:
            raise GGUFError(f"{self.path} is not a GGUF file (its first bytes are not 'GGUF')")
        version = cur.scalar("<I")
        if version not in (2, 3):
            raise GGUFError(f"{self.path} is GGUF version {version}; daskllm reads versions 2 and 3 "
                            "(little-endian)")
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        self.metadata = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.scalar("<I"))
        infos = [self._tensor_info(cur) for _ in range(n_tensors)]
        align = int(self.metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT))
        start = -(-cur.pos // align) * align      # tensor data begins at the next aligned offset
        self.tensors = {}
        for name, shape, qtype, offset in infos:
            info = TensorInfo(name, shape, qtype, start + offset)
            if info.offset + info.nbytes > len(self.data):
                raise GGUFError(
                    f"{self.path} is truncated: tensor {name!r} needs bytes up to {info.offset + info.nbytes}, "
                    f"the file has {len(self.data)} (an interrupted download? fetch the file again)")
            self.tensors[name] = info

    def _tensor_info(self, cur: _Cursor) -> tuple:
        name = cur.string()
        n_dims = cur.scalar("<I")
        dims = [cur.scalar("<Q") for _ in range(n_dims)]
        raw_type = cur.scalar("<I")
        offset = cur.scalar("<Q")
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            known = ", ".join(t.name for t in GGMLQuantizationType)
            raise GGUFError(f"{self.path}: tensor {name!r} has tensor type {raw_type}, which is not a GGUF "
                            f"type this version of the gguf package knows ({known})") from None
        shape = tuple(reversed(dims))
        if qtype not in GGML_QUANT_SIZES or shape[-1] % GGML_QUANT_SIZES[qtype][0]:
            raise GGUFError(f"{self.path}: tensor {name!r} of type {qtype.name} has rows of {shape[-1]} values, "
                            f"not a whole number of {qtype.name} blocks")
        return name, shape, qtype, offset

    def blocks(self, name: str, rows: slice, first_block: int, n_blocks: int) -> np.ndarray:
        """Raw bytes of `rows` (a slice of the leading dim of a 2-D tensor, or all of a 1-D one) and
        blocks first_block .. first_block + n_blocks of their columns.  -> (rows, n_blocks * block bytes) uint8
        """
        if self.data is None:                     # closed after loading: map again
            self.data = np.memmap(self.path, mode="r")
        info = self.tensors[name]
        _, block_bytes = info.block
        n_rows = int(np.prod(info.shape[:-1], dtype=np.int64))
        table = np.ndarray((n_rows, info.row_bytes), np.uint8, self.data, info.offset)   # a view: nothing read yet
        lo = first_block * block_bytes
        return np.ascontiguousarray(table[rows, lo:lo + n_blocks * block_bytes])

    def close(self):
        self.data = None
