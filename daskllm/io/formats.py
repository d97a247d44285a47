"""Open a checkpoint by its format: a GGUF file (or a directory with one), else a safetensors directory."""
from __future__ import annotations

from .checkpoint import Checkpoint
from .gguf import GGUFCheckpoint, find_gguf
from .tokenizer import Tokenizer


def open_checkpoint(path):
    """GGUFCheckpoint for `x.gguf` or a directory holding one .gguf and no config.json; else Checkpoint."""
    gguf = find_gguf(path)
    return GGUFCheckpoint(gguf) if gguf is not None else Checkpoint(path)


def open_tokenizer(checkpoint) -> Tokenizer | None:
    """The checkpoint's tokenizer: from the GGUF metadata, or tokenizer.json in its directory."""
    if isinstance(checkpoint, GGUFCheckpoint):
        return Tokenizer.from_gguf(checkpoint.metadata)
    return Tokenizer.from_dir(checkpoint.path)
