"""Checkpoint: a Hugging Face safetensors checkpoint, checked up front and read lazily by slice.

Only safetensors is read; pickle-based formats are refused and never opened. Opening a
checkpoint reads the config and the tensor headers, not the data; `read` fetches one
tensor, or one slice of it, from disk.
"""
from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for safetensors)
import numpy as np
from safetensors import safe_open

from ..model.config import ModelConfig
from .integrity import CheckpointError, check_finite, check_header
from .names import expected_shapes, hf_to_ours, is_ignored, ours_to_hf

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_NAME = "model.safetensors.index.json"


def refuse_pickle(path: Path):
    raise CheckpointError(
        f"{path} is a pickle-based checkpoint; daskllm never unpickles weights (it can run code). "
        "Convert it to safetensors, e.g. `model.save_pretrained(dir, safe_serialization=True)` "
        "in transformers, and pass that directory.")


class Checkpoint:
    """A checkpoint directory: config.json plus one or several .safetensors files.

    Example
    -------
    >>> ckpt = Checkpoint("tests/fixtures/golden/llama")          # doctest: +SKIP
    >>> ckpt.read("layers.0.wq", (slice(0, 32), slice(None))).shape  # doctest: +SKIP
    (32, 64)
    """

    def __init__(self, path, config: ModelConfig | None = None):
        self.path = Path(path)
        if self.path.is_file():
            if self.path.suffix in PICKLE_SUFFIXES:
                refuse_pickle(self.path)
            raise CheckpointError(f"{self.path} is a file; pass the checkpoint directory (with config.json)")
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint directory {self.path} does not exist")
        if not (self.path / "config.json").exists():
            raise CheckpointError(f"{self.path} has no config.json; a Hugging Face checkpoint directory is expected")
        self.config = config or ModelConfig.from_file(self.path / "config.json")
        self._handles: dict = {}
        self.files = self._weight_files()
        self.entries = self._scan_headers()     # our name -> (file, hf name, shape, dtype)
        self.validate()

    def _weight_files(self) -> dict:
        """hf name -> file, from the index when sharded."""
        index = self.path / INDEX_NAME
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            missing = sorted({f for f in weight_map.values() if not (self.path / f).exists()})
            if missing:
                raise CheckpointError(f"{index} lists files that are not in {self.path}: {', '.join(missing)}")
            return {name: self.path / f for name, f in weight_map.items()}
        files = sorted(self.path.glob("model*.safetensors"))
        if not files:
            pickles = [p for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES]
            if pickles:
                refuse_pickle(pickles[0])
            raise CheckpointError(f"{self.path} holds no model*.safetensors file (and no {INDEX_NAME})")
        names = {}
        for f in files:
            names.update({k: f for k in self._handle(f).keys()})
        return names

    def _handle(self, file: Path):
        h = self._handles.get(file)
        if h is None:
            check_header(file)           # a damaged file is refused with its name and what is wrong
            h = self._handles[file] = safe_open(file, framework="np")
        return h

    def _scan_headers(self) -> dict:
        entries, unexpected = {}, []
        for hf_name, file in self.files.items():
            ours = hf_to_ours(hf_name)
            if ours is None:
                if not is_ignored(hf_name):
                    unexpected.append(f"{hf_name} (in {file.name})")
                continue
            tensor = self._handle(file).get_slice(hf_name)
            entries[ours] = (file, hf_name, tuple(tensor.get_shape()), tensor.get_dtype())
        if unexpected:
            raise CheckpointError(
                f"unexpected tensors in {self.path} for a {self.config.family} model: {', '.join(unexpected[:5])}"
                + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""))
        return entries

    def validate(self):
        """Every tensor the config implies is present with the right shape, and nothing else."""
        expected = expected_shapes(self.config)
        if self.config.tie_embeddings:
            expected_extra = {"lm_head"}   # some tied checkpoints still store the head: allowed, unused
        else:
            expected_extra = set()
        missing = [n for n in expected if n not in self.entries]
        if missing:
            raise CheckpointError(
                f"missing tensor {self._hf_hint(missing[0])} in {self.path} (expected shape {expected[missing[0]]})"
                + (f"; {len(missing) - 1} more missing" if len(missing) > 1 else ""))
        for name, (file, hf_name, shape, dtype) in self.entries.items():
            if name in expected_extra:
                continue
            if name not in expected:
                raise CheckpointError(f"unexpected tensor {hf_name} in {file.name}: the config has no place for it")
            if shape != expected[name]:
                raise CheckpointError(
                    f"tensor {hf_name} in {file.name} has shape {shape}, expected {expected[name]} from config.json")
            if dtype not in ("F32", "F16", "BF16"):
                raise CheckpointError(f"tensor {hf_name} in {file.name} has dtype {dtype}; F32, F16 or BF16 expected")

    def _hf_hint(self, ours: str) -> str:
        hf = ours_to_hf(ours, self.config.family)
        return f"{hf!r} (ours: {ours!r})" if hf else repr(ours)

    def shape(self, name: str) -> tuple:
        return self.entries[name][2]

    def stored_dtype(self, name: str) -> str:
        """"float32", "bfloat16" or "float16": how tensor `name` is stored on disk."""
        return {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[self.entries[name][3]]

    def nbytes(self, name: str) -> int:
        _, _, shape, dtype = self.entries[name]
        return int(np.prod(shape)) * {"F32": 4, "F16": 2, "BF16": 2}[dtype]

    def read(self, name: str, index=None, dtype=np.float32) -> np.ndarray:
        """Tensor `name` (or `index`, a tuple of slices, of it) as `dtype`, reading only that part.

        dtype None keeps the dtype stored on disk (to ship slices to workers without the files).
        """
        file, hf_name, shape, _ = self.entries[name]
        tensor = self._handle(file).get_slice(hf_name)
        data = tensor[index] if index is not None else tensor[tuple(slice(None) for _ in shape)]
        check_finite(data, hf_name, file, index)
        return np.ascontiguousarray(data, dtype=dtype)

    def close(self):
        self._handles.clear()
