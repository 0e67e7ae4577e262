"""Split-KV decoding (flash-decoding): attention of a few query rows over a long KV
cache, contiguous or paged, written for memory bandwidth.

Work partition: a CTA owns one (split, kv head, batch) and the query rows of every
query head sharing that kv head (group x seqlen_q rows, or a chunk of them), so each
key and value row is read from memory once for all of them. Inside the CTA a key row
belongs to a "key group" of `lanes` consecutive lanes; lane lg of the group owns
`ept` elements of the row, read as 16-byte vectors (vec elements) at columns
(v * lanes + lg) * vec, so one load instruction of a warp reads whole contiguous
rows. Warps and key groups stride along the keys; each thread issues the loads of
`unroll` keys (K and V) of the next step before the math of this one (a two-stage
software pipeline in registers), to keep many bytes in flight. A paged cache costs
one block-table read per key group and key; the lanes of a key group (and the key
groups of a warp, for blocks longer than a warp's keys) read the same entry, so a
warp makes one table request per block it touches.

Per thread, in registers: its slice of q (scale folded in) for every row, the
output accumulator slice acc, and per row the running max m_i and sum l_i of
exp(s - m_i) over the keys its key group saw (FlashAttention-2's online softmax,
kernels/softmax.py). A score is the key group's partial dot products summed with
butterfly shuffles. At the end the key groups of a warp merge with shuffles, the
warps merge through shared memory (rows padded by one word: conflict-free), and the
CTA writes either the final output (one split) or a partial output normalized by
its own sum plus its lse, for decode_combine to merge by lse.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, uint32

from .. import tuning
from ..spec import DecodeSpec
from . import ptx
from .convert import bf16_bits_to_f32
from .forward_simt import _converters
from .softmax import finish_row, log_sum_exp, rescale

_ITEMSIZE = {"fp16": 2, "bf16": 2, "fp32": 4, "fp64": 8}


def geometry(spec: DecodeSpec):
    """(vec, ept, lanes) of a spec (tuning.decode_geometry)."""
    return tuning.decode_geometry(_ITEMSIZE[spec.dtype], spec.head_dim, spec.head_dim_v)


def keys_per_step(spec: DecodeSpec) -> int:
    """Keys the whole CTA covers in one step of its loop."""
    _, _, lanes = geometry(spec)
    return (spec.threads // 32) * (32 // lanes) * spec.unroll


def static_shared_bytes(spec: DecodeSpec) -> int:
    """Shared memory of the cross-warp merge (static arrays)."""
    _, ept, lanes = geometry(spec)
    acc_bytes = 8 if spec.dtype == "fp64" else 4
    return (spec.threads // 32) * spec.rows * (lanes * (ept + 1) + 2) * acc_bytes


def _unpackers(spec: DecodeSpec, ept: int):
    """unpack(buf, u, f): key u's elements from the load buffer into float f[ept]."""
    if not spec.vectorized:

        @cuda.jit(device=True, inline=True)
        def unpack_scalar(buf, u, f):
            for e in range(ept):
                f[e] = buf[u, e]

        return unpack_scalar
    words = ept * _ITEMSIZE[spec.dtype] // 4
    if spec.dtype == "fp16":

        @cuda.jit(device=True, inline=True)
        def unpack_f16(buf, u, f):
            for w in range(words):
                lo, hi = ptx.f16x2_to_f32(buf[u, w])
                f[2 * w] = lo
                f[2 * w + 1] = hi

        return unpack_f16
    if spec.dtype == "bf16":

        @cuda.jit(device=True, inline=True)
        def unpack_bf16(buf, u, f):
            for w in range(words):
                word = buf[u, w]
                f[2 * w] = bf16_bits_to_f32(word & uint32(0xFFFF))
                f[2 * w + 1] = ptx.u32_as_f32(word & uint32(0xFFFF0000))

        return unpack_bf16
    assert spec.dtype == "fp32"

    @cuda.jit(device=True, inline=True)
    def unpack_f32(buf, u, f):
        for w in range(words):
            f[w] = ptx.u32_as_f32(buf[u, w])

    return unpack_f32


def build(spec: DecodeSpec):
    """Compile-time specialized kernel; launch with grid (splits, heads_kv *
    row_chunks, batch) and spec.threads threads.

    Arguments: q (B, Nq, Hq, D); k_cache, v_cache (B, capacity, Hkv, D / Dv), or paged
    (blocks, block_size, Hkv, D / Dv), as uint16 views for 16-bit data when
    vectorized; block_table int32 (B, max_blocks) (ignored when contiguous);
    seqlens int32 (B,) keys already in the cache, clamped into [0, capacity - n_new]
    (capacity: the cache's second axis, or max_blocks x block_size when paged), so no
    length reads outside the cache; n_new (keys appended after them: sequence b has
    clamped seqlens[b] + n_new keys); then with spec.split: part_out (splits,
    B, Hq, Nq, Dv) and part_lse (splits, B, Hq, Nq) of the accumulator dtype; else
    out (B, Nq, Hq, Dv) and lse float32 (B, Hq, Nq) (ignored unless with_lse);
    scale; group = Hq // Hkv; row_chunks = cdiv(group * Nq, spec.rows).
    """
    load, store, acc_t = _converters(spec.dtype)
    vec, ept, lanes = geometry(spec)
    assert lanes <= 32 and ept % vec == 0
    D, DV, ROWS, T, UNROLL = spec.head_dim, spec.head_dim_v, spec.rows, spec.threads, spec.unroll
    W = T // 32  # warps
    KPW = 32 // lanes  # key groups per warp
    TILE = W * KPW * UNROLL  # keys per loop step of the CTA
    NV = ept // vec  # 16-byte vectors per thread per row
    SLOT = ept + 1  # padded per-lane stride of the shared merge buffer
    DVP = lanes * SLOT
    CAUSAL, SPLIT, WITH_LSE = spec.causal, spec.split, spec.with_lse
    PAGED, BS = spec.block_size > 0, max(spec.block_size, 1)
    VECTORIZED = spec.vectorized
    BUF_W = 4 * NV if VECTORIZED else ept  # load-buffer entries per key
    buf_t = uint32 if VECTORIZED else acc_t
    NEG_INF = -math.inf
    unpack = _unpackers(spec, ept)
    if VECTORIZED:
        assert D % vec == 0 and DV % vec == 0 and spec.dtype != "fp64"

    @cuda.jit(device=True, inline=True)
    def locate(block_table, b, j):
        """(first, second) index of key j of sequence b in the cache."""
        if PAGED:
            return block_table[b, j // BS], j % BS
        return b, j

    @cuda.jit(device=True, inline=True)
    def load_row(cache, i0, i1, hk, width, lg, valid, buf, u):
        """This thread's slice of cache row (i0, i1, hk) into buf[u] (zeros if not valid)."""
        if VECTORIZED:
            for v in range(NV):
                c = (v * lanes + lg) * vec
                w0 = w1 = w2 = w3 = uint32(0)
                if valid and c < width:
                    w0, w1, w2, w3 = ptx.ld_global_nc_v4(ptx.global_address(cache, (i0, i1, hk, c)))
                buf[u, 4 * v] = w0
                buf[u, 4 * v + 1] = w1
                buf[u, 4 * v + 2] = w2
                buf[u, 4 * v + 3] = w3
        else:
            for v in range(NV):
                for t in range(vec):
                    c = (v * lanes + lg) * vec + t
                    x = acc_t(0)
                    if valid and c < width:
                        x = load(cache[i0, i1, hk, c])
                    buf[u, v * vec + t] = x

    @cuda.jit(device=True, inline=True)
    def group_sum(s):
        """Sum over the `lanes` lanes of a key group (butterfly: every lane gets it)."""
        off = lanes // 2
        while off > 0:
            s += ptx.shfl_xor(s, off)
            off //= 2
        return s

    @cuda.jit(device=True, inline=True)
    def issue(k_cache, v_cache, block_table, b, hk, base, j_end, warp, kg, lg, k_buf, v_buf):
        """Start the loads of the keys of the step at ``base`` (zeros past j_end)."""
        for u in range(UNROLL):
            j = base + (u * W + warp) * KPW + kg
            valid = j < j_end
            i0 = i1 = 0  # no load happens for a key past j_end (nor a table read)
            if valid:
                i0, i1 = locate(block_table, b, j)
            load_row(k_cache, i0, i1, hk, D, lg, valid, k_buf, u)
            load_row(v_cache, i0, i1, hk, DV, lg, valid, v_buf, u)

    @cuda.jit(device=True, inline=True)
    def consume(base, j_end, warp, kg, k_buf, v_buf, q_r, acc, m_i, l_i, last_key, s, f):
        """Scores, online softmax and P V for the step at ``base``."""
        for u in range(UNROLL):  # S = scale * q K^T, masked
            j = base + (u * W + warp) * KPW + kg
            unpack(k_buf, u, f)
            for r in range(ROWS):
                dot = acc_t(0)
                for e in range(ept):
                    dot += q_r[r, e] * f[e]
                dot = group_sum(dot)
                s[r, u] = dot if (j < j_end and j <= last_key[r]) else NEG_INF
        for r in range(ROWS):  # online softmax: m_i, l_i, alpha (FlashAttention-2, Alg. 1)
            m_new = m_i[r]
            for u in range(UNROLL):
                m_new = max(m_new, s[r, u])
            alpha = rescale(m_i[r], m_new)
            row_sum = acc_t(0)
            for u in range(UNROLL):
                p = acc_t(0)
                if s[r, u] != NEG_INF:
                    p = math.exp(s[r, u] - m_new)
                s[r, u] = p
                row_sum += p
            m_i[r] = m_new
            l_i[r] = l_i[r] * alpha + row_sum
            for e in range(ept):
                acc[r, e] *= alpha
        for u in range(UNROLL):  # acc = alpha * acc + P V
            unpack(v_buf, u, f)
            for r in range(ROWS):
                p = s[r, u]
                for e in range(ept):
                    acc[r, e] += p * f[e]

    def decode(q, k_cache, v_cache, block_table, seqlens, n_new, out, lse, scale, group, row_chunks):
        tid = cuda.threadIdx.x
        lane = tid % 32
        warp = tid // 32
        lg = lane % lanes  # lane within the key group: owns columns (v*lanes + lg)*vec + t
        kg = lane // lanes  # key group within the warp
        split = cuda.blockIdx.x
        n_splits = cuda.gridDim.x
        hk = cuda.blockIdx.y // row_chunks
        chunk = cuda.blockIdx.y % row_chunks
        b = cuda.blockIdx.z
        seqlen_q = q.shape[1]
        rows_total = group * seqlen_q
        capacity = block_table.shape[1] * BS if PAGED else k_cache.shape[1]
        seqlen_k = min(max(seqlens[b], 0), capacity - n_new) + n_new

        q_r = cuda.local.array((ROWS, ept), acc_t)
        acc = cuda.local.array((ROWS, ept), acc_t)
        m_i = cuda.local.array(ROWS, acc_t)
        l_i = cuda.local.array(ROWS, acc_t)
        last_key = cuda.local.array(ROWS, np.int32)  # last key each row may see
        s = cuda.local.array((ROWS, UNROLL), acc_t)
        f = cuda.local.array(ept, acc_t)

        for r in range(ROWS):
            row = chunk * ROWS + r  # rows run head-major: row = (h - hk*group) * Nq + i
            hq = hk * group + row // seqlen_q
            i = row % seqlen_q
            if row < rows_total:
                last_key[r] = i + seqlen_k - seqlen_q if CAUSAL else seqlen_k - 1
            else:
                last_key[r] = -1
            for v in range(NV):
                for t in range(vec):
                    c = (v * lanes + lg) * vec + t
                    x = acc_t(0)
                    if row < rows_total and c < D:
                        x = load(q[b, i, hq, c]) * acc_t(scale)
                    q_r[r, v * vec + t] = x
                    acc[r, v * vec + t] = 0
            m_i[r] = NEG_INF
            l_i[r] = 0

        # this split's keys: a multiple of TILE each, the last split shorter
        per_split = (seqlen_k + n_splits - 1) // n_splits
        per_split = (per_split + TILE - 1) // TILE * TILE
        j_begin = split * per_split
        j_end = min(seqlen_k, j_begin + per_split)

        # software pipeline: the loads of the next step are in flight while this
        # step's math runs (two buffers, the loop unrolled by two to swap them)
        k_a = cuda.local.array((UNROLL, BUF_W), buf_t)
        v_a = cuda.local.array((UNROLL, BUF_W), buf_t)
        k_b = cuda.local.array((UNROLL, BUF_W), buf_t)
        v_b = cuda.local.array((UNROLL, BUF_W), buf_t)
        base = j_begin
        issue(k_cache, v_cache, block_table, b, hk, base, j_end, warp, kg, lg, k_a, v_a)
        while base < j_end:
            issue(k_cache, v_cache, block_table, b, hk, base + TILE, j_end, warp, kg, lg, k_b, v_b)
            consume(base, j_end, warp, kg, k_a, v_a, q_r, acc, m_i, l_i, last_key, s, f)
            base += TILE
            if base < j_end:
                issue(k_cache, v_cache, block_table, b, hk, base + TILE, j_end, warp, kg, lg, k_a, v_a)
                consume(base, j_end, warp, kg, k_b, v_b, q_r, acc, m_i, l_i, last_key, s, f)
                base += TILE

        # merge the key groups of this warp (same columns, different keys)
        off = lanes
        while off < 32:
            for r in range(ROWS):
                m_other = ptx.shfl_xor(m_i[r], off)
                l_other = ptx.shfl_xor(l_i[r], off)
                m_new = max(m_i[r], m_other)
                mine = rescale(m_i[r], m_new)
                theirs = rescale(m_other, m_new)
                l_i[r] = l_i[r] * mine + l_other * theirs
                m_i[r] = m_new
                for e in range(ept):
                    acc[r, e] = acc[r, e] * mine + ptx.shfl_xor(acc[r, e], off) * theirs
            off *= 2

        # merge the warps through shared memory
        acc_s = cuda.shared.array((W, ROWS, DVP), acc_t)
        m_s = cuda.shared.array((W, ROWS), acc_t)
        l_s = cuda.shared.array((W, ROWS), acc_t)
        if kg == 0:
            for r in range(ROWS):
                for e in range(ept):
                    acc_s[warp, r, lg * SLOT + e] = acc[r, e]
                if lg == 0:
                    m_s[warp, r] = m_i[r]
                    l_s[warp, r] = l_i[r]
        cuda.syncthreads()
        for idx in range(tid, ROWS * DV, T):
            r = idx // DV
            d = idx - r * DV
            row = chunk * ROWS + r
            if row < rows_total:
                hq = hk * group + row // seqlen_q
                i = row % seqlen_q
                col = d // vec
                slot = (col % lanes) * SLOT + (col // lanes) * vec + d % vec
                m_tot = m_s[0, r]
                for w in range(1, W):
                    m_tot = max(m_tot, m_s[w, r])
                l_tot = acc_t(0)
                o = acc_t(0)
                for w in range(W):
                    factor = rescale(m_s[w, r], m_tot)
                    l_tot += l_s[w, r] * factor
                    o += acc_s[w, r, slot] * factor
                if SPLIT:
                    out[split, b, hq, i, d] = finish_row(o, l_tot)
                    if d == 0:
                        lse[split, b, hq, i] = log_sum_exp(m_tot, l_tot)
                else:
                    out[b, i, hq, d] = store(finish_row(o, l_tot))
                    if WITH_LSE and d == 0:
                        lse[b, hq, i] = log_sum_exp(m_tot, l_tot)

    return cuda.jit(decode)

