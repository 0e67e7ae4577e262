"""The float64 oracle: attention written plainly, with the N x N scores materialized.

Same signature and semantics as :func:`nbflash.attention`; NumPy in, NumPy out.
Slow and memory-hungry by design: every kernel is checked against it.
"""

from __future__ import annotations

import math

import numpy as np

from . import dropout


def _to_bshd(x: np.ndarray, layout: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 3:
        x = x[None]
    return x if layout == "bshd" else x.transpose(0, 2, 1, 3)


def visible(seqlen_q: int, seqlen_k: int, causal: bool, window=None) -> np.ndarray:
    """Boolean (seqlen_q, seqlen_k): True where query i may attend to key j.

    Causal is bottom-right aligned: key j is hidden from query i when
    j > i + seqlen_k - seqlen_q. window=(left, right) keeps keys with
    i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k - seqlen_q + right (-1: no
    bound on that side).
    """
    i = np.arange(seqlen_q)[:, None]
    j = np.arange(seqlen_k)[None, :]
    diagonal = i + seqlen_k - seqlen_q
    seen = np.ones((seqlen_q, seqlen_k), dtype=bool)
    if causal:
        seen &= j <= diagonal
    if window is not None:
        left, right = window
        if left >= 0:
            seen &= j >= diagonal - left
        if right >= 0:
            seen &= j <= diagonal + right
    return seen


def _broadcast_scores_array(x, shape, squeeze, dtype):
    """A user bias/mask as a (batch, heads_q, seqlen_q, seqlen_k) array."""
    x = np.asarray(x, dtype=dtype)
    return np.broadcast_to(x, shape[1:])[None] if squeeze else np.broadcast_to(x, shape)


def _scores(qd, kd, scale, causal, variants):
    """The scores as the softmax sees them, (batch, heads, seqlen_q, seqlen_k) with kd
    already repeated to q's heads: scale * Q K^T, soft-capped, plus ALiBi and bias,
    -inf where hidden (causal, window, mask); and d(capped)/d(uncapped) for the
    backward (1 without softcap)."""
    batch, seqlen_q, heads_q, _ = qd.shape
    seqlen_k = kd.shape[1]
    scores = np.einsum("bihd,bjhd->bhij", qd, kd) * scale
    slope = np.ones_like(scores)
    softcap = variants.get("softcap") or 0.0
    if softcap:
        t = np.tanh(scores / softcap)
        scores = softcap * t
        slope = 1.0 - t * t
    slopes = variants.get("alibi_slopes")
    if slopes is not None:
        slopes = np.broadcast_to(np.asarray(slopes, dtype=np.float64), (batch, heads_q))
        i = np.arange(seqlen_q)[:, None]
        j = np.arange(seqlen_k)[None, :]
        distance = np.abs(i + seqlen_k - seqlen_q - j)
        scores = scores - slopes[:, :, None, None] * distance
    shape = scores.shape
    squeeze = variants.get("squeeze", False)
    if variants.get("bias") is not None:
        scores = scores + _broadcast_scores_array(variants["bias"], shape, squeeze, np.float64)
    seen = visible(seqlen_q, seqlen_k, causal, variants.get("window"))
    if variants.get("mask") is not None:
        seen = seen & _broadcast_scores_array(variants["mask"], shape, squeeze, bool)
    return np.where(seen, scores, -np.inf), slope


def _softmax(qd, kd, scale, causal, variants=None):
    """P = softmax(scores) (see _scores) as (batch, heads, seqlen_q, seqlen_k); also
    the row max, row sum, whether a row saw any key (rows that see none get P = 0,
    never NaN) and the softcap slope."""
    scores, slope = _scores(qd, kd, scale, causal, variants or {})
    row_max = scores.max(axis=-1, keepdims=True, initial=-np.inf)
    seen = np.isfinite(row_max)
    weights = np.where(seen, np.exp(scores - np.where(seen, row_max, 0.0)), 0.0)
    row_sum = weights.sum(axis=-1, keepdims=True)
    probs = np.where(row_sum > 0, weights / np.where(row_sum > 0, row_sum, 1.0), 0.0)
    return probs, row_max, row_sum, seen, slope


def _grouped(q, k, v, layout, scale):
    """(q, k, v) as float64 (batch, seqlen, heads, dim) with k and v repeated to q's
    heads (query head h reads kv head h // group), the group size, and the scale
    (default 1/sqrt(head_dim))."""
    qd, kd, vd = (_to_bshd(x, layout) for x in (q, k, v))
    group = qd.shape[2] // kd.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(qd.shape[3])
    return qd, np.repeat(kd, group, axis=2), np.repeat(vd, group, axis=2), group, scale


def _dropout_factor(variants, shape):
    """keep / (1 - p) as (batch, heads_q, seqlen_q, seqlen_k), or None without dropout."""
    p = variants.get("dropout_p") or 0.0
    if not p:
        return None
    keep = variants.get("dropout_mask")
    if keep is None:
        if variants.get("seed") is None:
            raise ValueError("seed: required when dropout_p > 0")
        keep = dropout.keep_mask(variants["seed"], p, *shape)
    return np.asarray(keep, dtype=np.float64) / (1.0 - p)


def _variants(window, softcap, alibi_slopes, bias, mask, dropout_p, seed, dropout_mask, squeeze):
    return {"window": window, "softcap": softcap, "alibi_slopes": alibi_slopes, "bias": bias,
            "mask": mask, "dropout_p": dropout_p, "seed": seed, "dropout_mask": dropout_mask,
            "squeeze": squeeze}


def attention(q, k, v, *, causal=False, scale=None, layout="bshd", return_lse=False, window=None,
              softcap=0.0, alibi_slopes=None, bias=None, mask=None, dropout_p=0.0, seed=None,
              dropout_mask=None):
    """float64 reference of :func:`nbflash.attention`, variants included.

    Scores: t = scale * q k^T; t = softcap * tanh(t / softcap) when softcap > 0;
    t -= slope[b, h] * |i + seqlen_k - seqlen_q - j| with alibi_slopes ((heads_q,) or
    (batch, heads_q)); t += bias (broadcastable to (batch, heads_q, seqlen_q,
    seqlen_k), or (heads_q, seqlen_q, seqlen_k) for 3-D inputs); hidden where causal,
    outside window=(left, right) or where the boolean mask is False. P = softmax(t);
    with dropout_p > 0, P is multiplied by keep / (1 - dropout_p), keep from
    nbflash.dropout.keep_mask(seed, ...) or the given dropout_mask ((batch, heads_q,
    seqlen_q, seqlen_k) bool). lse is of the scores before dropout.

    Returns out (float64, q's layout, v's head_dim) and, with return_lse, lse
    (float64, (batch, heads_q, seqlen_q); -inf for rows that see no key).
    """
    squeeze = np.ndim(q) == 3
    variants = _variants(window, softcap, alibi_slopes, bias, mask, dropout_p, seed, dropout_mask, squeeze)
    qd, kd, vd, _, scale = _grouped(q, k, v, layout, scale)
    probs, row_max, row_sum, seen, _ = _softmax(qd, kd, scale, causal, variants)
    factor = _dropout_factor(variants, probs.shape)
    if factor is not None:
        probs = probs * factor
    out = np.einsum("bhij,bjhd->bihd", probs, vd)
    with np.errstate(divide="ignore"):
        lse = np.where(seen, row_max + np.log(row_sum), -np.inf)[..., 0]

    if layout == "bhsd":
        out = out.transpose(0, 2, 1, 3)
    if squeeze:
        out, lse = out[0], lse[0]
    return (out, lse) if return_lse else out


def _seqlens(cache_seqlens, batch) -> np.ndarray:
    if isinstance(cache_seqlens, (int, np.integer)) and not isinstance(cache_seqlens, bool):
        lengths = np.full(batch, int(cache_seqlens), dtype=np.int64)
    else:
        lengths = np.asarray(cache_seqlens).astype(np.int64).reshape(-1)
    if lengths.shape != (batch,):
        raise ValueError(f"cache_seqlens: expected shape ({batch},); got {lengths.shape}")
    if (lengths < 0).any():
        raise ValueError(f"cache_seqlens: negative length {lengths.min()}")
    return lengths


def _cache_positions(cache, block_table, b, length):
    """(first, second) index arrays of positions 0..length-1 of sequence b."""
    t = np.arange(length)
    if block_table is None:
        if length > cache.shape[1]:
            raise ValueError(f"sequence {b}: {length} keys exceed the cache capacity {cache.shape[1]}")
        return np.full(length, b), t
    block_size = cache.shape[1]
    table = np.asarray(block_table)
    if -(-length // block_size) > table.shape[1]:
        raise ValueError(
            f"sequence {b}: {length} keys need more than the {table.shape[1]} blocks of block_table"
        )
    ids = table[b, t // block_size].astype(np.int64)
    bad = (ids < 0) | (ids >= cache.shape[0])
    if bad.any():
        where = int(t[bad][0] // block_size)
        raise IndexError(
            f"block_table[{b}, {where}] = {table[b, where]} is outside the cache's {cache.shape[0]} blocks"
        )
    return ids, t % block_size


def append_to_kvcache(k_cache, v_cache, *, cache_seqlens, k, v, block_table=None):
    """The caches after :func:`nbflash.attention_with_kvcache` appended k and v:
    float64 copies of k_cache and v_cache with token t of sequence b written at
    position cache_seqlens[b] + t (through block_table when given). The inputs are
    not modified. Raises ValueError past the capacity and IndexError for block ids
    outside the cache."""
    kc = np.array(k_cache, dtype=np.float64)
    vc = np.array(v_cache, dtype=np.float64)
    k, v = np.asarray(k, dtype=np.float64), np.asarray(v, dtype=np.float64)
    lengths = _seqlens(cache_seqlens, k.shape[0])
    for b in range(k.shape[0]):
        i0, i1 = _cache_positions(kc, block_table, b, int(lengths[b]) + k.shape[1])
        i0, i1 = i0[lengths[b]:], i1[lengths[b]:]
        kc[i0, i1] = k[b]
        vc[i0, i1] = v[b]
    return kc, vc


def attention_with_kvcache(q, k_cache, v_cache, *, cache_seqlens, k=None, v=None, block_table=None,
                           causal=True, scale=None, num_splits=0, return_lse=False):
    """float64 reference of :func:`nbflash.attention_with_kvcache` (num_splits is
    accepted and ignored: splitting does not change the result).

    Sequence b attends to its first cache_seqlens[b] cached keys followed by its new
    keys k[b] (when given), gathered through block_table for a paged cache; causal is
    bottom-right aligned over that total length. Nothing is mutated: the updated
    caches come from :func:`append_to_kvcache`. Returns out (float64, (batch, seqlen_q,
    heads_q, head_dim_v)) and, with return_lse, lse (float64, (batch, heads_q,
    seqlen_q)). Raises ValueError for lengths past the capacity or negative, and
    IndexError for block ids outside the cache.
    """
    qd = np.asarray(q, dtype=np.float64)
    batch, seqlen_q, heads_q, _ = qd.shape
    lengths = _seqlens(cache_seqlens, batch)
    n_new = 0 if k is None else np.shape(k)[1]
    kc, vc = np.asarray(k_cache), np.asarray(v_cache)
    outs, lses = [], []
    for b in range(batch):
        i0, i1 = _cache_positions(kc, block_table, b, int(lengths[b]) + n_new)
        i0, i1 = i0[:lengths[b]], i1[:lengths[b]]
        keys = np.asarray(kc[i0, i1], dtype=np.float64)
        values = np.asarray(vc[i0, i1], dtype=np.float64)
        if k is not None:
            keys = np.concatenate([keys, np.asarray(k[b], dtype=np.float64)])
            values = np.concatenate([values, np.asarray(v[b], dtype=np.float64)])
        o, lse = attention(qd[b:b + 1], keys[None], values[None], causal=causal, scale=scale, return_lse=True)
        outs.append(o[0])
        lses.append(lse[0])
    dv = np.shape(v_cache)[3]
    out = np.stack(outs) if outs else np.zeros((0, seqlen_q, heads_q, dv))
    lse = np.stack(lses) if lses else np.zeros((0, heads_q, seqlen_q))
    return (out, lse) if return_lse else out


def attention_backward(do, q, k, v, *, causal=False, scale=None, layout="bshd", window=None,
                       softcap=0.0, alibi_slopes=None, bias=None, mask=None, dropout_p=0.0, seed=None,
                       dropout_mask=None, return_dbias=False):
    """float64 reference of :func:`nbflash.attention_backward`: the gradients of
    sum(do * out) with out = attention(q, k, v, **the same variants), from the
    materialized P.

    do has out's shape (q's layout, v's head_dim). Returns (dq, dk, dv), float64, in
    the shapes of q, k, v, and with return_dbias also dbias in bias's shape (summed
    over the axes bias broadcasts along). For GQA, dk and dv sum over the query heads
    that share a kv head; rows that see no key contribute nothing (their dq is 0).
    """
    squeeze = np.ndim(q) == 3
    variants = _variants(window, softcap, alibi_slopes, bias, mask, dropout_p, seed, dropout_mask, squeeze)
    qd, kr, vr, group, scale = _grouped(q, k, v, layout, scale)
    dod = _to_bshd(do, layout)
    batch, seqlen_k, heads_q, head_dim = kr.shape
    heads_kv = heads_q // group
    probs, _, _, _, cap_slope = _softmax(qd, kr, scale, causal, variants)
    factor = _dropout_factor(variants, probs.shape)
    dropped = probs if factor is None else probs * factor

    # out = P_d V with P_d = P * keep / (1 - p), so dV = P_d^T dO and dP = (dO V^T) *
    # keep / (1 - p); softmax's Jacobian gives dS = P * (dP - rowsum(P * dP)); the
    # bias gradient is dS; softcap scales it by 1 - tanh^2; t = scale * Q K^T gives
    # dQ and dK.
    dv = np.einsum("bhij,bihd->bjhd", dropped, dod)
    dp = np.einsum("bihd,bjhd->bhij", dod, vr)
    if factor is not None:
        dp = dp * factor
    ds = probs * (dp - (probs * dp).sum(axis=-1, keepdims=True))
    dt = ds * cap_slope
    dq = scale * np.einsum("bhij,bjhd->bihd", dt, kr)
    dk = scale * np.einsum("bhij,bihd->bjhd", dt, qd)
    # GQA: sum the group's query heads into their kv head
    dk = dk.reshape(batch, seqlen_k, heads_kv, group, head_dim).sum(axis=3)
    dv = dv.reshape(batch, seqlen_k, heads_kv, group, vr.shape[3]).sum(axis=3)

    grads = [dq, dk, dv]
    if layout == "bhsd":
        grads = [g.transpose(0, 2, 1, 3) for g in grads]
    if squeeze:
        grads = [g[0] for g in grads]
    if return_dbias:
        if bias is None:
            raise ValueError("return_dbias: requires a bias")
        grads.append(_sum_to_shape(ds[0] if squeeze else ds, np.shape(bias)))
    return tuple(grads)


def _sum_to_shape(x, shape):
    """Sum x over the axes a broadcast of ``shape`` expanded (NumPy's rules)."""
    lead = x.ndim - len(shape)
    x = x.sum(axis=tuple(range(lead))) if lead else x
    axes = tuple(a for a, n in enumerate(shape) if n == 1 and x.shape[a] != 1)
    return x.sum(axis=axes, keepdims=True) if axes else x


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal=False, scale=None, return_lse=False):
    """float64 reference of :func:`nbflash.attention_varlen`: :func:`attention` on each
    packed sequence in turn.

    Returns out (float64, (total_q, heads_q, head_dim_v)) and, with return_lse, lse
    (float64, (heads_q, total_q); -inf for rows that see no key).
    """
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    cu_q, cu_k = (np.asarray(c, dtype=np.int64) for c in (cu_seqlens_q, cu_seqlens_k))
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[2])
    out = np.zeros((q.shape[0], q.shape[1], v.shape[2]))
    lse = np.full((q.shape[1], q.shape[0]), -np.inf)
    for b in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        out[qs], lse[:, qs] = attention(q[qs], k[ks], v[ks], causal=causal, scale=scale, return_lse=True)
    return (out, lse) if return_lse else out
