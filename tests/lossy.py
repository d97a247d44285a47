"""How close lossy weights (int8, requantized 4-bit) keep the logits to float32: the one rule
the dtype tests share (issue 11's top-1 agreement and the KL divergence per position)."""
from __future__ import annotations

import numpy as np


def _log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_and_agreement(want, got, what):
    """Per position KL(want || got) in nats; asserts the top-1 rule: top-1 kept where `want`
    leads by > 0.1 logit (tiny random models have near-flat distributions), and on >= 90% of
    all positions."""
    agree, kls = [], []
    for w, g in zip(want, got):
        top2 = np.sort(w, axis=-1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 0.1
        same = w.argmax(-1) == g.argmax(-1)
        assert same[clear].all(), f"{what}: changed a clear top-1 at positions {np.nonzero(clear & ~same)[0]}"
        agree.append(same)
        lw, lg = _log_softmax(w.astype(np.float64)), _log_softmax(g.astype(np.float64))
        kls.append((np.exp(lw) * (lw - lg)).sum(-1))
    assert np.concatenate(agree).mean() >= 0.9, f"{what}: top-1 agrees on {np.concatenate(agree).mean():.0%}"
    return np.concatenate(kls)
