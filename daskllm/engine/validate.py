"""Checks on requests made on the client before any worker is touched, and the KV budget."""
from __future__ import annotations

import psutil

from ..runtime import settings


class RequestError(ValueError):
    """A request that can never be served as given."""


def check_prompt(prompt, tokenizer, cfg, max_new_tokens: int) -> list:
    """The prompt as token ids, checked against the vocabulary and the context length."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise RequestError("text prompts need a tokenizer.json in the checkpoint; pass token ids instead")
        ids = tokenizer.encode(prompt)
    else:
        ids = list(prompt)
        bad = [t for t in ids if not isinstance(t, int) and not hasattr(t, "__index__")]
        if bad:
            raise RequestError(f"a prompt is a str or a list of int token ids; found {type(bad[0]).__name__}")
        ids = [int(t) for t in ids]
        out_of_range = [t for t in ids if not 0 <= t < cfg.vocab_size]
        if out_of_range:
            raise RequestError(
                f"token id {out_of_range[0]} is outside the vocabulary (ids must be in 0..{cfg.vocab_size - 1})")
    if not ids:
        raise RequestError("empty prompt: give at least one token")
    if len(ids) + max_new_tokens > cfg.max_position:
        raise RequestError(
            f"prompt of {len(ids)} tokens + max_new_tokens {max_new_tokens} = {len(ids) + max_new_tokens} "
            f"exceeds the model's context of {cfg.max_position} tokens (max_position_embeddings)")
    return ids


def check_fits(tokens: int, budget: int):
    """A request whose context can never fit one replica's KV cache is refused, not queued forever."""
    if tokens > budget:
        raise RequestError(
            f"this request needs {tokens} tokens of KV cache (prompt + max_new_tokens) but one replica "
            f"holds at most {budget}; lower max_new_tokens, raise daskllm.kv-cache-bytes / "
            "daskllm.kv-cache-fraction, or split the sequence with sp")


def kv_bytes_per_token(cfg, mesh) -> int:
    """KV-cache bytes one token costs on the rank holding it (float32 keys and values + position)."""
    kv_heads_here = -(-cfg.n_kv_heads // mesh.tp)    # the most any rank holds (uneven GQA splits)
    return cfg.n_layers * (2 * kv_heads_here * cfg.head_dim * 4 + 8)


def budget_tokens(worker_memory: int, weights_bytes: int, per_token: int, mesh) -> int:
    """Tokens of context one replica may hold at once (summed over its running sequences)."""
    fixed = settings.get("kv-cache-bytes")
    if fixed:
        per_rank = int(fixed)
    else:
        memory = worker_memory or psutil.virtual_memory().total
        per_rank = int(max(0, memory - weights_bytes) * settings.get("kv-cache-fraction"))
    # A sequence-parallel replica spreads each sequence's tokens over sp ranks.
    return max(1, per_rank // per_token) * mesh.sp
