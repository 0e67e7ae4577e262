"""The portable backward kernels (FlashAttention-2, Algorithm 2): any dtype, any
head_dim 1..256 (head_dim_v may differ), any GPU, and the simulator.

Three kernels, launched in this order on one stream:
  preprocess  delta[b, h, i] = sum_d do[b, i, h, d] * out[b, i, h, d]   (= rowsum(P * dP))
  dkdv        one CTA per (key tile, kv head, batch): K and V tiles stay in shared
              memory; the CTA walks the group's query heads and the query tiles that
              can see its keys, recomputes P = exp(scale * s - lse) and accumulates
              dV += P^T dO and dK += dS^T Q, with dS = P * (dO V^T - delta); it writes
              dk and dv once (every kv head has one owner: no atomics).
  dq          one CTA per (query tile, query head, batch): Q, dO, lse and delta stay in
              shared memory; the CTA walks the visible key tiles and accumulates
              dQ += dS K. Recomputing dS here costs a second Q K^T, and buys a dQ
              without atomics or a float32 scratch buffer.
Both gradient kernels are therefore deterministic: each output element is summed in
one fixed order by one thread. Tiles live in shared memory in accumulation precision
(float32, float64 for fp64); P and dS are never rounded to the storage dtype.

Kernel argument contract, shared by every backward family (backward_<kernel>.py):
  build(spec) returns BackwardKernels(preprocess, dkdv, dq); each launches with
  spec.threads threads and shared_bytes(spec) dynamic shared memory (0 here):
  preprocess(do, out, delta)                                  grid (cdiv(Nq, threads), Hq, B)
  dkdv(q, k, v, do, lse, delta, dq, dk, dv, scale, group, *variant_args, dbias)
                                                              grid (cdiv(Nk, block_n), Hkv, B)
  dq(q, k, v, do, lse, delta, dq, dk, dv, scale, group, *variant_args, dbias)
                                                              grid (cdiv(Nq, block_m), Hq, B)
  row_lse(q, k, lse, scale, *variant_args)                    grid (cdiv(Nq, threads), Hq, B)
with (batch, seqlen, heads, head_dim) views of any strides (unit-stride last axis):
q (B, Nq, Hq, D), k (B, Nk, Hkv, D), v (B, Nk, Hkv, Dv), do and out (B, Nq, Hq, Dv),
lse and delta (B, Hq, Nq) in accumulation precision (lse -inf for rows that see no
key), dq (B, Nq, Hq, D), dk (B, Nk, Hkv, D), dv (B, Nk, Hkv, Dv), scale in accumulation
precision, group = Hq // Hkv. bfloat16 arrives as uint16 bits. dkdv writes only dk
and dv, dq only dq; each writes every element of its outputs. variant_args are the
ten values of nbflash.variants.KERNEL_ARGS (dummies when spec.variant is PLAIN);
dbias is a float32 (B, Hq, Nq, Nk) buffer, zeroed by the caller, into which dkdv
writes dS (the gradient of an additive bias) when spec.dbias, else a dummy.
row_lse (float64 lse for variant specs, see below) is the portable family's only.

Variants (spec.variant, compile-time; nbflash.reference._scores is the definition):
P is recomputed from the modified scores t (softcap, ALiBi, bias; hidden outside the
window or the mask) as exp(t - lse); dropout multiplies P and dP by keep / (1 - p)
with the forward's Philox mask; dS = P * (dP - delta) is the bias gradient, and
softcap multiplies it by 1 - tanh^2 before dQ and dK. A sliding window skips the
query tiles (dkdv) and key tiles (dq) outside its band.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from numba import cuda

from ..spec import BackwardSpec
from ..tuning import _odd
from .convert import bf16_bits_to_f32
from .forward_simt import _converters
from .philox import keep_pair
from .score_mods import window_key_range, window_query_range, window_visible
from .softmax import is_visible, last_visible_key_end


class BackwardKernels(NamedTuple):
    """The kernels of one backward specialization (contract in the module docstring)."""

    preprocess: object
    dkdv: object
    dq: object
    row_lse: object = None


def shared_bytes(spec: BackwardSpec) -> int:
    """Dynamic shared memory: none, every tile is a static shared array."""
    return 0


def build_preprocess(dtype: str, head_dim_v: int, threads: int):
    """delta = rowsum(dO * O), one thread per (row, head); any storage dtype."""
    load, _, acc_t = _converters(dtype)
    DV, T = head_dim_v, threads

    @cuda.jit
    def backward_preprocess(do, out, delta):
        i = cuda.blockIdx.x * T + cuda.threadIdx.x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        if i < do.shape[1]:
            a = acc_t(0)
            for c in range(DV):
                a += load(do[b, i, h, c]) * load(out[b, i, h, c])
            delta[b, h, i] = a

    return backward_preprocess


def _bias_loader(dtype: str, acc_t):
    """bias[b, h, i, j] in accumulation precision (bfloat16 arrives as uint16 bits)."""
    if dtype == "bf16":
        @cuda.jit(device=True, inline=True)
        def read(bias, b, h, i, j):
            return acc_t(bf16_bits_to_f32(bias[b, h, i, j]))
    else:
        @cuda.jit(device=True, inline=True)
        def read(bias, b, h, i, j):
            return acc_t(bias[b, h, i, j])
    return read


def build(spec: BackwardSpec) -> BackwardKernels:
    """Compile-time specialized kernels; see the module docstring for launches."""
    assert spec.kernel == "simt"
    load, store, acc_t = _converters(spec.dtype)
    BM, BN, T = spec.block_m, spec.block_n, spec.threads
    D, DV = spec.head_dim, spec.head_dim_v
    K_W, V_W = _odd(D), _odd(DV)  # odd row lengths: column c of consecutive rows hits different banks
    DK_PER_THREAD = (BN * D + T - 1) // T
    DV_PER_THREAD = (BN * DV + T - 1) // T
    DQ_PER_THREAD = (BM * D + T - 1) // T
    CAUSAL = spec.causal
    NEG_INF = -math.inf
    VARIANT = bool(spec.variant)
    WINDOW, SOFTCAP, ALIBI = spec.variant.window, spec.variant.softcap, spec.variant.alibi
    BIAS, MASK, DROPOUT = bool(spec.variant.bias), spec.variant.mask, spec.variant.dropout
    DBIAS = spec.dbias
    SLOPE_M, SLOPE_N = (BM, BN) if SOFTCAP else (1, 1)  # softcap's 1 - tanh^2 per element of P
    read_bias = _bias_loader(spec.variant.bias or "fp32", acc_t)

    @cuda.jit(device=True, inline=True)
    def load_rows(src, b, h, row0, seqlen, width, dst, rows, tid):
        """dst[r, c] = src[b, row0 + r, h, c] for r < rows, 0 past seqlen."""
        for e in range(tid, rows * width, T):
            r = e // width
            c = e - r * width
            if row0 + r < seqlen:
                dst[r, c] = load(src[b, row0 + r, h, c])
            else:
                dst[r, c] = 0

    @cuda.jit(device=True, inline=True)
    def load_row_stats(lse, delta, b, h, row0, seqlen_q, lse_s, delta_s, tid):
        """lse and delta of BM rows; rows past seqlen_q get lse = -inf (P = 0)."""
        for r in range(tid, BM, T):
            if row0 + r < seqlen_q:
                lse_s[r] = lse[b, h, row0 + r]
                delta_s[r] = delta[b, h, row0 + r]
            else:
                lse_s[r] = NEG_INF
                delta_s[r] = 0

    @cuda.jit(device=True, inline=True)
    def probability(q_s, k_s, r, c, i, j, lse_i, seqlen_q, seqlen_k, scale):
        """P_ij = exp(scale * q_i . k_j - lse_i) (FA2 Alg. 2 line 11), 0 when key j is
        hidden from query i or the row sees no key at all (lse_i = -inf)."""
        p = acc_t(0)
        if lse_i != NEG_INF and is_visible(i, j, seqlen_q, seqlen_k, CAUSAL):
            s = acc_t(0)
            for d in range(D):
                s += q_s[r, d] * k_s[c, d]
            p = math.exp(s * scale - lse_i)
        return p

    @cuda.jit(device=True, inline=True)
    def modified_score(s, b, h, i, j, seqlen_q, seqlen_k, scale, softcap, alibi, bias):
        """(t, dt/d(scale s)) for the raw dot product s: the score the forward's softmax
        saw (softcap, ALiBi, bias; nbflash.reference._scores) and softcap's 1 - tanh^2
        (1 without softcap). In accumulation precision, so fp64 stays fp64."""
        t = s * scale
        slope = acc_t(1)
        if SOFTCAP:
            th = math.tanh(t / acc_t(softcap))
            t = acc_t(softcap) * th
            slope = acc_t(1) - th * th
        if ALIBI:
            t -= acc_t(alibi[b, h]) * acc_t(abs(i + seqlen_k - seqlen_q - j))
        if BIAS:
            t += read_bias(bias, b, h, i, j)
        return t, slope

    @cuda.jit(device=True, inline=True)
    def seen(b, h, i, j, lse_i, seqlen_q, seqlen_k, window_left, window_right, mask):
        """Query i sees key j: inside both sequences, the causal/window band and the
        mask, and the row saw some key in the forward (lse_i finite)."""
        ok = lse_i != NEG_INF and i < seqlen_q and j < seqlen_k
        if WINDOW:
            ok = ok and window_visible(i, j, seqlen_q, seqlen_k, window_left, window_right)
        elif CAUSAL:
            ok = ok and j <= i + seqlen_k - seqlen_q
        if MASK:
            if ok:
                ok = mask[b, h, i, j] != 0
        return ok

    @cuda.jit(device=True, inline=True)
    def kept(b, h, heads_q, i, j, keep_threshold, seed_lo, seed_hi):
        """Dropout keeps element (b, h, i, j): the forward's Philox word (nbflash.dropout)."""
        k0, k1 = keep_pair(seed_lo, seed_hi, b * heads_q + h, i, j - (j & 1), keep_threshold)
        return k1 if j & 1 else k0

    @cuda.jit(device=True, inline=True)
    def variant_probability(q_s, k_s, r, c, b, h, i, j, lse_i, seqlen_q, seqlen_k, scale,
                            window_left, window_right, softcap, alibi, bias, mask):
        """(P_ij, softcap slope) with the variants: exp(t_ij - lse_i), 0 where hidden."""
        p = acc_t(0)
        slope = acc_t(1)
        if seen(b, h, i, j, lse_i, seqlen_q, seqlen_k, window_left, window_right, mask):
            s = acc_t(0)
            for d in range(D):
                s += q_s[r, d] * k_s[c, d]
            t, slope = modified_score(s, b, h, i, j, seqlen_q, seqlen_k, scale, softcap, alibi, bias)
            p = math.exp(t - lse_i)
        return p, slope

    @cuda.jit(device=True, inline=True)
    def score_gradient(do_s, v_s, r, c, p, delta_i):
        """dS_ij = P_ij (dP_ij - delta_i) with dP = dO V^T (Alg. 2 lines 14-16); 0
        where P is, so a hidden row never turns garbage in delta into NaN."""
        ds = acc_t(0)
        if p != 0:
            dp = acc_t(0)
            for d in range(DV):
                dp += do_s[r, d] * v_s[c, d]
            ds = p * (dp - delta_i)
        return ds

    @cuda.jit(device=True, inline=True)
    def dropout_score_gradient(do_s, v_s, r, c, p, keep, keep_scale, delta_i):
        """dS_ij = P_ij (dP_ij keep / (1 - p) - delta_i): dropout scales dP as it scaled
        P (delta = rowsum(dO * O) already holds the dropped P)."""
        ds = acc_t(0)
        if p != 0:
            dp = acc_t(0)
            if keep:
                for d in range(DV):
                    dp += do_s[r, d] * v_s[c, d]
                dp *= acc_t(keep_scale)
            ds = p * (dp - delta_i)
        return ds

    @cuda.jit
    def backward_dkdv_simt(q, k, v, do, lse, delta, dq, dk, dv, scale, group,
                           window_left, window_right, softcap, alibi, bias, mask,
                           keep_threshold, keep_scale, seed_lo, seed_hi, dbias):
        tid = cuda.threadIdx.x
        n0 = cuda.blockIdx.x * BN
        hk = cuda.blockIdx.y
        b = cuda.blockIdx.z
        seqlen_q = q.shape[1]
        seqlen_k = k.shape[1]
        heads_q = q.shape[2]

        k_s = cuda.shared.array((BN, K_W), acc_t)
        v_s = cuda.shared.array((BN, V_W), acc_t)
        q_s = cuda.shared.array((BM, D), acc_t)
        do_s = cuda.shared.array((BM, DV), acc_t)
        p_s = cuda.shared.array((BM, BN), acc_t)  # P (dropped elements as -P), then dS in place
        slope_s = cuda.shared.array((SLOPE_M, SLOPE_N), acc_t)
        lse_s = cuda.shared.array(BM, acc_t)
        delta_s = cuda.shared.array(BM, acc_t)

        load_rows(k, b, hk, n0, seqlen_k, D, k_s, BN, tid)
        load_rows(v, b, hk, n0, seqlen_k, DV, v_s, BN, tid)
        dk_acc = cuda.local.array(DK_PER_THREAD, acc_t)
        dv_acc = cuda.local.array(DV_PER_THREAD, acc_t)
        for t in range(DK_PER_THREAD):
            dk_acc[t] = 0
        for t in range(DV_PER_THREAD):
            dv_acc[t] = 0

        # Causal: query i sees key n0 only when i >= n0 - (seqlen_k - seqlen_q);
        # query tiles before that one are fully masked and skipped. A window also
        # ends the walk after the last query that sees these keys.
        m_begin = 0
        m_end = seqlen_q
        if WINDOW:
            first, m_end = window_query_range(n0, n0 + BN, seqlen_q, seqlen_k, window_left, window_right)
            m_begin = (first // BM) * BM
        elif CAUSAL:
            m_begin = (max(0, n0 - (seqlen_k - seqlen_q)) // BM) * BM
        for g in range(group):
            h = hk * group + g
            for m0 in range(m_begin, m_end, BM):
                cuda.syncthreads()  # the previous query tile is consumed
                load_rows(q, b, h, m0, seqlen_q, D, q_s, BM, tid)
                load_rows(do, b, h, m0, seqlen_q, DV, do_s, BM, tid)
                load_row_stats(lse, delta, b, h, m0, seqlen_q, lse_s, delta_s, tid)
                cuda.syncthreads()
                for e in range(tid, BM * BN, T):
                    r = e // BN
                    c = e - r * BN
                    if VARIANT:
                        p, slope = variant_probability(
                            q_s, k_s, r, c, b, h, m0 + r, n0 + c, lse_s[r], seqlen_q, seqlen_k, scale,
                            window_left, window_right, softcap, alibi, bias, mask)
                        if SOFTCAP:
                            slope_s[r, c] = slope
                        if DROPOUT:  # the sign keeps the keep bit: P >= 0
                            if not kept(b, h, heads_q, m0 + r, n0 + c, keep_threshold, seed_lo, seed_hi):
                                p = -p
                        p_s[r, c] = p
                    else:
                        p_s[r, c] = probability(q_s, k_s, r, c, m0 + r, n0 + c, lse_s[r], seqlen_q, seqlen_k, scale)
                cuda.syncthreads()
                # dV += P^T dO (Alg. 2 line 12). The accumulator loop is innermost: its
                # fixed trip count unrolls, so dv_acc and dk_acc stay in registers.
                for r in range(BM):
                    for t in range(DV_PER_THREAD):
                        e = tid + t * T
                        if e < BN * DV:
                            j = e // DV
                            if DROPOUT:  # dropped elements (stored as -P) add nothing
                                dv_acc[t] += max(p_s[r, j], acc_t(0)) * acc_t(keep_scale) * do_s[r, e - j * DV]
                            else:
                                dv_acc[t] += p_s[r, j] * do_s[r, e - j * DV]
                cuda.syncthreads()  # P is read; dS overwrites it
                for e in range(tid, BM * BN, T):
                    r = e // BN
                    c = e - r * BN
                    if DROPOUT:
                        p = p_s[r, c]
                        ds = dropout_score_gradient(do_s, v_s, r, c, abs(p), p > 0, keep_scale, delta_s[r])
                    else:
                        ds = score_gradient(do_s, v_s, r, c, p_s[r, c], delta_s[r])
                    if DBIAS:
                        if m0 + r < seqlen_q and n0 + c < seqlen_k:
                            dbias[b, h, m0 + r, n0 + c] = ds
                    if SOFTCAP:
                        ds *= slope_s[r, c]
                    p_s[r, c] = ds
                cuda.syncthreads()
                # dK += dS^T Q (Alg. 2 line 18; the factor scale is applied once, at the end)
                for r in range(BM):
                    for t in range(DK_PER_THREAD):
                        e = tid + t * T
                        if e < BN * D:
                            j = e // D
                            dk_acc[t] += p_s[r, j] * q_s[r, e - j * D]

        for t in range(DK_PER_THREAD):
            e = tid + t * T
            if e < BN * D:
                j = e // D
                c = e - j * D
                if n0 + j < seqlen_k:
                    dk[b, n0 + j, hk, c] = store(dk_acc[t] * scale)
        for t in range(DV_PER_THREAD):
            e = tid + t * T
            if e < BN * DV:
                j = e // DV
                c = e - j * DV
                if n0 + j < seqlen_k:
                    dv[b, n0 + j, hk, c] = store(dv_acc[t])

    @cuda.jit
    def backward_dq_simt(q, k, v, do, lse, delta, dq, dk, dv, scale, group,
                         window_left, window_right, softcap, alibi, bias, mask,
                         keep_threshold, keep_scale, seed_lo, seed_hi, dbias):
        tid = cuda.threadIdx.x
        row0 = cuda.blockIdx.x * BM
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        hk = h // group
        seqlen_q = q.shape[1]
        seqlen_k = k.shape[1]
        heads_q = q.shape[2]

        q_s = cuda.shared.array((BM, D), acc_t)
        do_s = cuda.shared.array((BM, DV), acc_t)
        k_s = cuda.shared.array((BN, K_W), acc_t)
        v_s = cuda.shared.array((BN, V_W), acc_t)
        ds_s = cuda.shared.array((BM, BN), acc_t)
        lse_s = cuda.shared.array(BM, acc_t)
        delta_s = cuda.shared.array(BM, acc_t)

        load_rows(q, b, h, row0, seqlen_q, D, q_s, BM, tid)
        load_rows(do, b, h, row0, seqlen_q, DV, do_s, BM, tid)
        load_row_stats(lse, delta, b, h, row0, seqlen_q, lse_s, delta_s, tid)
        dq_acc = cuda.local.array(DQ_PER_THREAD, acc_t)
        for t in range(DQ_PER_THREAD):
            dq_acc[t] = 0

        key_begin = 0
        if WINDOW:
            first, key_end = window_key_range(row0, row0 + BM, seqlen_q, seqlen_k, window_left, window_right)
            key_begin = (first // BN) * BN
        else:
            key_end = last_visible_key_end(row0 + BM, seqlen_q, seqlen_k, CAUSAL)
        for n0 in range(key_begin, key_end, BN):
            cuda.syncthreads()  # the previous K tile and dS are consumed
            load_rows(k, b, hk, n0, seqlen_k, D, k_s, BN, tid)
            load_rows(v, b, hk, n0, seqlen_k, DV, v_s, BN, tid)
            cuda.syncthreads()
            for e in range(tid, BM * BN, T):
                r = e // BN
                c = e - r * BN
                if VARIANT:
                    p, slope = variant_probability(
                        q_s, k_s, r, c, b, h, row0 + r, n0 + c, lse_s[r], seqlen_q, seqlen_k, scale,
                        window_left, window_right, softcap, alibi, bias, mask)
                    if DROPOUT:
                        keep = kept(b, h, heads_q, row0 + r, n0 + c, keep_threshold, seed_lo, seed_hi)
                        ds = dropout_score_gradient(do_s, v_s, r, c, p, keep, keep_scale, delta_s[r])
                    else:
                        ds = score_gradient(do_s, v_s, r, c, p, delta_s[r])
                    ds_s[r, c] = ds * slope
                else:
                    p = probability(q_s, k_s, r, c, row0 + r, n0 + c, lse_s[r], seqlen_q, seqlen_k, scale)
                    ds_s[r, c] = score_gradient(do_s, v_s, r, c, p, delta_s[r])
            cuda.syncthreads()
            # dQ += dS K (Alg. 2 line 17; scale applied at the end)
            for j in range(BN):
                for t in range(DQ_PER_THREAD):
                    e = tid + t * T
                    if e < BM * D:
                        r = e // D
                        dq_acc[t] += ds_s[r, j] * k_s[j, e - r * D]

        for t in range(DQ_PER_THREAD):
            e = tid + t * T
            if e < BM * D:
                r = e // D
                c = e - r * D
                if row0 + r < seqlen_q:
                    dq[b, row0 + r, h, c] = store(dq_acc[t] * scale)

    @cuda.jit
    def backward_row_lse_simt(q, k, lse, scale, window_left, window_right, softcap, alibi, bias, mask,
                              keep_threshold, keep_scale, seed_lo, seed_hi):
        """lse[b, h, i] = log sum_j exp(t_ij) over the keys row i sees, in accumulation
        precision (-inf where none): for float64 inputs whose forward lse is float32
        (P recomputed from it would cap the gradients at ~1e-7). One thread per row;
        only fp64 variant specs use it, so it favours plainness over speed."""
        i = cuda.blockIdx.x * T + cuda.threadIdx.x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        seqlen_q = q.shape[1]
        seqlen_k = k.shape[1]
        hk = h // (q.shape[2] // k.shape[2])
        if i < seqlen_q:
            m_i = acc_t(NEG_INF)
            l_i = acc_t(0)
            for j in range(seqlen_k):
                if seen(b, h, i, j, acc_t(0), seqlen_q, seqlen_k, window_left, window_right, mask):
                    s = acc_t(0)
                    for d in range(D):
                        s += load(q[b, i, h, d]) * load(k[b, j, hk, d])
                    t, _ = modified_score(s, b, h, i, j, seqlen_q, seqlen_k, scale, softcap, alibi, bias)
                    if t > m_i:
                        l_i = l_i * math.exp(m_i - t) + acc_t(1)
                        m_i = t
                    else:
                        l_i += math.exp(t - m_i)
            if l_i > 0:
                lse[b, h, i] = m_i + math.log(l_i)
            else:
                lse[b, h, i] = NEG_INF

    return BackwardKernels(
        build_preprocess(spec.dtype, DV, T), backward_dkdv_simt, backward_dq_simt, backward_row_lse_simt
    )
