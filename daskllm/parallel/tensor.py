"""Tensor parallelism (Megatron): every weight cut over the tp ranks, two all-reduces per layer.

Legend: p tp ranks, r this rank, D hidden, H / Hkv query / KV heads, hd head dim,
I MLP (or expert) width, V vocabulary, N tokens.

Attention, split by whole heads (column -> row parallel):
    Q = X Wq^T,  Wq = [Wq_1 .. Wq_p] by rows: rank r holds H/p heads      all -> sharded
    K, V likewise, each rank keeping the KV heads its query heads use (GQA groups stay whole);
        when p > Hkv (p % Hkv == 0) KV head j is replicated on ranks j*p/Hkv .. (j+1)*p/Hkv - 1
        and rank r holds KV head r*Hkv//p (vLLM's rule)
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
Widths that p does not divide (I, V) are cut unevenly as numpy.array_split does; heads
must divide, and check() refuses otherwise before any worker is touched.
"""
from __future__ import annotations

from ..io.names import expected_shapes
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
    """The tp sizes this model's heads allow."""
    h, kv = cfg.n_heads, cfg.n_kv_heads
    return [t for t in range(1, h + 1) if h % t == 0 and (kv % t == 0 or t % kv == 0)]


def check(cfg: ModelConfig, mesh: Mesh, options: dict):
    """Refuse a tp that does not cut the heads into whole heads per rank."""
    tp, h, kv = mesh.tp, cfg.n_heads, cfg.n_kv_heads
    allowed = ", ".join(map(str, valid_tp(cfg)))
    if h % tp:
        raise MeshError(
            f"tp ({tp}) does not divide the attention heads ({h}) of this {cfg.family} model: "
            f"each tensor-parallel rank needs whole heads; use tp in {{{allowed}}}")
    if kv % tp and tp % kv:
        raise MeshError(
            f"tp ({tp}) and the KV heads ({kv}): tp must divide the KV heads, or be a multiple of "
            f"them (KV heads are then replicated); use tp in {{{allowed}}}")
    if cfg.vocab_size < tp:
        raise MeshError(f"tp ({tp}) exceeds the vocabulary ({cfg.vocab_size} tokens); use tp <= {cfg.vocab_size}")


def even_sizes(n: int, parts: int) -> tuple:
    """Rows per piece when n rows are cut into `parts` (the first n % parts get one more)."""
    return tuple(n // parts + (r < n % parts) for r in range(parts))


def kv_replication(cfg: ModelConfig, tp: int) -> int:
    """How many tp ranks hold each KV head (1 unless tp > KV heads)."""
    return max(1, tp // cfg.n_kv_heads)


def head_specs(cfg: ModelConfig, tp: int) -> tuple:
    """(spec of the query-head rows, spec of the KV-head rows) along dim 0."""
    hd, rep = cfg.head_dim, kv_replication(cfg, tp)
    q = Split(0, AXIS, (cfg.n_heads // tp * hd,) * tp)
    kv = Split(0, AXIS, ((cfg.n_kv_heads * rep // tp) * hd,) * (tp // rep), repeat=rep)
    return q, kv


def plan(cfg: ModelConfig, mesh: Mesh) -> dict:
    """{our name: spec} for every tensor tp cuts; norms, router, shared_gate stay replicated."""
    tp = mesh.tp
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
        elif part in MLP_ROWS:
            out[name] = Split(0, AXIS, even_sizes(shape[0], tp))
        elif part in MLP_COLS:
            out[name] = Split(1, AXIS, even_sizes(shape[1], tp))
    return out


def seams(cfg: ModelConfig, mesh: Mesh, coords: dict, comms: dict, seams: Seams, options: dict) -> Seams:
    """Vocabulary-parallel embed, all-reduce after the O and down projections, and the q/k sums."""
    comm, rank = comms[AXIS], coords[AXIS]
    start, stop = Split(0, AXIS, even_sizes(cfg.vocab_size, mesh.tp)).bounds(rank)
    rep = kv_replication(cfg, mesh.tp)

    def embed(table, ids):
        """Vocabulary-parallel lookup.  (V_r, D), (N,) global ids -> (N, D) on every rank"""
        xp = array_module(table)
        local = ids - start                                                   # (N,)
        inside = (local >= 0) & (local < stop - start)
        rows = table[xp.where(inside, local, 0)]                              # (N, D)
        return comm.all_reduce(xp.where(inside[:, None], rows, 0).astype(table.dtype, copy=False))

    def all_reduce(y):
        """Partial sums of a row-parallel matmul -> the full output.  (N, D) -> (N, D)"""
        return comm.all_reduce(y)

    def heads_sum(partial, projection):
        """Per-token sum of squares over this rank's heads -> over all heads.  (N, 1) -> (N, 1)

        A KV head replicated on `rep` ranks is counted (for projection "k") by the first of them only.
        """
        if projection == "k" and rep > 1 and rank % rep:
            partial = array_module(partial).zeros_like(partial)
        return comm.all_reduce(partial)

    return seams.with_(embed=embed, attention_out=all_reduce, mlp_out=all_reduce, heads_sum=heads_sum)
