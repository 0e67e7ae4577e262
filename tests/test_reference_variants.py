"""The oracle's variants (window, softcap, ALiBi, bias, mask, dropout) against their
definitions written as loops, its backward against finite differences, and the
dropout generator against Random123's known answers and its device twin."""

from __future__ import annotations

import math

import numpy as np
import pytest

import nbflash
from helpers import new_rng, to_device, to_host
from nbflash import dropout
from nbflash.kernels import philox
from numba import cuda  # noqa: I001  (after nbflash, which picks the simulator without a GPU)


def loops(q, k, v, scale, causal, window, softcap, slopes, bias, mask, keep, p):
    """Variant attention by the definition, one query at a time (bshd, float64)."""
    batch, seqlen_q, heads_q, _ = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    out = np.zeros((batch, seqlen_q, heads_q, v.shape[3]))
    for b in range(batch):
        for h in range(heads_q):
            hk = h // (heads_q // heads_kv)
            for i in range(seqlen_q):
                diag = i + seqlen_k - seqlen_q
                keys = [j for j in range(seqlen_k)
                        if (not causal or j <= diag)
                        and (window[0] < 0 or j >= diag - window[0])
                        and (window[1] < 0 or j <= diag + window[1])
                        and mask[b, h, i, j]]
                if not keys:
                    continue
                s = []
                for j in keys:
                    t = scale * float(q[b, i, h] @ k[b, j, hk])
                    if softcap:
                        t = softcap * math.tanh(t / softcap)
                    s.append(t - float(slopes[b, h]) * abs(diag - j) + bias[b, h, i, j])
                top = max(s)
                w = [math.exp(x - top) for x in s]
                out[b, i, h] = sum(wj * keep[b, h, i, j] / (1 - p) * v[b, j, hk]
                                   for wj, j in zip(w, keys)) / sum(w)
    return out


def draw_variants(rng, batch, heads_q, seqlen_q, seqlen_k):
    window = (int(rng.integers(-1, 4)), int(rng.integers(-1, 4)))
    softcap = float(rng.choice([0.0, rng.uniform(0.5, 3.0)]))
    slopes = rng.uniform(0, 0.5, (batch, heads_q)).astype(np.float32)
    bias = rng.standard_normal((1, heads_q, seqlen_q, seqlen_k))  # broadcast over batch
    mask = rng.random((batch, 1, seqlen_q, seqlen_k)) < 0.8  # broadcast over heads
    p = float(rng.choice([0.0, 0.3]))
    return window, softcap, slopes, bias, mask, p


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("repeat", range(3))
def test_variant_oracle_matches_definition(causal, repeat):
    rng, seed = new_rng()
    batch, heads_kv, group, head_dim = 2, 1, 2, 4
    seqlen_q, seqlen_k = int(rng.integers(1, 9)), int(rng.integers(1, 9))
    q = rng.standard_normal((batch, seqlen_q, heads_kv * group, head_dim))
    k = rng.standard_normal((batch, seqlen_k, heads_kv, head_dim))
    v = rng.standard_normal((batch, seqlen_k, heads_kv, head_dim))
    window, softcap, slopes, bias, mask, p = draw_variants(rng, batch, heads_kv * group, seqlen_q, seqlen_k)
    keep = dropout.keep_mask(seed, p, batch, heads_kv * group, seqlen_q, seqlen_k)
    out = nbflash.reference.attention(q, k, v, causal=causal, scale=0.7, window=window, softcap=softcap,
                                      alibi_slopes=slopes, bias=bias, mask=mask, dropout_p=p, seed=seed)
    want = loops(q, k, v, 0.7, causal, window, softcap, slopes, np.broadcast_to(bias, keep.shape),
                 np.broadcast_to(mask, keep.shape), keep, p)
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12, err_msg=f"seed {seed}")


@pytest.mark.parametrize("repeat", range(3))
def test_variant_backward_matches_finite_differences(repeat):
    rng, seed = new_rng()
    batch, heads_q, heads_kv, head_dim = 1, 2, 1, 3
    seqlen_q, seqlen_k = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    q = rng.standard_normal((batch, seqlen_q, heads_q, head_dim))
    k = rng.standard_normal((batch, seqlen_k, heads_kv, head_dim))
    v = rng.standard_normal((batch, seqlen_k, heads_kv, head_dim))
    do = rng.standard_normal((batch, seqlen_q, heads_q, head_dim))
    window, _, slopes, _, mask, p = draw_variants(rng, batch, heads_q, seqlen_q, seqlen_k)
    bias = rng.standard_normal((heads_q, seqlen_q, seqlen_k))  # broadcast over batch
    opts = dict(causal=bool(rng.integers(2)), scale=0.8, window=window, softcap=1.5, alibi_slopes=slopes,
                mask=mask, dropout_p=p, seed=seed)
    grads = nbflash.reference.attention_backward(do, q, k, v, bias=bias, return_dbias=True, **opts)

    def loss(q_, k_, v_, bias_):
        return float((nbflash.reference.attention(q_, k_, v_, bias=bias_, **opts) * do).sum())

    args = [q, k, v, bias]
    eps = 1e-6
    for which, (x, g) in enumerate(zip(args, grads)):
        assert g.shape == x.shape
        numeric = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            plus, minus = [a.copy() for a in args], [a.copy() for a in args]
            plus[which][idx] += eps
            minus[which][idx] -= eps
            numeric[idx] = (loss(*plus) - loss(*minus)) / (2 * eps)
        np.testing.assert_allclose(g, numeric, rtol=1e-5, atol=1e-7, err_msg=f"arg {which}, seed {seed}")


def test_window_band_and_causal_combine():
    vis = nbflash.reference.visible(4, 6, causal=True, window=(1, -1))
    # diagonal of row i is i + 2; causal cuts the right, window keeps one key to the left
    assert [np.flatnonzero(r).tolist() for r in vis] == [[1, 2], [2, 3], [3, 4], [4, 5]]
    vis = nbflash.reference.visible(3, 3, causal=False, window=(0, 1))
    assert [np.flatnonzero(r).tolist() for r in vis] == [[0, 1], [1, 2], [2]]


def test_philox_matches_random123_known_answers():
    m = 0xFFFFFFFF
    cases = [
        ((0, 0, 0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((m, m, m, m, m, m), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for args, want in cases:
        assert [int(x) for x in dropout.philox4x32_10(*args)] == list(want)


def test_keep_rate_is_within_statistical_bounds_and_seeds_differ():
    rng, seed = new_rng()
    p = float(rng.uniform(0.05, 0.9))
    keep = dropout.keep_mask(seed, p, 2, 3, 64, 96)
    n = keep.size
    sigma = math.sqrt(n * p * (1 - p))
    assert abs((~keep).sum() - n * p) < 6 * sigma, (p, seed)
    again = dropout.keep_mask(seed, p, 2, 3, 64, 96)
    other = dropout.keep_mask(seed + 1, p, 2, 3, 64, 96)
    assert np.array_equal(keep, again)
    assert (keep != other).mean() > p * (1 - p)  # independent masks differ in ~2p(1-p) of places


def test_device_philox_matches_host():
    rng, seed = new_rng()
    lo, hi = dropout.split_seed(seed)
    threshold = dropout.keep_threshold(0.37)
    rows, cols, bh = 3, 12, 5

    @cuda.jit
    def kernel(out):
        i = cuda.threadIdx.x
        for pair in range(cols // 2):
            keep0, keep1 = philox.keep_pair(lo, hi, bh, i, 2 * pair, threshold)
            out[i, 2 * pair] = keep0
            out[i, 2 * pair + 1] = keep1

    got = to_device(np.zeros((rows, cols), np.uint8))
    kernel[1, rows](got)
    want = dropout.keep_mask(seed, 0.37, 1, bh + 1, rows, cols)[0, bh]
    assert np.array_equal(to_host(got).astype(bool), want), seed


def test_device_window_helpers_match_the_oracle():
    from nbflash.kernels import score_mods
    from nbflash.variants import UNBOUNDED

    rng, seed = new_rng()
    seqlen_q, seqlen_k = int(rng.integers(1, 12)), int(rng.integers(1, 12))
    left, right = int(rng.integers(-1, 5)), int(rng.integers(-1, 5))
    causal = bool(rng.integers(2))
    left_k = left if left >= 0 else UNBOUNDED
    right_k = min(right if right >= 0 else UNBOUNDED, 0 if causal else UNBOUNDED)

    @cuda.jit
    def kernel(vis, ranges):
        i = cuda.threadIdx.x
        for j in range(seqlen_k):
            vis[i, j] = score_mods.window_visible(i, j, seqlen_q, seqlen_k, left_k, right_k)
        first, end = score_mods.window_key_range(i, i + 1, seqlen_q, seqlen_k, left_k, right_k)
        ranges[i, 0] = first
        ranges[i, 1] = end

    vis = to_device(np.zeros((seqlen_q, seqlen_k), np.uint8))
    ranges = to_device(np.zeros((seqlen_q, 2), np.int64))
    kernel[1, seqlen_q](vis, ranges)
    want = nbflash.reference.visible(seqlen_q, seqlen_k, causal, (left, right))
    assert np.array_equal(to_host(vis).astype(bool), want), seed
    for i, (first, end) in enumerate(to_host(ranges)):
        seen = np.flatnonzero(want[i])
        assert (first, end) == ((seen[0], seen[-1] + 1) if seen.size else (first, first)), (i, seed)
