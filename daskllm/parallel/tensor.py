"""Tensor parallelism (Megatron): every weight cut over the tp ranks, two all-reduces per layer.

Legend: p tp ranks, r this rank, D hidden, H / Hkv query / KV heads, hd head dim,
I MLP (or expert) width, V vocabulary, N tokens.

Attention, split by whole GQA groups (column -> row parallel); G = H/Hkv query heads per KV head:
    Q = X Wq^T,  Wq = [Wq_1 .. Wq_p] by rows: rank r holds h_r query heads                all -> sharded
    K, V likewise, each rank keeping the KV heads its query heads use (GQA groups stay whole):
      p <= Hkv: rank r holds k_r KV heads (k = array_split of Hkv over p) and their k_r*G query
        heads, e.g. 3 KV / 9 query heads at p=2: rank 0 KV 0-1 + queries 0-5, rank 1 KV 2 + 6-8;
      p > Hkv: KV head j is replicated on m_j neighbouring ranks (m = array_split of p over Hkv)
        that share its G query heads (array_split of G over m_j), e.g. 2 KV / 4 query heads at
        p=3: ranks 0, 1 hold KV 0 and one query head each, rank 2 KV 1 and queries 2-3.
      Every rank needs a query head, so p <= H; that is the only limit.
    Y = sum_r attn(Q_r, K_r, V_r) Wo_r^T,  Wo = [Wo_1 .. Wo_p] by columns   sharded -> all (all_reduce)
    q/k/v biases follow their heads; Qwen3 per-head norms (hd,) are replicated; OLMoE full
    q/k norms (H*hd,), (Hkv*hd,) follow their heads and the per-token sum of squares is
    all-reduced (each replicated KV head counted once).
MLP (dense, each routed expert, the shared expert):
    Z = silu(X Wg^T) * (X Wu^T),  Wg, Wu = [W_1 .. W_p] by rows           all -> sharded
    Y = sum_r Z_r Wd_r^T,  Wd = [Wd_1 .. Wd_p] by columns                   sharded -> all (all_reduce)
    The router and shared_gate are replicated, so every rank routes alike and the routed,
    gated partial outputs sum to the exact MoE output in the one mlp_out all-reduce.
Vocabulary parallel (embed and lm_head cut by rows with the same sizes; tied heads share):
    E(ids) = sum_r [start_r <= id < stop_r] E_r[id - start_r]               all_reduce
    logits stay sharded; sampling exchanges only candidates (model.sampling).
Widths that p does not divide (I, V) are cut unevenly as numpy.array_split does, heads by
whole groups as above; check() refuses p > H (or p > V) before any worker is touched.
Int8 weights (Q8_0: blocks of 32 along the input dim) are cut at block boundaries only, so
a rank's slice holds the very blocks the single rank would: the MLP width I is cut in
whole blocks (the global partial last block, if any, stays on the last rank), and each
rank's query columns of wo (h_r heads x hd) must be a whole number of blocks.
"""
from __future__ import annotations

from ..io.names import expected_shapes
from ..kernels import BLOCK, take_rows
from ..model.config import ModelConfig
from ..model.layers import array_module
from ..model.seams import Seams
from .mesh import Mesh, MeshError
from .plan import Split

AXIS = "tp"
Q_PARTS = ("wq", "bq")                 # cut with the query heads (plus q_norm when full)
KV_PARTS = ("wk", "wv", "bk", "bv")    # cut with the KV heads (plus k_norm when full)
MLP_ROWS = ("w_gate", "w_up")          # column-parallel: output width cut
MLP_COLS = ("w_down",)                 # row-parallel: input width cut


def valid_tp(cfg: ModelConfig) -> list:
    """The tp sizes this model's heads allow: every rank needs at least one query head."""
    return list(range(1, cfg.n_heads + 1))


def check(cfg: ModelConfig, mesh: Mesh, options: dict):
    """Refuse a tp that would leave a rank without a query head (or a vocabulary row)."""
    tp, h = mesh.tp, cfg.n_heads
    if tp > h:
        raise MeshError(
            f"tp ({tp}) exceeds the attention heads ({h}) of this {cfg.family} model: tensor parallelism "
            f"splits whole heads, so each rank needs at least one; use tp <= {h}")
    if cfg.vocab_size < tp:
        raise MeshError(f"tp ({tp}) exceeds the vocabulary ({cfg.vocab_size} tokens); use tp <= {cfg.vocab_size}")
    if split_unit(options) > 1:
        check_blocks(cfg, tp)


def split_unit(options) -> int:
    """Columns a cut along the input dim must respect: a Q8_0 block when any weight is int8, else 1.

    options["dtypes"] (io.loader.resolve_dtype) says what "auto" became: int8 for GGUF quantized types.
    """
    options = options or {}
    int8 = options.get("dtype") == "int8" or "int8" in (options.get("dtypes") or {}).values()
    return BLOCK if int8 else 1


def mlp_widths(cfg: ModelConfig) -> dict:
    """{what: width} of every MLP this model has (dense, routed expert, shared expert)."""
    widths = {}
    if any(not cfg.is_moe_layer(i) for i in range(cfg.n_layers)):
        widths["MLP"] = cfg.intermediate_size
    if cfg.moe is not None:
        widths["expert"] = cfg.moe.intermediate_size
        if cfg.moe.shared_intermediate_size:
            widths["shared expert"] = cfg.moe.shared_intermediate_size
    return widths


def check_blocks(cfg: ModelConfig, tp: int):
    """Refuse a tp whose int8 slices would cut a block of 32 input columns."""
    for heads, _ in rank_heads(cfg, tp):
        q_cols = heads * cfg.head_dim
        if q_cols % BLOCK:
            raise MeshError(
                f"dtype int8 at tp={tp}: a rank's slice of the attention output projection (wo) would be "
                f"{q_cols} input columns ({heads} heads x {cfg.head_dim}), not a whole number of int8 "
                f"blocks of {BLOCK}; use a smaller tp, or dtype bfloat16/float16/float32")
    for what, width in mlp_widths(cfg).items():
        blocks = -(-width // BLOCK)
        if blocks < tp:
            raise MeshError(
                f"dtype int8 at tp={tp}: the {what} width {width} is only {blocks} int8 block(s) of {BLOCK}, "
                f"fewer than the {tp} tensor-parallel ranks that must each hold whole blocks; use tp <= {blocks}, "
                "or dtype bfloat16/float16/float32")


def even_sizes(n: int, parts: int) -> tuple:
    """Rows per piece when n rows are cut into `parts` (the first n % parts get one more)."""
    return tuple(n // parts + (r < n % parts) for r in range(parts))


def head_split(cfg: ModelConfig, tp: int) -> tuple:
    """(query heads per rank, KV heads per piece, ranks per KV piece), by whole GQA groups."""
    kv, g = cfg.n_kv_heads, cfg.group_size
    if tp <= kv:
        kv_heads = even_sizes(kv, tp)
        return tuple(k * g for k in kv_heads), kv_heads, (1,) * tp
    ranks = even_sizes(tp, kv)                       # ranks sharing each KV head
    return tuple(q for m in ranks for q in even_sizes(g, m)), (1,) * kv, ranks


def rank_heads(cfg: ModelConfig, tp: int) -> list:
    """[(query heads, KV heads)] held by each tp rank."""
    q, kv, ranks = head_split(cfg, tp)
    kv_of_rank = [k for k, m in zip(kv, ranks) for _ in range(m)]
    return list(zip(q, kv_of_rank))


def describe_heads(cfg: ModelConfig, tp: int) -> str:
    """One line on how the heads are split, for plans: uneven splits are easy to miss in row counts."""
    parts = [f"rank {r}: {q} query + {k} KV heads" for r, (q, k) in enumerate(rank_heads(cfg, tp))]
    return f"tp={tp} over {cfg.n_heads} query / {cfg.n_kv_heads} KV heads: " + "; ".join(parts)


def block_sizes(n: int, parts: int, unit: int) -> tuple:
    """Like even_sizes, in whole units of `unit`; the last piece ends at n (a partial last unit)."""
    if unit == 1:
        return even_sizes(n, parts)
    sizes = [b * unit for b in even_sizes(-(-n // unit), parts)]
    sizes[-1] -= sum(sizes) - n
    return tuple(sizes)



def head_specs(cfg: ModelConfig, tp: int) -> tuple:
    """(spec of the query-head rows, spec of the KV-head rows) along dim 0."""
    hd = cfg.head_dim
    q, kv, ranks = head_split(cfg, tp)
    repeat = ranks[0] if len(set(ranks)) == 1 else ranks      # an int when every piece has as many ranks
    return Split(0, AXIS, tuple(h * hd for h in q)), Split(0, AXIS, tuple(k * hd for k in kv), repeat=repeat)


def plan(cfg: ModelConfig, mesh: Mesh, options: dict | None = None) -> dict:
    """{our name: spec} for every tensor tp cuts; norms, router, shared_gate stay replicated."""
    tp, unit = mesh.tp, split_unit(options)
    q_spec, kv_spec = head_specs(cfg, tp)
    vocab = Split(0, AXIS, even_sizes(cfg.vocab_size, tp))
    out = {}
    for name, shape in expected_shapes(cfg).items():
        part = name.rsplit(".", 1)[-1]
        if name in ("embed", "lm_head"):
            out[name] = vocab
        elif part in Q_PARTS or (part == "q_norm" and cfg.qk_norm == "full"):
            out[name] = q_spec
        elif part in KV_PARTS or (part == "k_norm" and cfg.qk_norm == "full"):
            out[name] = kv_spec
        elif part == "wo":
            out[name] = Split(1, AXIS, q_spec.sizes)
        elif part in MLP_ROWS:       # the same cut as w_down's columns
            out[name] = Split(0, AXIS, block_sizes(shape[0], tp, unit))
        elif part in MLP_COLS:
            out[name] = Split(1, AXIS, block_sizes(shape[1], tp, unit))
    return out


def seams(cfg: ModelConfig, mesh: Mesh, coords: dict, comms: dict, seams: Seams, options: dict) -> Seams:
    """Vocabulary-parallel embed, all-reduce after the O and down projections, and the q/k sums."""
    comm, rank = comms[AXIS], coords[AXIS]
    start, stop = Split(0, AXIS, even_sizes(cfg.vocab_size, mesh.tp)).bounds(rank)
    first_kv_holder = head_specs(cfg, mesh.tp)[1].first_holder(rank)

    def embed(table, ids):
        """Vocabulary-parallel lookup.  (V_r, D), (N,) global ids -> (N, D) on every rank"""
        xp = array_module(table)
        local = ids - start                                                   # (N,)
        inside = (local >= 0) & (local < stop - start)
        rows = take_rows(table, xp.where(inside, local, 0))                   # (N, D) float32
        return comm.all_reduce(xp.where(inside[:, None], rows, 0).astype(rows.dtype, copy=False))

    def all_reduce(y):
        """Partial sums of a row-parallel matmul -> the full output.  (N, D) -> (N, D)"""
        return comm.all_reduce(y)

    def heads_sum(partial, projection):
        """Per-token sum of squares over this rank's heads -> over all heads.  (N, 1) -> (N, 1)

        A KV head replicated on several ranks is counted (for projection "k") by the first of them only.
        """
        if projection == "k" and not first_kv_holder:
            partial = array_module(partial).zeros_like(partial)
        return comm.all_reduce(partial)

    return seams.with_(embed=embed, attention_out=all_reduce, mlp_out=all_reduce, heads_sum=heads_sum)
