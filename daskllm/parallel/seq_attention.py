"""The attention kernels of sequence parallelism: ring, all-gather, Ulysses, and the split-cache merge.

Legend: p sp ranks, n this rank's query tokens of one sequence, m this rank's cached keys
of it (its own share, new tokens included), M all ranks' cached keys, H / Hkv query / KV
heads held here, hd head dim, R query rows of the replicated (decode, short) segments.

Attention over keys split into disjoint blocks is exact by the log-sum-exp merge:
    softmax(q K^T) V = sum_b w_b out_b,  w_b = exp(lse_b - lse),  lse = log sum_b exp(lse_b)
where (out_b, lse_b) = attention_partial(q, K_b, V_b); `merge_partials` does the sum.
Every function is pure apart from its communicator calls, which every rank of the group
makes in the same order.
"""
from __future__ import annotations

from ..model.layers import array_module, blockwise_attention, merge_partials


def visible_partial(q, k, v, q_pos, k_pos, scale, window=None):
    """Attention (blockwise, see model.layers) on only the keys some query sees and the queries that see some key.

    q (n, H, hd), k and v (Hkv, m, hd) or None, q_pos (n,), k_pos (m,) -> out (n, H, hd),
    lse (n, H). The result equals attention_partial's (a masked key adds exp(-inf) = 0);
    trimming makes a causally invisible block cost nothing, which is what the zigzag
    assignment balances.
    """
    xp = array_module(q)
    n, h, _ = q.shape
    out = xp.zeros_like(q)                                              # (n, H, hd)
    lse = xp.full((n, h), -xp.inf, q.dtype)                             # (n, H)
    if k is None or k.shape[1] == 0 or n == 0:
        return out, lse
    keep_k = k_pos <= q_pos.max()                                       # (m,)
    if window is not None:
        keep_k &= k_pos > q_pos.min() - window
    if not bool(keep_k.any()):
        return out, lse
    if not bool(keep_k.all()):
        k, v, k_pos = k[:, keep_k], v[:, keep_k], k_pos[keep_k]
    keep_q = q_pos >= k_pos.min()                                       # (n,)
    if window is not None:
        keep_q &= q_pos < k_pos.max() + window
    if bool(keep_q.all()):
        return blockwise_attention(q, k, v, q_pos, k_pos, scale, window)
    if not bool(keep_q.any()):
        return out, lse
    out[keep_q], lse[keep_q] = blockwise_attention(q[keep_q], k, v, q_pos[keep_q], k_pos, scale, window)
    return out, lse


def ring_attention(comm, q, q_pos, keys, values, k_pos, scale, window):
    """Local queries against every rank's K/V block, the blocks passed round the ring.

    q (n, H, hd), keys and values (Hkv, m, hd), k_pos (m,) -> (n, H, hd).
    Step s attends to the block of rank (r - s) % p; p - 1 send_recv shifts of (2, Hkv, m_j, hd)
    and (m_j,) move (p - 1) * M/p keys and values per rank. Only two blocks live at once.
    """
    xp = array_module(q)
    kv, pos = xp.stack([keys, values]), k_pos                          # (2, Hkv, m, hd), (m,)
    outs, lses = [], []
    for step in range(comm.size):
        if step:
            kv, pos = comm.send_recv(kv), comm.send_recv(pos)            # block of rank (r - step) % p
        o, l = visible_partial(q, kv[0], kv[1], q_pos, pos, scale, window)
        outs.append(o)
        lses.append(l)
    return merge_partials(outs, lses)[0]


def allgather_attention(comm, q, q_pos, keys, values, k_pos, scale, window):
    """Local queries against all ranks' K/V, gathered whole on every rank.

    q (n, H, hd), keys and values (Hkv, m, hd) -> (n, H, hd). One all_gather of
    (2, Hkv, m, hd): each rank receives the (p - 1) * M/p keys and values of the others
    (as the ring does) but holds all M at once.
    """
    kv = comm.all_gather(array_module(q).stack([keys, values]), dim=2)  # (2, Hkv, M, hd)
    pos = comm.all_gather(k_pos, dim=0)                                 # (M,)
    return visible_partial(q, kv[0], kv[1], q_pos, pos, scale, window)[0]


def ulysses_attention(comm, q, q_pos_all, keys, values, k_pos, scale, window):
    """Switch from a token split to a head split, attend, and switch back (all-to-all).

    q (n, H, hd) of this rank's tokens; q_pos_all: each rank's query positions, rank order;
    keys and values (Hkv, m, hd) -> (n, H, hd). Rank j takes query heads j*H/p..(j+1)*H/p - 1
    and the KV heads they read, j*Hkv/p..(j+1)*Hkv/p - 1 (GQA groups are contiguous), so
    H and Hkv must divide by p. Moves (p - 1)/p of q, of the cached K/V and of the output.
    """
    xp = array_module(q)
    p = comm.size
    hs, ks = q.shape[1] // p, keys.shape[0] // p
    if hs * p != q.shape[1] or ks * p != keys.shape[0]:
        raise ValueError(f"ulysses attention needs the {q.shape[1]} query heads and {keys.shape[0]} KV heads "
                         f"held here to divide by sp={p}; use sp_variant='ring'")
    q_parts = comm.all_to_all([xp.ascontiguousarray(q[:, j * hs:(j + 1) * hs]) for j in range(p)])
    qh = xp.concatenate(q_parts, axis=0)                                # (N, H/p, hd), all tokens, my heads
    qh_pos = xp.concatenate([xp.asarray(a) for a in q_pos_all])         # (N,)
    kv_parts = comm.all_to_all([xp.stack([keys[j * ks:(j + 1) * ks], values[j * ks:(j + 1) * ks]])
                                for j in range(p)])                     # each (2, Hkv/p, m_j, hd)
    kv = xp.concatenate(kv_parts, axis=2)                               # (2, Hkv/p, M, hd)
    pos = comm.all_gather(k_pos, dim=0)                                 # (M,)
    out = visible_partial(qh, kv[0], kv[1], qh_pos, pos, scale, window)[0]  # (N, H/p, hd)
    bounds = [0]
    for part in q_parts:
        bounds.append(bounds[-1] + part.shape[0])
    back = comm.all_to_all([xp.ascontiguousarray(out[bounds[j]:bounds[j + 1]]) for j in range(p)])
    return xp.concatenate(back, axis=1)                                 # (n, H, hd)


def merge_across_ranks(comm, outs, lses):
    """Flash-decoding across ranks: each rank's partials over its own cache, merged everywhere.

    outs (R, H, hd), lses (R, H) over this rank's keys -> (R, H, hd) over all ranks' keys.
    One all_gather of (R, H*hd + H) per layer, whatever the number of sequences.
    """
    xp = array_module(outs)
    r, h, hd = outs.shape
    packed = xp.concatenate([outs.reshape(r, h * hd), lses], axis=1)   # (R, H*hd + H)
    parts = comm.all_gather_list(packed)
    return merge_partials([a[:, :h * hd].reshape(r, h, hd) for a in parts],
                          [a[:, h * hd:] for a in parts])[0]


KERNELS = {"ring": ring_attention, "allgather": allgather_attention, "ulysses": ulysses_attention}
