"""Expert parallelism: each rank of an ep group holds whole experts and runs them on the tokens that chose them.

Legend: N tokens on this rank, n its share, D hidden, E experts, A active experts per token,
P ep ranks (the group), R routing columns (2A: expert ids then weights).

Layout (split of the expert weights, "experts -> owner"):
  experts 0..E-1 of every MoE layer are cut into P contiguous ranges, the first E % P
  ranges one longer (8 experts over 3 ranks: 3, 3, 2); rank p of the ep axis reads only
  `layers.{i}.experts.{e}.*` for the e in its range. Router, attention, norms, dense
  MLPs and the Qwen2-MoE shared expert keep the placement the other axes give them.

The routed MLP, for token x with chosen experts a and router weights w_a:
  y(x) = sum_a w_a * expert_a(x) = sum_p sum_{a on p} w_a * expert_a(x)

ep alone (tp = sp = 1): the dense parts are replicated, so every rank of the group already holds
all N tokens and routes them alike (same inputs, same bits, on ranks whose BLAS rounds alike).
No token needs to travel: each rank runs its own experts on the tokens that chose them, and one
all_reduce adds the ranks' partial sums in rank order (partials -> all), as vLLM does for
experts spread over tensor-parallel ranks.
That is one collective per MoE layer instead of three (dispatch, combine, gather): a decode
step pays per call far more than per byte. Bytes: each rank sends N x D; token routing sends
about 0.77 N x D there and back plus N/2 x D gathered at ep = 2, top-2 of 16 experts.

ep == tp (any sp): the ep groups are the tp groups (see mesh.py). Their ranks hold the same
tokens and route them alike, and the tensor strategy's `mlp_out` all_reduce over tp adds what
each rank's MoE block returns (the tp-split shared expert is a partial sum already): each rank
returns its own experts' sums and the experts need no collective of their own.

Otherwise (tp > 1 or sp > 1, ep != tp) each rank of the group computes y for a share of the tokens:
  1. share     the tokens this rank holds are also held by the other ranks of its tp group;
               rank i of the group takes the i-th contiguous share (all -> sharded)
  2. dispatch  each token of the share goes ONCE to every rank owning one of its experts,
               as one row [x (D) | ids (A) | weights (A)], ids of experts held elsewhere -1
               (all_to_all, sharded -> owner)
  3. experts   the owner runs each of its experts on all rows that chose it, from every
               source at once, and sums the weighted outputs per row (one row per token)
  4. combine   the per-row sums go back to the token's rank (all_to_all, owner -> sharded)
               and are added there in rank order
  5. finish    tp > 1: the share's rows are written into zeros (N, D) and the tensor
               strategy's `mlp_out` all_reduce over tp adds the shares, so each token's
               routed output is counted exactly once (sharded -> partial sums);
               tp = 1 with sp > 1: every rank holds distinct tokens, the share is all of them.
Any mesh with ep dividing tp x sp works this way: an ep group holds every expert, and a
token share only ever travels inside the ep group of the rank that took it.
"""
from __future__ import annotations

import numpy as np

from ..model.layers import array_module
from ..model.moe import combine_local
from .mesh import MeshError
from .plan import Experts, Replicated

EXPERT_PARTS = ("w_gate", "w_up", "w_down")


# -- the plan ---------------------------------------------------------------------------

def expert_ranges(n_experts: int, ep: int) -> list:
    """[(first, stop), ...] of the experts each ep rank owns: contiguous, sizes differ by at most 1."""
    sizes = [n_experts // ep + (1 if p < n_experts % ep else 0) for p in range(ep)]
    bounds = np.cumsum([0] + sizes)
    return [(int(bounds[p]), int(bounds[p + 1])) for p in range(ep)]


def expert_owners(n_experts: int, ep: int) -> np.ndarray:
    """(E,) int64: the ep rank that owns each expert."""
    owner = np.empty(n_experts, np.int64)
    for p, (lo, hi) in enumerate(expert_ranges(n_experts, ep)):
        owner[lo:hi] = p
    return owner


def check(cfg, mesh, options):
    """Refuse ep on a dense model, and more ep ranks than experts."""
    if cfg.moe is None:
        raise MeshError(
            f"ep ({mesh.ep}) spreads the experts of mixture-of-experts layers, but this {cfg.family} "
            "model is dense (it has 0 experts); use tp or dp to spread it instead")
    if mesh.ep > cfg.moe.n_experts:
        raise MeshError(
            f"ep ({mesh.ep}) is larger than the number of experts per layer ({cfg.moe.n_experts}): "
            f"some ranks would hold no expert; use ep <= {cfg.moe.n_experts}")


def plan(cfg, mesh) -> dict:
    """Every expert tensor on its owner's ep rank; routers replicated on every rank."""
    owner = expert_owners(cfg.moe.n_experts, mesh.ep)
    out = {}
    for i in cfg.moe.sparse_layers:
        out[f"layers.{i}.router"] = Replicated()
        for e in range(cfg.moe.n_experts):
            for part in EXPERT_PARTS:
                out[f"layers.{i}.experts.{e}.{part}"] = Experts(axis="ep", owner=int(owner[e]))
    return out


# -- the seam ---------------------------------------------------------------------------

def share_bounds(n_tokens: int, n_shares: int, share: int) -> tuple:
    """(lo, hi): contiguous share `share` of n_tokens rows, the first n_tokens % n_shares one longer."""
    base, extra = divmod(n_tokens, n_shares)
    lo = share * base + min(share, extra)
    return lo, lo + base + (1 if share < extra else 0)


def dispatch(comm, x, ids, weights, owner):
    """Send each token once to every ep rank owning one of its experts.  -> (rows, chunks, received)

    x (n, D), ids and weights (n, A); owner (E,) ep rank per expert.
    rows[j]: indices (n_j,) of the tokens sent to rank j, in token order; chunks[j] what was sent.
    received[j] (m_j, D + 2A): rows from rank j, [x | ids (-1: not held here) | weights].
    """
    xp = array_module(x)
    dtype = np.promote_types(x.dtype, np.float32)          # ids < 2**24 and weights stay exact
    dest = xp.asarray(owner)[ids]                                       # (n, A) rank of each choice
    rows, chunks = [], []
    for j in range(comm.size):
        here = dest == j                                                # (n, A)
        idx = xp.nonzero(here.any(axis=1))[0]                           # (n_j,)
        sub = here[idx]
        chunks.append(xp.concatenate([x[idx].astype(dtype),
                                      xp.where(sub, ids[idx], -1).astype(dtype),
                                      xp.where(sub, weights[idx], 0).astype(dtype)], axis=1))  # (n_j, D+2A)
        rows.append(idx)
    return rows, chunks, comm.all_to_all(chunks)


def run_owned(received, experts, run_expert, d, out_dtype):
    """The weighted sum of the held experts for every received row, one pass per expert.

    received: list of (m_j, D + 2A) -> list of (m_j, D), one per source rank.
    """
    xp = array_module(received[0])
    allrows = xp.concatenate(received, axis=0)                          # (M, D+2A)
    a = (allrows.shape[1] - d) // 2
    x = allrows[:, :d].astype(out_dtype)                                # (M, D)
    ids = allrows[:, d:d + a].astype(np.int64)                          # (M, A)
    w = allrows[:, d + a:].astype(np.float32)                           # (M, A)
    y = combine_local(x, ids, w, experts, run_expert)                   # (M, D)
    cuts = np.cumsum([r.shape[0] for r in received])[:-1]
    return xp.split(y, [int(c) for c in cuts], axis=0)


def combine(comm, results, rows, n, d, dtype, xp):
    """Return each row sum to its token's rank and add the owners' parts in rank order.

    results[j] (m_j, D) goes back to rank j; rows[j] (n_j,) places what rank j sent back.
    -> (n, D), this rank's share of the routed output.
    """
    back = comm.all_to_all(results)                                     # back[j] (n_j, D)
    out = xp.zeros((n, d), dtype)
    for idx, y in zip(rows, back):
        out[idx] += y.astype(dtype)
    return out


def moe_exchange(x, ids, weights, experts, run_expert, *, comm, owner, share, n_shares, finish):
    """The `experts` seam: share, dispatch, owned experts, combine, finish (see the module docstring).

    x (N, D), ids and weights (N, A) -> (N, D).
    """
    xp = array_module(x)
    n_tokens, d = x.shape
    lo, hi = share_bounds(n_tokens, n_shares, share)
    rows, _, received = dispatch(comm, x[lo:hi], ids[lo:hi], weights[lo:hi], owner)
    results = run_owned(received, experts, run_expert, d, x.dtype)
    mine = combine(comm, results, rows, hi - lo, d, x.dtype, xp)        # (n, D)
    return finish(mine, lo, hi, n_tokens)


def partial_sums(comm):
    """The `experts` seam of ep alone: this rank's experts on every token that chose them, summed
    over the group's ranks (see the module docstring). x (N, D), ids and weights (N, A) -> (N, D)."""
    def experts(x, ids, weights, held, run_expert):
        return comm.all_reduce(combine_local(x, ids, weights, held, run_expert))
    return experts


def seams(cfg, mesh, coords, comms, seams, options):
    """Replace the `experts` slot with what this rank's ep group needs (see the module docstring)."""
    if mesh.tp * mesh.sp == 1:
        return seams.with_(experts=partial_sums(comms["ep"]))
    if mesh.ep == mesh.tp:
        return seams.with_(experts=combine_local)                       # mlp_out's all_reduce adds them
    owner = expert_owners(cfg.moe.n_experts, mesh.ep)
    if mesh.tp > 1:
        # tp ranks hold the same tokens; mlp_out's all_reduce over tp adds the shares.
        share, n_shares = coords["tp"], mesh.tp

        def finish(mine, lo, hi, n):
            out = array_module(mine).zeros((n, mine.shape[1]), mine.dtype)
            out[lo:hi] = mine
            return out                                                  # (N, D), zeros off the share
    else:
        # sp only: each rank's tokens are its own.
        share, n_shares = 0, 1

        def finish(mine, lo, hi, n):
            return mine

    def experts(x, ids, weights, held, run_expert):
        return moe_exchange(x, ids, weights, held, run_expert, comm=comms["ep"], owner=owner,
                            share=share, n_shares=n_shares, finish=finish)
    return seams.with_(experts=experts)


# -- what a layer moves (for benchmarks and the dashboard) ------------------------------

def load_per_rank(counts, ep: int) -> np.ndarray:
    """(P,) (token, expert) pairs each ep rank computes, from (E,) tokens per expert."""
    counts = np.asarray(counts)
    return np.array([counts[lo:hi].sum() for lo, hi in expert_ranges(counts.shape[0], ep)], np.int64)
