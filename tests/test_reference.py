"""The oracle itself, against the definition written as loops."""

from __future__ import annotations

import math

import numpy as np
import pytest

import nbflash
from helpers import draw_shape, new_rng


def loops(q, k, v, causal, scale):
    """softmax attention by the definition, one query at a time (bshd, float64)."""
    batch, seqlen_q, heads_q, _ = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    out = np.zeros((batch, seqlen_q, heads_q, v.shape[3]))
    lse = np.full((batch, heads_q, seqlen_q), -np.inf)
    for b in range(batch):
        for h in range(heads_q):
            hk = h // (heads_q // heads_kv)
            for i in range(seqlen_q):
                keys = [j for j in range(seqlen_k) if not causal or j <= i + seqlen_k - seqlen_q]
                if not keys:
                    continue
                s = [scale * float(q[b, i, h] @ k[b, j, hk]) for j in keys]
                top = max(s)
                w = [math.exp(x - top) for x in s]
                out[b, i, h] = sum(wj * v[b, j, hk] for wj, j in zip(w, keys)) / sum(w)
                lse[b, h, i] = top + math.log(sum(w))
    return out, lse


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("repeat", range(4))
def test_oracle_matches_definition(causal, repeat):
    rng, seed = new_rng()
    shape = draw_shape(rng)
    shape.seqlen_q, shape.seqlen_k = int(rng.integers(1, 12)), int(rng.integers(1, 12))
    q, k, v = (rng.standard_normal(s) for s in shape.qkv_shapes("bshd"))
    scale = float(rng.uniform(0.1, 1.0))
    out, lse = nbflash.reference.attention(q, k, v, causal=causal, scale=scale, return_lse=True)
    want_out, want_lse = loops(q, k, v, causal, scale)
    np.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-12, err_msg=f"seed {seed}")
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12, err_msg=f"seed {seed}")


def test_causal_square_is_lower_triangular():
    mask = nbflash.reference.visible(5, 5, causal=True)
    assert np.array_equal(mask, np.tril(np.ones((5, 5), bool)))


def test_causal_is_bottom_right_aligned():
    # 2 queries, 4 keys: the last query sees all keys, the first sees 3
    assert nbflash.reference.visible(2, 4, causal=True).sum(axis=1).tolist() == [3, 4]
    # 4 queries, 2 keys: the first two queries see nothing
    assert nbflash.reference.visible(4, 2, causal=True).sum(axis=1).tolist() == [0, 0, 1, 2]
