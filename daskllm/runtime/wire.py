"""A step's Work as plain msgpack-able lists and back (the control connection never pickles).

One Work is [seq, [token, ...], start, sample, [temperature, top_k, top_p, seed], counter].
"""
from __future__ import annotations

from ..model.runner import Work
from ..model.sampling import SamplingParams


def work_to_wire(w: Work) -> list:
    p = w.params
    return [w.seq, list(w.tokens), w.start, w.sample, [p.temperature, p.top_k, p.top_p, p.seed], w.counter]


def work_from_wire(item: list) -> Work:
    seq, tokens, start, sample, (temperature, top_k, top_p, seed), counter = item
    return Work(seq, tuple(tokens), start, sample, SamplingParams(temperature, top_k, top_p, seed), counter)
