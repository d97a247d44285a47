"""Pure pieces: partial attention + merge equals full attention; RoPE scaling; the KV cache."""
from __future__ import annotations

import numpy as np
import pytest

from daskllm.model.cache import CacheFullError, KVCache
from daskllm.model.config import RopeConfig
from daskllm.model.layers import attention_partial, blockwise_attention, merge_partials, rope_inv_freq


def _qkv(tq=5, tk=9, h=4, hkv=2, hd=8, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((tq, h, hd), np.float32), rng.standard_normal((hkv, tk, hd), np.float32),
            rng.standard_normal((hkv, tk, hd), np.float32))


def _naive(q, k, v, q_pos, k_pos, scale, window=None):
    tq, h, hd = q.shape
    g = h // k.shape[0]
    out = np.zeros_like(q)
    for t in range(tq):
        for head in range(h):
            s = (k[head // g] @ q[t, head]) * scale
            ok = k_pos <= q_pos[t]
            if window is not None:
                ok &= q_pos[t] - k_pos < window
            p = np.where(ok, np.exp(s - s[ok].max()), 0.0)
            out[t, head] = (p / p.sum()) @ v[head // g]
    return out


@pytest.mark.parametrize("window", [None, 3])
def test_partial_attention_over_blocks_merges_to_full(window):
    q, k, v = _qkv()
    q_pos, k_pos = np.arange(4, 9), np.arange(9)
    full = _naive(q, k, v, q_pos, k_pos, 0.3, window)
    blocks = [slice(0, 2), slice(2, 6), slice(6, 9)]          # block 0 invisible to some queries with a window
    parts = [attention_partial(q, k[:, b], v[:, b], q_pos, k_pos[b], 0.3, window) for b in blocks]
    merged, _ = merge_partials([p[0] for p in parts], [p[1] for p in parts])
    np.testing.assert_allclose(merged, full, rtol=1e-5, atol=1e-6)


def test_fully_masked_block_has_zero_out_and_minus_inf_lse():
    q, k, v = _qkv(tq=2, tk=3)
    out, lse = attention_partial(q, k, v, np.array([0, 1]), np.array([5, 6, 7]), 0.3)
    assert np.all(out == 0) and np.all(np.isneginf(lse))
    merged, _ = merge_partials([out, np.ones_like(out)], [lse, np.zeros_like(lse)])
    np.testing.assert_array_equal(merged, np.ones_like(out))


def test_llama3_rope_keeps_high_frequencies_and_stretches_low():
    plain = rope_inv_freq(RopeConfig(theta=10000.0), 64)
    scaled = rope_inv_freq(RopeConfig(theta=10000.0, type="llama3", factor=8.0, original_max_position=64), 64)
    assert scaled[0] == plain[0]                                   # shortest wavelength untouched
    np.testing.assert_allclose(scaled[-1], plain[-1] / 8.0, rtol=1e-6)  # longest stretched by factor


def test_linear_rope_divides_frequencies():
    plain = rope_inv_freq(RopeConfig(), 16)
    np.testing.assert_allclose(rope_inv_freq(RopeConfig(type="linear", factor=2.0), 16), plain / 2, rtol=1e-6)


def test_kv_cache_grows_keeps_positions_and_enforces_budget():
    cache = KVCache(n_layers=1)
    for t in range(40):                                            # one token at a time, past the first capacity
        cache.append(0, 7, np.full((2, 1, 4), t, np.float32), np.full((2, 1, 4), -t, np.float32), np.array([t]))
    k, v, pos = cache.view(0, 7)
    assert k.shape == (2, 40, 4) and np.array_equal(pos, np.arange(40)) and k[1, 39, 0] == 39 and v[0, 5, 0] == -5
    cache.release(7)
    assert cache.bytes_reserved == 0 and 7 not in cache
    small = KVCache(n_layers=1, budget_bytes=1000)
    with pytest.raises(CacheFullError, match="budget of 1000 bytes"):
        small.append(0, 1, np.zeros((2, 64, 4), np.float32), np.zeros((2, 64, 4), np.float32), np.arange(64))


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("keys", ["in order", "shuffled", "after some queries"])
def test_blockwise_attention_equals_one_partial(window, keys):
    q, k, v = _qkv(tq=37, tk=50, seed=2)
    q_pos, k_pos = np.arange(13, 50), np.arange(50)
    if keys == "shuffled":                          # a zigzag shard: key spans cannot be cut by position
        k_pos = np.random.default_rng(3).permutation(50)
    elif keys == "after some queries":              # the first query tiles see no key at all
        k_pos = np.arange(30, 80)
    whole = attention_partial(q, k, v, q_pos, k_pos, 0.3, window)
    tiled = blockwise_attention(q, k, v, q_pos, k_pos, 0.3, window, block=8, key_block=16)
    np.testing.assert_allclose(tiled[0], whole[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tiled[1], whole[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("window, positions, one_call", [
    (None, range(9), True),          # a local cache fed token by token: one compiled call
    (100, range(9), True),           # every entry inside the window
    (4, range(9), False),            # entries past the window: the masked path
    (None, [0, 2, 4, 6], False),     # not positions first .. position (a shard): the masked path
])
def test_a_decode_step_attends_in_one_call_only_where_it_sees_every_entry(monkeypatch, window, positions, one_call):
    from daskllm.model import seams
    from daskllm.model.forward import Batch
    rng = np.random.default_rng(3)
    n_heads, n_kv, hd = 4, 2, 8
    positions = list(positions)
    new_pos = positions[-1] + (1 if one_call or window else 2)
    cache = KVCache(1)
    prior = rng.standard_normal((2, n_kv, len(positions), hd)).astype(np.float32)
    cache.append(0, 7, prior[0], prior[1], np.array(positions))
    q = rng.standard_normal((1, n_heads, hd)).astype(np.float32)
    k, v = rng.standard_normal((2, 1, n_kv, hd)).astype(np.float32)
    taken = []
    real = seams._decode_in_one_call
    monkeypatch.setattr(seams, "_decode_in_one_call", lambda *a: taken.append(real(*a)) or taken[-1])
    got = seams.local_attend(0, q, k, v, Batch.build([(7, (1,), new_pos)]), cache, 0.3, window)
    keys, values, key_pos = cache.view(0, 7)
    want = blockwise_attention(q, keys, values, np.array([new_pos]), key_pos, 0.3, window)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert taken == [one_call]
