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
  dkdv(q, k, v, do, lse, delta, dq, dk, dv, scale, group)     grid (cdiv(Nk, block_n), Hkv, B)
  dq(q, k, v, do, lse, delta, dq, dk, dv, scale, group)       grid (cdiv(Nq, block_m), Hq, B)
with (batch, seqlen, heads, head_dim) views of any strides (unit-stride last axis):
q (B, Nq, Hq, D), k (B, Nk, Hkv, D), v (B, Nk, Hkv, Dv), do and out (B, Nq, Hq, Dv),
lse and delta (B, Hq, Nq) in accumulation precision (lse -inf for rows that see no
key), dq (B, Nq, Hq, D), dk (B, Nk, Hkv, D), dv (B, Nk, Hkv, Dv), scale in accumulation
precision, group = Hq // Hkv. bfloat16 arrives as uint16 bits. dkdv writes only dk
and dv, dq only dq; each writes every element of its outputs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from numba import cuda

from ..spec import BackwardSpec
from ..tuning import _odd
from .forward_simt import _converters
from .softmax import is_visible, last_visible_key_end


class BackwardKernels(NamedTuple):
    """The kernels of one backward specialization (contract in the module docstring)."""

    preprocess: object
    dkdv: object
    dq: object


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

    @cuda.jit
    def backward_dkdv_simt(q, k, v, do, lse, delta, dq, dk, dv, scale, group):
        tid = cuda.threadIdx.x
        n0 = cuda.blockIdx.x * BN
        hk = cuda.blockIdx.y
        b = cuda.blockIdx.z
        seqlen_q = q.shape[1]
        seqlen_k = k.shape[1]

        k_s = cuda.shared.array((BN, K_W), acc_t)
        v_s = cuda.shared.array((BN, V_W), acc_t)
        q_s = cuda.shared.array((BM, D), acc_t)
        do_s = cuda.shared.array((BM, DV), acc_t)
        p_s = cuda.shared.array((BM, BN), acc_t)  # P, then dS in place
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
        # query tiles before that one are fully masked and skipped.
        m_begin = 0
        if CAUSAL:
            m_begin = (max(0, n0 - (seqlen_k - seqlen_q)) // BM) * BM
        for g in range(group):
            h = hk * group + g
            for m0 in range(m_begin, seqlen_q, BM):
                cuda.syncthreads()  # the previous query tile is consumed
                load_rows(q, b, h, m0, seqlen_q, D, q_s, BM, tid)
                load_rows(do, b, h, m0, seqlen_q, DV, do_s, BM, tid)
                load_row_stats(lse, delta, b, h, m0, seqlen_q, lse_s, delta_s, tid)
                cuda.syncthreads()
                for e in range(tid, BM * BN, T):
                    r = e // BN
                    c = e - r * BN
                    p_s[r, c] = probability(q_s, k_s, r, c, m0 + r, n0 + c, lse_s[r], seqlen_q, seqlen_k, scale)
                cuda.syncthreads()
                # dV += P^T dO (Alg. 2 line 12). The accumulator loop is innermost: its
                # fixed trip count unrolls, so dv_acc and dk_acc stay in registers.
                for r in range(BM):
                    for t in range(DV_PER_THREAD):
                        e = tid + t * T
                        if e < BN * DV:
                            j = e // DV
                            dv_acc[t] += p_s[r, j] * do_s[r, e - j * DV]
                cuda.syncthreads()  # P is read; dS overwrites it
                for e in range(tid, BM * BN, T):
                    r = e // BN
                    c = e - r * BN
                    p_s[r, c] = score_gradient(do_s, v_s, r, c, p_s[r, c], delta_s[r])
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
    def backward_dq_simt(q, k, v, do, lse, delta, dq, dk, dv, scale, group):
        tid = cuda.threadIdx.x
        row0 = cuda.blockIdx.x * BM
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        hk = h // group
        seqlen_q = q.shape[1]
        seqlen_k = k.shape[1]

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

        key_end = last_visible_key_end(row0 + BM, seqlen_q, seqlen_k, CAUSAL)
        for n0 in range(0, key_end, BN):
            cuda.syncthreads()  # the previous K tile and dS are consumed
            load_rows(k, b, hk, n0, seqlen_k, D, k_s, BN, tid)
            load_rows(v, b, hk, n0, seqlen_k, DV, v_s, BN, tid)
            cuda.syncthreads()
            for e in range(tid, BM * BN, T):
                r = e // BN
                c = e - r * BN
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

    return BackwardKernels(build_preprocess(spec.dtype, DV, T), backward_dkdv_simt, backward_dq_simt)
