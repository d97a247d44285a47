"""Where a new LLM's ranks go, and how much context each replica may hold.

Decided on the client before any rank starts: the workers of each replica (the least
loaded first), that they can read the checkpoint, that each rank's weights fit its
worker's memory in the chosen dtype, and the KV budget that memory leaves.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from ..engine.validate import budget_tokens, kv_bytes_per_token
from ..io.loader import resolve_dtype
from ..parallel.build import check_weights_fit, rank_weight_bytes
from ..parallel.mesh import Mesh
from .placement import check_checkpoint_on_workers, place, rank_counts, worker_table

logger = logging.getLogger("daskllm")


@dataclass
class Sizing:
    placement: list          # per replica, its workers in rank order
    budget_tokens: int       # tokens of context one replica may hold at once
    shared_workers: dict     # worker -> ranks of other LLMs already there


def size_ranks(client, mesh: Mesh, checkpoint, path: str, options: dict, dtype_label: str,
               ship_weights: bool) -> Sizing:
    """Place every replica and size its KV budget; raises before any rank starts if it cannot fit."""
    load = rank_counts(client)                          # ranks of other LLMs on each worker
    placement = place(client, mesh, load)
    if not ship_weights:
        check_checkpoint_on_workers(client, [w for ws in placement for w in ws], path)
    memory = {addr: mem for addr, _, mem in worker_table(client)}
    rank_bytes = rank_weight_bytes(checkpoint, mesh, options)      # in the chosen dtype, per rank of a replica
    int8 = {**options, "dtype": "int8", "dtypes": resolve_dtype(checkpoint, "int8")}
    int8_bytes = rank_weight_bytes(checkpoint, mesh, int8)         # what the refusal suggests instead
    for ws in placement:
        check_weights_fit(rank_bytes, [memory[w] for w in ws], dtype_label, int8_bytes)
    per_token = kv_bytes_per_token(checkpoint.config, mesh)
    shared = {w: load[w] for ws in placement for w in ws if load.get(w)}
    budget = min(budget_tokens(memory[w], max(rank_bytes), per_token, mesh, sharing=load.get(w, 0) + 1)
                 for ws in placement for w in ws)
    if shared:
        logger.warning(
            "daskllm: %d worker(s) already host ranks of another LLM (%s); this LLM's ranks share them. "
            "Its KV budget divides their memory among the ranks there, and calls to ranks on one worker "
            "wait for each other (add workers to avoid this)", len(shared),
            ", ".join(f"{w}: {n}" for w, n in sorted(shared.items())))
    return Sizing(placement, budget, shared)
