"""Checkpoints (safetensors, read lazily by slice), tokenizers, the built-in model."""
