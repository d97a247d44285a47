"""Seams: the fixed points where a parallel strategy hooks into the forward.

The forward is written once. On one rank every seam is the local computation (or the
identity); a strategy in `daskllm.parallel` returns a `Seams` with some slots replaced
by versions that call its communicator (all-reduce after a row-parallel matmul, a ring
of K/V blocks for attention, an all-to-all to the ranks hosting the chosen experts).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from .. import kernels
from ..kernels import take_rows
from .layers import array_module, blockwise_attention
from .moe import combine_local


def identity(x):
    return x


def local_embed(table, token_ids):
    """Rows of the embedding table (any weight layout) as float32.  (V, D), (N,) -> (N, D)"""
    return take_rows(table, token_ids)


def local_attend(layer, q, k, v, batch, cache, scale, window):
    """Store this step's K/V in the cache, then attend each sequence over all it has stored.

    q (N, H, hd), k and v (N, Hkv, hd) for the batch's flattened tokens -> out (N, H, hd).
    """
    xp = array_module(q)
    out = xp.empty_like(q)
    for seq_id, lo, hi in batch.segments():
        pos = xp.asarray(batch.positions[lo:hi])                                 # global positions, on the device
        cache.append(layer, seq_id, k[lo:hi].transpose(1, 0, 2), v[lo:hi].transpose(1, 0, 2), pos)
        if hi - lo == 1 and _decode_in_one_call(q[lo:hi], cache, layer, seq_id, batch.positions[lo],
                                                scale, window, out[lo:hi]):
            continue
        keys, values, key_pos = cache.view(layer, seq_id)
        out[lo:hi] = blockwise_attention(q[lo:hi], keys, values, pos, key_pos, scale, window)[0]
    return out


def _decode_in_one_call(q, cache, layer, seq_id, position, scale, window, out) -> bool:
    """A decode step's token over every entry its sequence stored, in one compiled call (kernels.
    attend_cached) where it applies: the entries are positions first .. position in order (a local
    cache, fed token by token), all inside the window. Skipping the mask and tiles of
    blockwise_attention saves ~60 us per layer after a step's large matmuls (0.7 ms a step at 12
    layers, measured in a decode step of the 207M Llama). False: the caller takes that path."""
    keys, values, n, first = cache.buffers(layer, seq_id)
    if n != int(position) - first + 1 or (window is not None and int(position) - first >= window):
        return False
    return kernels.attend_cached(q, keys, values, n, scale, out)


def local_last_hidden(hidden, batch, rows):
    """The hidden state of the last new token of the sequences at `rows`.  -> (len(rows), D)"""
    return hidden[[batch.offsets[r + 1] - 1 for r in rows]]


def local_all_hidden(hidden, batch):
    """The hidden states of all tokens of the batch, in batch order.  -> (N, D)"""
    return hidden


def embed_here(embed, like):
    """The first stage's input: its own embedding of the tokens (`embed()`); `like` is for later stages."""
    return embed()


def whole_batch(batch):
    """The tokens this rank processes: all of them."""
    return batch


@dataclass(frozen=True)
class Seams:
    """The replaceable steps of the forward; defaults are the single-rank computation."""
    local_batch: Callable = whole_batch    # (batch) -> the part of the batch this rank processes
    stage_input: Callable = embed_here     # (embed thunk, a device array) -> (N, D) input of the layers held
    stage_output: Callable = identity      # (N, D) after the layers held -> itself, or None once sent on
    embed: Callable = local_embed          # (table, ids) -> (N, D)
    attention_out: Callable = identity     # output of the O projection -> summed over tp ranks
    mlp_out: Callable = identity           # output of the down projection -> summed over tp ranks
    heads_sum: Callable = lambda partial, projection: partial   # (N, 1) sums over this rank's q or k heads -> all heads
    attend: Callable = local_attend        # (layer, q, k, v, batch, cache, scale, window) -> (N, H, hd)
    experts: Callable = combine_local      # (x, ids, weights, experts, run_expert) -> (N, D)
    last_hidden: Callable = local_last_hidden  # (hidden, batch, rows) -> last token of those sequences
    all_hidden: Callable = local_all_hidden    # (hidden, batch) -> every token, batch order

    def with_(self, **slots) -> "Seams":
        return replace(self, **slots)


LOCAL = Seams()
