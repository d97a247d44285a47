"""KVCache: the keys and values one rank holds for each live sequence, layer by layer.

Per sequence and layer the cache keeps k and v as (Hkv, capacity, hd) so that attention
reads each head's keys contiguously, plus the global position of every stored entry
(a sequence-parallel rank holds a non-contiguous subset of the positions).
Capacity grows by a quarter each time (at least 16 entries), so appending one token per step
is amortised O(1) and a long prefill reserves at most 25% more than it stores.
"""
from __future__ import annotations

import numpy as np


def capacity_for(entries: int) -> int:
    """The capacity a sequence's cache grows to when it must hold `entries`: the driver
    reserves this much per sequence, so the sum stays within the budget."""
    return entries + max(16, entries // 4)


class CacheFullError(MemoryError):
    """Storing more would exceed the cache budget of this rank."""


class _SeqCache:
    __slots__ = ("k", "v", "pos", "length")

    def __init__(self, n_layers):
        self.k = [None] * n_layers     # each (Hkv, cap, hd)
        self.v = [None] * n_layers
        self.pos = [None] * n_layers   # each (cap,) int64
        self.length = [0] * n_layers


class KVCache:
    """Keys/values per (sequence, layer); `budget_bytes` bounds what it may hold."""

    def __init__(self, n_layers, xp=np, dtype=np.float32, budget_bytes=None):
        self.n_layers = n_layers
        self.xp = xp
        self.dtype = dtype
        self.budget_bytes = budget_bytes
        self._seqs: dict = {}
        self.bytes_reserved = 0
        self.peak_bytes = 0            # the most bytes_reserved reached (reset with reset_peak)

    def __contains__(self, seq_id):
        return seq_id in self._seqs

    def seq_ids(self):
        return list(self._seqs)

    def length(self, seq_id, layer=0) -> int:
        """Entries stored for this sequence on this rank (0 if unknown)."""
        seq = self._seqs.get(seq_id)
        return 0 if seq is None else seq.length[layer]

    def append(self, layer, seq_id, k, v, pos):
        """Store new entries.  k, v (Hkv, T, hd), pos (T,) global positions."""
        seq = self._seqs.get(seq_id)
        if seq is None:
            seq = self._seqs[seq_id] = _SeqCache(self.n_layers)
        n_new = k.shape[1]
        used = seq.length[layer]
        if seq.k[layer] is None or used + n_new > seq.k[layer].shape[1]:
            # room for this chunk plus a quarter: a long prefill wastes little
            self._grow(seq, layer, k.shape[0], k.shape[2], capacity_for(used + n_new))
        seq.k[layer][:, used:used + n_new] = k
        seq.v[layer][:, used:used + n_new] = v
        seq.pos[layer][used:used + n_new] = pos
        seq.length[layer] = used + n_new

    def buffers(self, layer, seq_id):
        """(k buffer, v buffer, n, first position): the whole (Hkv, capacity, hd) arrays whose first
        n columns `view` gives, for kernels that read them directly."""
        seq = self._seqs[seq_id]
        n = seq.length[layer]
        return seq.k[layer], seq.v[layer], n, int(seq.pos[layer][0])

    def view(self, layer, seq_id):
        """(k, v, pos) stored so far: (Hkv, n, hd), (Hkv, n, hd), (n,)."""
        seq = self._seqs.get(seq_id)
        if seq is None or seq.k[layer] is None:
            return None, None, None
        n = seq.length[layer]
        return seq.k[layer][:, :n], seq.v[layer][:, :n], seq.pos[layer][:n]

    def release(self, seq_id):
        seq = self._seqs.pop(seq_id, None)
        if seq is not None:
            self.bytes_reserved -= sum(2 * k.nbytes + p.nbytes for k, p in zip(seq.k, seq.pos) if k is not None)

    def clear(self):
        for seq_id in list(self._seqs):
            self.release(seq_id)

    def _grow(self, seq, layer, n_kv, head_dim, capacity):
        xp = self.xp
        old_k, old_v, old_pos = seq.k[layer], seq.v[layer], seq.pos[layer]
        new_bytes = 2 * n_kv * capacity * head_dim * np.dtype(self.dtype).itemsize + capacity * 8
        old_bytes = 0 if old_k is None else 2 * old_k.nbytes + old_pos.nbytes
        if self.budget_bytes is not None and self.bytes_reserved + new_bytes - old_bytes > self.budget_bytes:
            raise CacheFullError(
                f"KV cache budget of {self.budget_bytes} bytes exceeded: {self.bytes_reserved} in use, "
                f"{new_bytes - old_bytes} more needed for layer {layer}")
        k = xp.empty((n_kv, capacity, head_dim), self.dtype)
        v = xp.empty((n_kv, capacity, head_dim), self.dtype)
        pos = xp.empty((capacity,), np.int64)
        used = seq.length[layer]
        if old_k is not None:
            k[:, :used], v[:, :used], pos[:used] = old_k[:, :used], old_v[:, :used], old_pos[:used]
        seq.k[layer], seq.v[layer], seq.pos[layer] = k, v, pos
        self.bytes_reserved += new_bytes - old_bytes
        self.peak_bytes = max(self.peak_bytes, self.bytes_reserved)
