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


def finite_difference_grads(do, q, k, v, causal, scale, eps=1e-5):
    """Central differences of loss = sum(do * attention(q, k, v)) in float64."""

    def loss(q_, k_, v_):
        return float(np.sum(do * nbflash.reference.attention(q_, k_, v_, causal=causal, scale=scale)))

    grads = []
    for which in range(3):
        args = [q.copy(), k.copy(), v.copy()]
        x = args[which]
        g = np.zeros_like(x)
        for idx in np.ndindex(*x.shape):
            keep = x[idx]
            x[idx] = keep + eps
            up = loss(*args)
            x[idx] = keep - eps
            down = loss(*args)
            x[idx] = keep
            g[idx] = (up - down) / (2 * eps)
        grads.append(g)
    return grads


@pytest.mark.parametrize(
    "seqlens, causal, group",
    [((3, 4), False, 1), ((4, 4), True, 2), ((5, 3), True, 2), ((2, 5), True, 3)],
    ids=["full", "causal-square-gqa", "causal-q>k-gqa", "causal-q<k-gqa"],
)
def test_oracle_backward_matches_finite_differences(seqlens, causal, group):
    rng, seed = new_rng()
    seqlen_q, seqlen_k = seqlens
    heads_kv, head_dim, head_dim_v = 1, 3, 2
    q = rng.standard_normal((1, seqlen_q, heads_kv * group, head_dim))
    k = rng.standard_normal((1, seqlen_k, heads_kv, head_dim))
    v = rng.standard_normal((1, seqlen_k, heads_kv, head_dim_v))
    do = rng.standard_normal((1, seqlen_q, heads_kv * group, head_dim_v))
    scale = float(rng.uniform(0.3, 1.0))
    got = nbflash.reference.attention_backward(do, q, k, v, causal=causal, scale=scale)
    want = finite_difference_grads(do, q, k, v, causal, scale)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert g.shape == w.shape, name
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-8, err_msg=f"{name} (seed {seed})")
    if causal and seqlen_q > seqlen_k:  # the first rows see no key: no gradient flows
        assert np.all(got[0][:, : seqlen_q - seqlen_k] == 0)


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_oracle_backward_layouts_agree(layout):
    rng, seed = new_rng()
    shape = draw_shape(rng)
    q, k, v = (rng.standard_normal(s) for s in shape.qkv_shapes("bshd"))
    do = rng.standard_normal((shape.batch, shape.seqlen_q, shape.heads_q, shape.head_dim_v))
    want = nbflash.reference.attention_backward(do, q, k, v, causal=True)
    t = lambda a: a.transpose(0, 2, 1, 3) if layout == "bhsd" else a  # noqa: E731
    got = nbflash.reference.attention_backward(t(do), t(q), t(k), t(v), causal=True, layout=layout)
    for g, w in zip(got, want):
        np.testing.assert_allclose(t(g), w, rtol=1e-12, atol=1e-12, err_msg=f"seed {seed}")
