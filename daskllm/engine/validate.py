"""Checks on requests made on the client before any worker is touched, and the KV budget.

What a NumPy user passes is taken as meant: an integer array is token ids (2-D: one prompt
per row), and NumPy integers and floats count as numbers. bytes, bools and other look-alikes
are refused with a message saying what to pass instead.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import psutil

from ..model.cache import capacity_for
from ..parallel.pipeline import stage_bounds
from ..runtime import settings


class RequestError(ValueError):
    """A request that can never be served as given."""


_PROMPT = "a prompt is a str or a list of int token ids"


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def _looks_int(x) -> bool:
    """An element that makes its list one prompt of token ids (a bool too: refused later, by name)."""
    return isinstance(x, (numbers.Integral, np.bool_))


def as_prompts(prompts) -> list:
    """The prompts of one call as a list: one str or token-id sequence, or a list of them."""
    if isinstance(prompts, np.ndarray):
        if prompts.ndim == 2:
            return list(prompts)
        return [prompts]
    if isinstance(prompts, (str, bytes, bytearray)):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if prompts and _looks_int(prompts[0]):
            return [prompts]               # one prompt of token ids
        return list(prompts)
    raise RequestError(f"prompts must be a str, a list of int token ids, or a list of those; got "
                       f"{type(prompts).__name__}")


def one_prompt(prompt, method: str) -> list:
    """[prompt] for a method that takes exactly one prompt; a list of prompts is refused."""
    several = prompt.ndim != 1 if isinstance(prompt, np.ndarray) else (
        isinstance(prompt, (list, tuple)) and bool(prompt) and not _looks_int(prompt[0]))
    if several:
        raise RequestError(f"{method}() takes one prompt (a str or a list of token ids), got {len(prompt)} "
                           f"prompts; call {method}() once per prompt, or submit() them all and read each "
                           "request's pieces()")
    return [prompt]


def check_sequences(sequences, cfg) -> list:
    """The token-id sequences of a logits() call, each checked like a prompt."""
    if isinstance(sequences, (str, bytes)) or not isinstance(sequences, (list, tuple, np.ndarray)) \
            or len(sequences) == 0:
        raise RequestError(f"logits() takes a non-empty list of token-id sequences, e.g. [[1, 2, 3]]; "
                           f"got {sequences!r:.80}")
    flat = sequences.ndim != 2 if isinstance(sequences, np.ndarray) else _looks_int(sequences[0])
    if flat:
        raise RequestError("logits() takes a list of sequences: wrap a single one in a list, [[1, 2, 3]]")
    if any(isinstance(s, str) for s in sequences):
        raise RequestError("logits() takes token ids, not text; encode it first: llm.tokenizer.encode(text)")
    return [check_prompt(s, None, cfg, 0) for s in sequences]


def check_prompt(prompt, tokenizer, cfg, max_new_tokens: int) -> list:
    """The prompt as token ids, checked against the vocabulary and the context length."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise RequestError("text prompts need a tokenizer.json in the checkpoint; pass token ids instead")
        ids = encode_text(prompt, tokenizer, cfg)
    elif isinstance(prompt, (bytes, bytearray)):
        raise RequestError(f"{_PROMPT}; got {type(prompt).__name__}: decode text first (data.decode('utf-8')), "
                           "or pass list(data) if the bytes are token ids")
    elif isinstance(prompt, np.ndarray):
        if prompt.ndim != 1 or not np.issubdtype(prompt.dtype, np.integer):
            raise RequestError(f"a token-id array must be 1-D with an integer dtype; got {prompt.dtype} "
                               f"of shape {prompt.shape}")
        ids = prompt.tolist()
    elif isinstance(prompt, (list, tuple)):
        bad = [t for t in prompt if not _is_int(t)]
        if bad:
            raise RequestError(f"{_PROMPT}; found {type(bad[0]).__name__} {bad[0]!r} in a token-id list")
        ids = [int(t) for t in prompt]
    else:
        raise RequestError(f"{_PROMPT}; got {type(prompt).__name__}")
    if not isinstance(prompt, str):
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


def encode_text(text: str, tokenizer, cfg) -> list:
    """Token ids of a text prompt; refused if the text is not valid Unicode or the tokenizer
    yields ids the model does not have (a tokenizer.json that does not match config.json)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"prompt text is not valid Unicode: {e.reason} ({text[e.start:e.end]!r} at position "
                           f"{e.start}); decode bytes with errors='replace' first") from None
    ids = tokenizer.encode(text)
    bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
    if bad:
        raise RequestError(f"the tokenizer turned the prompt into token id {bad[0]}, outside the model's vocabulary "
                           f"(0..{cfg.vocab_size - 1}): tokenizer.json does not match config.json's vocab_size")
    return ids


def check_int(name: str, value, minimum: int) -> int:
    """An integer setting (Python or NumPy int, never a bool) of at least `minimum`."""
    if not _is_int(value) or value < minimum:
        raise RequestError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_real(name: str, value) -> float:
    """A real-number setting (Python or NumPy, never a bool or a string)."""
    if not _is_real(value) or math.isnan(value):
        raise RequestError(f"{name} must be a number, got {value!r}")
    return float(value)


def check_seed(seed):
    if seed is not None and not _is_int(seed):
        raise RequestError(f"seed must be an integer or None (a fresh seed per prompt), got {seed!r}")
    return None if seed is None else int(seed)


def check_stop(stop, tokenizer) -> tuple:
    """Stop strings as a tuple of non-empty str (an empty one would end every request at once)."""
    if stop is None:
        return ()
    items = (stop,) if isinstance(stop, (str, bytes, bytearray)) else stop
    if not isinstance(items, (list, tuple)):
        raise RequestError(f"stop must be a str or a list of str, got {type(stop).__name__}")
    for s in items:
        if not isinstance(s, str):
            raise RequestError(f"stop strings must be str, got {type(s).__name__} {s!r}")
        if not s:
            raise RequestError("stop strings must not be empty: an empty stop string would end every request "
                               "before its first token; leave it out")
    if items and tokenizer is None:
        raise RequestError("stop strings need a tokenizer.json in the checkpoint directory")
    return tuple(items)


def check_fits(tokens: int, budget: int, reserved: int | None = None):
    """A request whose context can never fit one replica's KV cache is refused, not queued forever.

    tokens: prompt + max_new_tokens; reserved: the KV entries the replica reserves for it."""
    reserved = tokens if reserved is None else reserved
    if reserved > budget:
        raise RequestError(
            f"this request needs {reserved} tokens of KV cache ({tokens} of prompt + max_new_tokens, with the "
            f"cache's growth room) but one replica holds at most {budget}; lower max_new_tokens, raise "
            "daskllm.kv-cache-bytes / daskllm.kv-cache-fraction, or split the sequence with sp")


def budget_groups(seqs: list, reservation, budget: int) -> list:
    """Consecutive sequences grouped so that each group's KV reservations fit `budget` together.

    reservation(len) -> KV entries a sequence of that length reserves. -> [[(seq, reserved), ...], ...];
    a sequence that can never fit is refused (RequestError)."""
    groups = [[]]
    for s in seqs:
        need = reservation(len(s))
        check_fits(len(s), budget, need)
        if groups[-1] and sum(n for _, n in groups[-1]) + need > budget:
            groups.append([])
        groups[-1].append((s, need))
    return groups


def kv_reservation(tokens: int, sp: int = 1, chunk: int = 4096) -> int:
    """KV entries (summed over a replica's sp ranks) a sequence of `tokens` may occupy at most.

    A rank's cache grows by a margin (model.cache.capacity_for); the driver reserves that
    margin, so the running sequences' caches never exceed the budget. With sp, a rank holds
    its zigzag share of each prefill chunk (at most 2 rows more than an even share) and one
    decode token in sp."""
    if sp == 1:
        return capacity_for(tokens)
    per_rank = -(-tokens // sp) + 2 * -(-tokens // chunk) + 1
    return sp * capacity_for(per_rank)


def kv_bytes_per_token(cfg, mesh) -> int:
    """KV-cache bytes one token costs on the rank holding it (float32 keys and values + position)."""
    kv_heads_here = -(-cfg.n_kv_heads // mesh.tp)    # the most any rank holds (uneven GQA splits)
    layers_here = cfg.n_layers
    if mesh.pp > 1:                                   # the largest pipeline stage's layers
        layers_here = max(hi - lo for lo, hi in stage_bounds(cfg, mesh.pp))
    return layers_here * (2 * kv_heads_here * cfg.head_dim * 4 + 8)


def budget_tokens(worker_memory: int, weights_bytes: int, per_token: int, mesh, sharing: int = 1) -> int:
    """Tokens of context one replica may hold at once (summed over its running sequences).

    sharing: ranks (of any LLM) on the busiest worker of the replica, this one included; a
    budget from the memory fraction takes that worker's memory divided among them."""
    fixed = settings.get("kv-cache-bytes")
    if fixed:
        per_rank = int(fixed)
    else:
        memory = (worker_memory or psutil.virtual_memory().total) // max(1, sharing)
        per_rank = int(max(0, memory - weights_bytes) * settings.get("kv-cache-fraction"))
    # A sequence-parallel replica spreads each sequence's tokens over sp ranks.
    return max(1, per_rank // per_token) * mesh.sp
