"""ModelRunner: what one rank does for one driver call — run a step, pick next tokens, free caches.

It holds the rank's Transformer (weights + seams) and KV cache. It knows nothing of Dask:
the runtime's rank actor calls it, and tests call it directly with in-process communicators.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import kernels
from .cache import KVCache
from .forward import Batch, Transformer
from .sampling import SamplingParams, next_tokens


@dataclass(frozen=True)
class Work:
    """One sequence's part of a step, as the driver sends it.

    tokens: the new tokens to feed, starting at global position `start`; when `sample`
    is set, the runner returns the token that follows them (the `counter`-th generated).
    """
    seq: int
    tokens: tuple
    start: int
    sample: bool = True
    params: SamplingParams = SamplingParams()
    counter: int = 0


class ModelRunner:
    """One rank's model, cache and step.

    `tp_comm` joins the ranks holding the other vocabulary slices (for sampling and full
    logits); None when this rank holds the whole vocabulary.
    """

    def __init__(self, model: Transformer, tp_comm=None, cache_budget_bytes=None):
        self.model = model
        self.tp_comm = tp_comm
        self.cache = KVCache(model.cfg.n_layers, xp=model.xp, budget_bytes=cache_budget_bytes)
        self.low_bit = model.weights.has_low_bit()
        self.on_cpu = model.xp is np

    def step(self, work: list) -> dict:
        """Feed each sequence its new tokens; {seq: next token} for those that sample."""
        if not work:
            return {}
        batch = self.model.seams.local_batch(Batch.build([(w.seq, w.tokens, w.start) for w in work]))
        with kernels.decode_scope(self.low_bit, self.on_cpu, len(batch.tokens)):
            hidden = self.model.forward(batch, self.cache)                   # (N, D)
        sampled = [i for i, w in enumerate(work) if w.sample]
        if not sampled or hidden is None:       # None: a pipeline stage before the last samples nothing
            return {}
        last = self.model.seams.last_hidden(hidden, batch, sampled)          # (B', D)
        logits = self.model.logits(last)                                     # (B', V)
        chosen = next_tokens(logits, self.model.weights.vocab_start,
                             [work[i].params for i in sampled], [work[i].counter for i in sampled],
                             self.tp_comm)
        return {work[i].seq: int(t) for i, t in zip(sampled, chosen)}

    def full_logits(self, sequences: list) -> list | None:
        """float32 (len, vocab) logits of every position of each token list (caches freed after);
        None on a pipeline stage before the last."""
        ids = [-(i + 1) for i in range(len(sequences))]      # negative ids never clash with requests
        batch = Batch.build([(sid, list(toks), 0) for sid, toks in zip(ids, sequences)])
        local = self.model.seams.local_batch(batch)
        try:
            hidden = self.model.forward(local, self.cache)
            if hidden is None:
                return None
            hidden = self.model.seams.all_hidden(hidden, local)               # (N, D)
            logits = self.model.logits(hidden)                               # (N, V)
            if self.tp_comm is not None and self.tp_comm.size > 1:
                logits = self.tp_comm.all_gather(logits, dim=1)              # (N, vocab)
            logits = np.asarray(logits.get() if hasattr(logits, "get") else logits, np.float32)
            return [logits[lo:hi] for _, lo, hi in batch.segments()]
        finally:
            self.release(ids)

    def release(self, seq_ids):
        for s in seq_ids:
            self.cache.release(s)

    def memory(self) -> dict:
        return {"weights_bytes": self.model.weights.nbytes(), "cache_bytes": self.cache.bytes_reserved,
                "cache_peak_bytes": self.cache.peak_bytes,
                "live_sequences": len(self.cache.seq_ids())}
