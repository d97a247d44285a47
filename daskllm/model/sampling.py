"""Choosing the next token from logits whose vocabulary may be split over tensor-parallel ranks.

Sampling is the Gumbel-max trick: the token is argmax(logit / T + g) over the allowed
tokens, where the noise g of token id v depends only on (seed, counter, v). So the
choice is the same whether the vocabulary sits on one rank or is split over several,
and the same seed gives the same tokens. Ranks exchange only their best candidates,
never the full logits, except in the rare top-p case that needs more (then exactly).

Legend: B rows (sequences), V vocabulary rows held here, C candidates per rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .layers import array_module

DEFAULT_CANDIDATES = 256     # per rank, for top-p without top-k


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0     # 0: greedy
    top_k: int = 0               # 0: no limit
    top_p: float = 1.0           # 1: no nucleus cut
    seed: int = 0                # the driver draws one when the caller gives none

    def __post_init__(self):
        if not (self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no limit), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def filtered(self) -> bool:
        return not self.greedy and (self.top_k > 0 or self.top_p < 1)


def gumbel_noise(seed: int, counter: int, ids: np.ndarray) -> np.ndarray:
    """Standard Gumbel noise for token `ids`, a pure function of (seed, counter, id)."""
    with np.errstate(over="ignore"):
        x = (np.asarray(ids, np.uint64) * np.uint64(0x9E3779B97F4A7C15)
             ^ np.uint64(seed & (2**64 - 1)) * np.uint64(0xBF58476D1CE4E5B9)
             ^ np.uint64(counter) * np.uint64(0x94D049BB133111EB))
        for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):   # splitmix64 finaliser
            x = (x ^ (x >> np.uint64(shift))) * np.uint64(mult)
        x ^= x >> np.uint64(31)
    u = ((x >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53                  # (0, 1)
    return -np.log(-np.log(u))


def _local_candidates(keys, k):
    """The k largest keys of each row, highest first, and their column.  (B, V) -> (B, k) x2"""
    if k >= keys.shape[1]:
        cols = np.argsort(-keys, axis=1, kind="stable")
    else:
        cols = np.argpartition(-keys, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(keys, cols, 1), axis=1, kind="stable")
        cols = np.take_along_axis(cols, order, 1)
    return np.take_along_axis(keys, cols, 1), cols


def _logsumexp(x, axis=-1):
    top = np.max(x, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    return (np.log(np.sum(np.exp(x - top), axis=axis, keepdims=True)) + top).squeeze(axis)


def next_tokens(logits, vocab_start, params, counters, comm=None):
    """The next token of each row.

    logits (B, V) float32 over global ids vocab_start .. vocab_start+V; params and counters
    one per row (counter: index of the token being generated). `comm` joins the ranks that
    hold the other vocabulary slices (None: this rank holds all). -> (B,) int64 global ids.
    """
    if all(p.greedy for p in params):
        return _greedy(logits, vocab_start, comm)
    logits = np.asarray(logits.get() if hasattr(logits, "get") else logits, np.float64)
    b, v = logits.shape
    ids = np.arange(vocab_start, vocab_start + v, dtype=np.int64)
    temps = np.array([p.temperature if not p.greedy else 1.0 for p in params])
    scaled = logits / temps[:, None]                                                  # (B, V)
    keys = scaled.copy()
    for row, p in enumerate(params):
        if not p.greedy and not p.filtered:        # plain sampling: the winner is argmax(scaled + g)
            keys[row] += gumbel_noise(p.seed, counters[row], ids)
    n_cand = max([1] + [p.top_k or DEFAULT_CANDIDATES for p in params if p.filtered])
    values, cols = _local_candidates(keys, min(n_cand, v))                           # (B, C)
    lse = _logsumexp(scaled)                                                          # (B,)
    parts = [(values, cols + vocab_start, lse)]
    if comm is not None and comm.size > 1:
        # One exchange per step: values, global ids (exact in float64 below 2^53) and lse packed.
        packed = np.concatenate([values, (cols + vocab_start).astype(np.float64), lse[:, None]], axis=1)
        parts = [(p[:, :c], p[:, c:2 * c].astype(np.int64), p[:, 2 * c])               # (B, 2C+1) per rank,
                 for p in comm.all_gather_list(packed) for c in [(p.shape[1] - 1) // 2]]   # C differs by rank
    cand_v = np.concatenate([p[0] for p in parts], axis=1)                            # (B, R*C)
    cand_id = np.concatenate([p[1] for p in parts], axis=1)
    total_lse = np.logaddexp.reduce(np.stack([p[2] for p in parts]), axis=0)          # (B,)
    out = np.empty(b, np.int64)
    for row, p in enumerate(params):
        order = np.lexsort((cand_id[row], -cand_v[row]))                              # value desc, id asc
        v_row, id_row = cand_v[row][order], cand_id[row][order]
        if not p.filtered:
            out[row] = id_row[0]
            continue
        keep = _nucleus(v_row, p, total_lse[row])
        if keep is None:                           # the nucleus runs past the candidates: use all logits
            v_row, id_row = _all_logits(scaled[row], ids, comm)
            keep = _nucleus(v_row, p, _logsumexp(v_row))
        v_row, id_row = v_row[:keep], id_row[:keep]
        out[row] = id_row[np.argmax(v_row + gumbel_noise(p.seed, counters[row], id_row))]
    return out


def _greedy(logits, vocab_start, comm):
    """argmax over all vocabulary slices, ties to the lowest id; only (value, id) per row moves."""
    xp = array_module(logits)
    local = logits.argmax(axis=1)                                                      # (B,)
    best = logits[xp.arange(logits.shape[0]), local]
    if hasattr(best, "get"):                                                           # cupy -> host: 2B numbers
        best, local = best.get(), local.get()
    mine = np.stack([np.asarray(best, np.float64), np.asarray(local + vocab_start, np.float64)], axis=1)  # (B, 2)
    if comm is None or comm.size == 1:
        return mine[:, 1].astype(np.int64)
    every = np.stack(comm.all_gather_list(mine))                                      # (R, B, 2), rank order
    # Highest value wins; on a tie the lower rank, which holds the lower ids, as argmax would.
    winner = np.argmax(every[:, :, 0], axis=0)                                        # (B,)
    return every[winner, np.arange(every.shape[1]), 1].astype(np.int64)


def _nucleus(values, p, lse):
    """How many of the sorted candidates top-k and top-p keep, or None if more are needed."""
    n = len(values)
    if p.top_k:
        n = min(n, p.top_k)
        lse = _logsumexp(values[:n])              # top-p acts on the renormalised top-k
    if p.top_p >= 1:
        return n
    mass = np.cumsum(np.exp(values[:n] - lse))
    reached = np.nonzero(mass >= p.top_p - 1e-12)[0]
    if len(reached) == 0:
        return n if p.top_k else None
    return int(reached[0]) + 1


def _all_logits(scaled_row, ids, comm):
    """Every rank's logits of one row, sorted (value desc, id asc)."""
    v, i = scaled_row, ids
    if comm is not None and comm.size > 1:
        v = np.concatenate(comm.all_gather_list(scaled_row))
        i = np.concatenate(comm.all_gather_list(ids))
    order = np.lexsort((i, -v))
    return v[order], i[order]
