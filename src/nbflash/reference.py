"""The float64 oracle: attention written plainly, with the N x N scores materialized.

Same signature and semantics as :func:`nbflash.attention`; NumPy in, NumPy out.
Slow and memory-hungry by design: every kernel is checked against it.
"""

from __future__ import annotations

import math

import numpy as np


def _to_bshd(x: np.ndarray, layout: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 3:
        x = x[None]
    return x if layout == "bshd" else x.transpose(0, 2, 1, 3)


def visible(seqlen_q: int, seqlen_k: int, causal: bool) -> np.ndarray:
    """Boolean (seqlen_q, seqlen_k): True where query i may attend to key j.

    Causal is bottom-right aligned: key j is hidden from query i when
    j > i + seqlen_k - seqlen_q.
    """
    i = np.arange(seqlen_q)[:, None]
    j = np.arange(seqlen_k)[None, :]
    if not causal:
        return np.ones((seqlen_q, seqlen_k), dtype=bool)
    return j <= i + seqlen_k - seqlen_q


def attention(q, k, v, *, causal=False, scale=None, layout="bshd", return_lse=False):
    """float64 reference of :func:`nbflash.attention`.

    Returns out (float64, q's layout, v's head_dim) and, with return_lse, lse
    (float64, (batch, heads_q, seqlen_q); -inf for rows that see no key).
    """
    squeeze = np.ndim(q) == 3
    qd, kd, vd = (_to_bshd(x, layout) for x in (q, k, v))
    batch, seqlen_q, heads_q, head_dim = qd.shape
    seqlen_k, heads_kv = kd.shape[1], kd.shape[2]
    group = heads_q // heads_kv
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)

    kd = np.repeat(kd, group, axis=2)  # query head h reads kv head h // group
    vd = np.repeat(vd, group, axis=2)
    scores = np.einsum("bihd,bjhd->bhij", qd, kd) * scale
    mask = visible(seqlen_q, seqlen_k, causal)
    scores = np.where(mask, scores, -np.inf)

    row_max = scores.max(axis=-1, keepdims=True, initial=-np.inf)
    seen = np.isfinite(row_max)
    weights = np.where(seen, np.exp(scores - np.where(seen, row_max, 0.0)), 0.0)
    row_sum = weights.sum(axis=-1, keepdims=True)
    probs = np.where(row_sum > 0, weights / np.where(row_sum > 0, row_sum, 1.0), 0.0)
    out = np.einsum("bhij,bjhd->bihd", probs, vd)
    with np.errstate(divide="ignore"):
        lse = np.where(seen, row_max + np.log(row_sum), -np.inf)[..., 0]

    if layout == "bhsd":
        out = out.transpose(0, 2, 1, 3)
    if squeeze:
        out, lse = out[0], lse[0]
    return (out, lse) if return_lse else out


def attention_backward(do, q, k, v, *, causal=False, scale=None, layout="bshd"):
    """float64 reference of :func:`nbflash.attention_backward`: the gradients of
    sum(do * out) with out = attention(q, k, v), from the materialized P.

    do has out's shape (q's layout, v's head_dim). Returns (dq, dk, dv), float64, in
    the shapes of q, k, v. For GQA, dk and dv sum over the query heads that share a kv
    head; rows that see no key contribute nothing (their dq is 0).
    """
    squeeze = np.ndim(q) == 3
    qd, kd, vd, dod = (_to_bshd(x, layout) for x in (q, k, v, do))
    batch, seqlen_q, heads_q, head_dim = qd.shape
    seqlen_k, heads_kv = kd.shape[1], kd.shape[2]
    group = heads_q // heads_kv
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)

    kr = np.repeat(kd, group, axis=2)  # query head h reads kv head h // group
    vr = np.repeat(vd, group, axis=2)
    scores = np.einsum("bihd,bjhd->bhij", qd, kr) * scale
    mask = visible(seqlen_q, seqlen_k, causal)
    scores = np.where(mask, scores, -np.inf)
    row_max = scores.max(axis=-1, keepdims=True, initial=-np.inf)
    seen = np.isfinite(row_max)
    weights = np.where(seen, np.exp(scores - np.where(seen, row_max, 0.0)), 0.0)
    row_sum = weights.sum(axis=-1, keepdims=True)
    probs = np.where(row_sum > 0, weights / np.where(row_sum > 0, row_sum, 1.0), 0.0)

    # out = P V, so dV = P^T dO and dP = dO V^T; softmax's Jacobian gives
    # dS = P * (dP - rowsum(P * dP)), and S = scale * Q K^T gives dQ and dK.
    dv = np.einsum("bhij,bihd->bjhd", probs, dod)
    dp = np.einsum("bihd,bjhd->bhij", dod, vr)
    ds = probs * (dp - (probs * dp).sum(axis=-1, keepdims=True))
    dq = scale * np.einsum("bhij,bjhd->bihd", ds, kr)
    dk = scale * np.einsum("bhij,bihd->bjhd", ds, qd)
    # GQA: sum the group's query heads into their kv head
    dk = dk.reshape(batch, seqlen_k, heads_kv, group, head_dim).sum(axis=3)
    dv = dv.reshape(batch, seqlen_k, heads_kv, group, vd.shape[3]).sum(axis=3)

    grads = [dq, dk, dv]
    if layout == "bhsd":
        grads = [g.transpose(0, 2, 1, 3) for g in grads]
    if squeeze:
        grads = [g[0] for g in grads]
    return tuple(grads)


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
