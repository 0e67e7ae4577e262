"""The portable forward kernel: any dtype, any head_dim, any GPU, and the simulator.

One CTA owns block_m query rows of one (batch, query head). The Q tile stays in
shared memory; K and V tiles stream through one shared buffer. Scores for a tile go
to shared memory, each row's online-softmax update (m_i, l_i, alpha) is done by one
thread, and the output accumulator is spread over all threads in local memory.
Tensors arrive as (batch, seqlen, heads, head_dim) views with any strides.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32, float64

from ..spec import ForwardSpec
from .convert import bf16_bits_to_f32, f32_to_bf16_bits
from .philox import keep_pair
from .score_mods import window_key_range, window_visible
from .softmax import finish_row, is_visible, last_visible_key_end, log_sum_exp, rescale
from .varlen import sequence_span


def _converters(dtype: str):
    """(load, store, acc_type) for a storage dtype."""
    if dtype == "bf16":
        return bf16_bits_to_f32, f32_to_bf16_bits, float32
    if dtype == "fp64":
        return _to_f64, _to_f64, float64
    if dtype == "fp16":
        return _to_f32, _to_f16, float32
    return _to_f32, _to_f32, float32


@cuda.jit(device=True, inline=True)
def _to_f32(x):
    return np.float32(x)


@cuda.jit(device=True, inline=True)
def _to_f64(x):
    return np.float64(x)


@cuda.jit(device=True, inline=True)
def _to_f16(x):
    return np.float16(x)


def build(spec: ForwardSpec):
    """Compile-time specialized kernel; launch with grid (cdiv(seqlen_q, block_m),
    heads_q, batch) and spec.threads threads.

    Arguments: q (B, Nq, Hq, D), k (B, Nk, Hkv, D), v (B, Nk, Hkv, Dv), out (B, Nq, Hq, Dv),
    lse (B, Hq, Nq) float32 (ignored unless spec.with_lse), scale, group = Hq // Hkv,
    cu_seqlens_q, cu_seqlens_k: int32 (ignored unless spec.varlen), then the variant
    arguments of nbflash.variants.KERNEL_ARGS (read only where spec.variant turns
    the variant on; window bounds include causal).

    With spec.varlen the batch is packed: q, k, v, out are (1, total, heads, dim) views,
    lse (1, Hq, total_q), the grid is (cdiv(max_seqlen_q, block_m), heads_q, batch) and
    blockIdx.z names the sequence, whose rows cu_seqlens[b]:cu_seqlens[b + 1] it owns.
    """
    assert spec.kernel == "simt"
    load, store, acc_t = _converters(spec.dtype)
    BM, BN, T = spec.block_m, spec.block_n, spec.threads
    D, DV = spec.head_dim, spec.head_dim_v
    KV_W = max(D, DV) + 1  # padded row: column c of consecutive rows hits different banks
    ACC_PER_THREAD = (BM * DV + T - 1) // T
    CAUSAL, WITH_LSE, VARLEN = spec.causal, spec.with_lse, spec.varlen
    NEG_INF = -math.inf
    VAR = spec.variant
    WINDOW, SOFTCAP, ALIBI, MASK, DROPOUT = VAR.window, VAR.softcap, VAR.alibi, VAR.mask, VAR.dropout
    BIAS = bool(VAR.bias)
    BIAS_BF16 = VAR.bias == "bf16"
    assert not (DROPOUT and BN % 2), "dropout draws its keep bits for key pairs"

    @cuda.jit(device=True, inline=True)
    def read_bias(bias, b, h, i, j):
        if BIAS_BF16:
            return acc_t(bf16_bits_to_f32(bias[b, h, i, j]))
        return acc_t(bias[b, h, i, j])

    @cuda.jit(device=True, inline=True)
    def score(s, i, j, b, bz, h, seqlen_q, seqlen_k, scale, softcap, alibi, bias):
        """The score of (i, j) as the softmax sees it, before masking (the order of
        kernels/score_mods.py), in the accumulation type."""
        t = s * scale
        if SOFTCAP:
            cap = acc_t(softcap)
            t = cap * math.tanh(t / cap)
        if ALIBI:
            t -= acc_t(alibi[bz, h]) * acc_t(abs(i + seqlen_k - seqlen_q - j))
        if BIAS:  # clamped: rows past seqlen_q and keys past seqlen_k are never used
            t += read_bias(bias, b, h, min(i, seqlen_q - 1), min(j, seqlen_k - 1))
        return t

    @cuda.jit(device=True, inline=True)
    def load_tile(src, b, hk, k_start, n0, seqlen_k, width, kv_s, tid):
        for e in range(tid, BN * width, T):
            r = e // width
            c = e - r * width
            j = n0 + r
            if j < seqlen_k:
                kv_s[r, c] = load(src[b, k_start + j, hk, c])
            else:
                kv_s[r, c] = 0

    @cuda.jit
    def forward_simt(q, k, v, out, lse, scale, group, cu_seqlens_q, cu_seqlens_k, window_left, window_right,
                     softcap, alibi, bias, mask, keep_threshold, keep_scale, seed_lo, seed_hi):
        tid = cuda.threadIdx.x
        row0 = cuda.blockIdx.x * BM
        h = cuda.blockIdx.y
        hk = h // group
        if VARLEN:  # one packed sequence per blockIdx.z; rows are offset by its start
            b = 0
            q_start, seqlen_q = sequence_span(cu_seqlens_q, cuda.blockIdx.z, q.shape[1])
            k_start, seqlen_k = sequence_span(cu_seqlens_k, cuda.blockIdx.z, k.shape[1])
            if row0 >= seqlen_q:
                return
        else:
            b = cuda.blockIdx.z
            q_start = 0
            k_start = 0
            seqlen_q = q.shape[1]
            seqlen_k = k.shape[1]

        q_s = cuda.shared.array((BM, D), acc_t)
        kv_s = cuda.shared.array((BN, KV_W), acc_t)
        p_s = cuda.shared.array((BM, BN), acc_t)
        m_s = cuda.shared.array(BM, acc_t)
        l_s = cuda.shared.array(BM, acc_t)
        alpha_s = cuda.shared.array(BM, acc_t)

        for e in range(tid, BM * D, T):
            r = e // D
            c = e - r * D
            if row0 + r < seqlen_q:
                q_s[r, c] = load(q[b, q_start + row0 + r, h, c])
            else:
                q_s[r, c] = 0
        if tid < BM:
            m_s[tid] = NEG_INF
            l_s[tid] = 0
        acc = cuda.local.array(ACC_PER_THREAD, acc_t)
        for t in range(ACC_PER_THREAD):
            acc[t] = 0

        key_start = 0
        key_end = last_visible_key_end(row0 + BM, seqlen_q, seqlen_k, CAUSAL)
        if WINDOW:  # key tiles outside every row's band are skipped
            key_start, key_end = window_key_range(row0, row0 + BM, seqlen_q, seqlen_k, window_left, window_right)
            key_start = key_start // BN * BN
        bz = cuda.blockIdx.z  # the batch entry (varlen: the sequence) of ALiBi and dropout
        for n0 in range(key_start, key_end, BN):
            cuda.syncthreads()  # the previous V tile and P are consumed
            load_tile(k, b, hk, k_start, n0, seqlen_k, D, kv_s, tid)
            cuda.syncthreads()
            # S = scale * Q K^T, masked to -inf where a key is not visible
            for e in range(tid, BM * BN, T):
                r = e // BN
                c = e - r * BN
                s = acc_t(0)
                for d in range(D):
                    s += q_s[r, d] * kv_s[c, d]
                i = row0 + r
                j = n0 + c
                if WINDOW:
                    seen = window_visible(i, j, seqlen_q, seqlen_k, window_left, window_right)
                else:
                    seen = is_visible(i, j, seqlen_q, seqlen_k, CAUSAL)
                if MASK and seen:
                    seen = mask[b, h, min(i, seqlen_q - 1), j] != 0
                if seen:
                    if SOFTCAP or ALIBI or BIAS:
                        p_s[r, c] = score(s, i, j, b, bz, h, seqlen_q, seqlen_k, scale, softcap, alibi, bias)
                    else:
                        p_s[r, c] = s * scale
                else:
                    p_s[r, c] = NEG_INF
            cuda.syncthreads()
            if tid < BM:  # one thread per row: m_i, l_i, alpha, P = exp(S - m_i)
                m_old = m_s[tid]
                m_new = m_old
                for c in range(BN):
                    m_new = max(m_new, p_s[tid, c])
                alpha = rescale(m_old, m_new)
                row_sum = acc_t(0)
                for c in range(BN):
                    s = p_s[tid, c]
                    p = acc_t(0)
                    if s != NEG_INF:
                        p = math.exp(s - m_new)
                    p_s[tid, c] = p
                    row_sum += p
                m_s[tid] = m_new
                l_s[tid] = l_s[tid] * alpha + row_sum
                alpha_s[tid] = alpha
                if DROPOUT:  # l_i sums P before dropout; P V uses the dropped, rescaled P
                    bh = bz * cuda.gridDim.y + h
                    for c in range(0, BN, 2):
                        keep0, keep1 = keep_pair(seed_lo, seed_hi, bh, row0 + tid, n0 + c, keep_threshold)
                        p_s[tid, c] = p_s[tid, c] * keep_scale if keep0 else acc_t(0)
                        p_s[tid, c + 1] = p_s[tid, c + 1] * keep_scale if keep1 else acc_t(0)
            cuda.syncthreads()
            load_tile(v, b, hk, k_start, n0, seqlen_k, DV, kv_s, tid)
            cuda.syncthreads()
            # acc = alpha * acc + P V
            for t in range(ACC_PER_THREAD):
                e = tid + t * T
                if e < BM * DV:
                    r = e // DV
                    c = e - r * DV
                    a = acc[t] * alpha_s[r]
                    for j in range(BN):
                        a += p_s[r, j] * kv_s[j, c]
                    acc[t] = a

        cuda.syncthreads()  # m_s, l_s final for every row
        for t in range(ACC_PER_THREAD):
            e = tid + t * T
            if e < BM * DV:
                r = e // DV
                c = e - r * DV
                if row0 + r < seqlen_q:
                    out[b, q_start + row0 + r, h, c] = store(finish_row(acc[t], l_s[r]))
        if WITH_LSE:
            if tid < BM and row0 + tid < seqlen_q:
                lse[b, h, q_start + row0 + tid] = log_sum_exp(m_s[tid], l_s[tid])

    return forward_simt
