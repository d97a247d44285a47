"""Sequence parallelism: the tokens of each prefill split over the sp ranks, each rank caching its own.

Legend: p sp ranks, r this rank, n tokens of one sequence in this step, N tokens of the
whole batch, N_r those this rank processes, D hidden, H / Hkv heads held here, hd head dim.

Weights: replicated over sp (the tensor strategy, if any, slices them over tp).
Tokens ("all -> sharded", per sequence of the step):
  split       n >= p: zigzag. The n tokens are cut into 2p chunks (numpy.array_split, so any
              n works); rank r takes chunks r and 2p-1-r. Under the causal mask rank r's
              work is about the same on every rank (an early and a late chunk each), and the
              zigzag rank also caches exactly the K/V of its tokens.
  replicated  n < p (a decode step's one token, a short chunk): every rank computes all n
              tokens; the K/V of position t is cached by rank t % p only, so the ranks'
              shares of a sequence stay within a few entries of each other as it grows.
Attention (sharded queries, sharded cache -> sharded output), exact for any window:
  split       after appending its share, a rank's cache holds its part of the sequence so
              far (earlier chunks included); the options' sp_variant combines the parts:
                ring       K/V blocks round the ring (send_recv), partials merged by lse
                allgather  every part gathered on every rank (all_gather)
                ulysses    tokens -> heads (all_to_all), attend, heads -> tokens
  replicated  each rank attends to its own cache, (out, lse) merged across ranks with one
              all_gather per layer for all such sequences (flash-decoding).
Outputs ("sharded -> all"): the last token of a sequence, and every token for full logits,
  are taken from ONE rank (the one holding the split token, or rank t % p for replicated
  ones) and all_gathered, so every rank sees the same bits and samples the same token.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..model.config import ModelConfig
from ..model.forward import Batch
from ..model.layers import array_module
from ..model.seams import Seams
from .mesh import Mesh, MeshError
from .seq_attention import KERNELS, merge_across_ranks, visible_partial

AXIS = "sp"
VARIANTS = tuple(KERNELS)


def zigzag(n: int, p: int) -> list:
    """The token indices 0..n-1 each of p ranks takes: chunks r and 2p-1-r of 2p.  -> p sorted arrays"""
    chunks = np.array_split(np.arange(n, dtype=np.int64), 2 * p)
    return [np.concatenate([chunks[r], chunks[2 * p - 1 - r]]) for r in range(p)]


def local_heads(cfg: ModelConfig, tp: int) -> list:
    """[(query heads, KV heads)] of each tensor-parallel rank (uneven when tp does not divide them)."""
    from .tensor import rank_heads
    return rank_heads(cfg, tp)


def check(cfg: ModelConfig, mesh: Mesh, options: dict):
    """Refuse an unknown variant, or an Ulysses head split that does not divide the heads."""
    variant = options.get("sp_variant") or "ring"
    if variant not in VARIANTS:
        raise MeshError(f"sp_variant {variant!r} is not one of {', '.join(map(repr, VARIANTS))}")
    if variant == "ulysses":
        per_rank = local_heads(cfg, mesh.tp)
        heads, kv = next(((h, k) for h, k in per_rank if h % mesh.sp or k % mesh.sp), per_rank[0])
        per = f" per tensor-parallel rank (tp={mesh.tp})" if mesh.tp > 1 else ""
        if heads % mesh.sp or kv % mesh.sp:
            ok = [s for s in range(1, kv + 1) if kv % s == 0 and heads % s == 0]
            raise MeshError(
                f"sp_variant='ulysses' splits attention heads over the sp ranks: the {heads} attention "
                f"heads and {kv} KV heads{per} of this {cfg.family} model must both divide by sp={mesh.sp}; "
                f"use sp_variant='ring' (or 'allgather'), which split tokens, or sp in {ok}")


def plan(cfg: ModelConfig, mesh: Mesh) -> dict:
    """No tensor changes placement: weights are replicated over sp."""
    return {}


@dataclass
class SeqBatch(Batch):
    """The part of a step's batch one sp rank processes, with the layout of the whole.

    tokens / positions / offsets are this rank's (N_r rows); `whole` is the global batch;
    split[b]: sequence b is zigzag-split (else replicated); parts[b]: the global positions
    each rank holds of it (split only); global_index (N_r,) global row of each local row;
    owner (N,) the rank that presents each global row's hidden state.
    """
    whole: Batch = None
    split: tuple = ()
    parts: tuple = ()
    global_index: np.ndarray = None
    owner: np.ndarray = None
    rank: int = 0
    size: int = 1
    _local_row: np.ndarray = field(default=None, repr=False)

    def local_row(self, global_rows) -> np.ndarray:
        """Local row of each global row (this rank must hold them)."""
        if self._local_row is None:
            self._local_row = np.full(len(self.whole.tokens), -1, np.int64)
            self._local_row[self.global_index] = np.arange(len(self.global_index))
        return self._local_row[np.asarray(global_rows, np.int64)]


def split_batch(batch: Batch, rank: int, size: int) -> SeqBatch:
    """This rank's rows of `batch`: zigzag shares of sequences with >= size tokens, all of the others."""
    owner = np.empty(len(batch.tokens), np.int64)
    index, offsets, split, parts = [], [0], [], []
    for lo, hi in zip(batch.offsets[:-1], batch.offsets[1:]):
        n = hi - lo
        if n >= size:
            shares = zigzag(n, size)
            for r, idx in enumerate(shares):
                owner[lo + idx] = r
            mine = lo + shares[rank]
            parts.append(tuple(batch.positions[lo + idx] for idx in shares))
        else:
            owner[lo:hi] = batch.positions[lo:hi] % size
            mine = np.arange(lo, hi, dtype=np.int64)
            parts.append(None)
        split.append(n >= size)
        index.append(mine)
        offsets.append(offsets[-1] + len(mine))
    gi = np.concatenate(index) if index else np.zeros(0, np.int64)       # (N_r,)
    return SeqBatch(list(batch.seq_ids), batch.tokens[gi], batch.positions[gi], offsets,
                    whole=batch, split=tuple(split), parts=tuple(parts), global_index=gi,
                    owner=owner, rank=rank, size=size)


def gather_rows(comm, hidden, batch: SeqBatch, global_rows):
    """The hidden states of `global_rows` (in that order), on every rank: each from its owner.

    hidden (N_r, D) -> (len(global_rows), D). One all_gather of the rows each rank owns.
    """
    xp = array_module(hidden)
    global_rows = np.asarray(global_rows, np.int64)
    owners = batch.owner[global_rows]
    mine = batch.local_row(global_rows[owners == batch.rank])
    gathered = comm.all_gather(hidden[xp.asarray(mine)], dim=0)          # owner order, then row order
    out = xp.empty_like(gathered)
    out[xp.asarray(np.argsort(owners, kind="stable"))] = gathered
    return out


def make_attend(comm, variant: str):
    """The `attend` seam of one sp rank (see the module docstring)."""
    kernel = KERNELS[variant]

    def attend(layer, q, k, v, batch: SeqBatch, cache, scale, window):
        """q (N_r, H, hd), k and v (N_r, Hkv, hd) -> (N_r, H, hd)."""
        xp = array_module(q)
        out = xp.empty_like(q)
        rep_rows, rep_out, rep_lse = [], [], []
        for b, (seq, lo, hi) in enumerate(batch.segments()):
            pos = batch.positions[lo:hi]
            q_pos = xp.asarray(pos)
            if batch.split[b]:
                cache.append(layer, seq, k[lo:hi].transpose(1, 0, 2), v[lo:hi].transpose(1, 0, 2), q_pos)
                keys, values, k_pos = cache.view(layer, seq)             # (Hkv, m, hd) x2, (m,)
                where = batch.parts[b] if variant == "ulysses" else q_pos  # ulysses: all ranks' queries
                out[lo:hi] = kernel(comm, q[lo:hi], where, keys, values, k_pos, scale, window)
                continue
            own = pos % batch.size == batch.rank                         # the entries cached here
            if own.any():
                idx = xp.asarray(np.flatnonzero(own) + lo)
                cache.append(layer, seq, k[idx].transpose(1, 0, 2), v[idx].transpose(1, 0, 2),
                             xp.asarray(pos[own]))
            keys, values, k_pos = cache.view(layer, seq)
            o, lse = visible_partial(q[lo:hi], keys, values, q_pos, k_pos, scale, window)
            rep_rows.append(np.arange(lo, hi))
            rep_out.append(o)
            rep_lse.append(lse)
        if rep_rows:
            rows = xp.asarray(np.concatenate(rep_rows))
            out[rows] = merge_across_ranks(comm, xp.concatenate(rep_out), xp.concatenate(rep_lse))
        return out

    return attend


def seams(cfg: ModelConfig, mesh: Mesh, coords: dict, comms: dict, seams: Seams, options: dict) -> Seams:
    """Replace local_batch, attend, last_hidden and all_hidden with their sp versions."""
    comm = comms[AXIS]
    rank, size = coords[AXIS], mesh.sp
    variant = options.get("sp_variant") or "ring"

    def local_batch(batch):
        return split_batch(batch, rank, size)

    def last_hidden(hidden, batch, rows):
        return gather_rows(comm, hidden, batch, [batch.whole.offsets[r + 1] - 1 for r in rows])

    def all_hidden(hidden, batch):
        return gather_rows(comm, hidden, batch, np.arange(len(batch.whole.tokens)))

    return seams.with_(local_batch=local_batch, attend=make_attend(comm, variant),
                       last_hidden=last_hidden, all_hidden=all_hidden)
