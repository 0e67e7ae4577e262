"""The Hopper backward kernels (sm_90a): FlashAttention-2's backward on warpgroup MMA,
fp16 and bf16, head_dim 64 and 128, dense, no variants (those keep backward_mma).

The math is backward_mma's (P recomputed from the forward's lse, delta = rowsum(dO O)
from the portable preprocess kernel):
    dV = P^T dO,    dP = dO V^T,    dS = P * (dP - delta),
    dK = scale dS^T Q,    dQ = scale dS K,
in two kernels that never exchange a fragment through shared memory and use no
atomics (deterministic by construction; 7 matmuls where a fused dQ takes 5):

dK/dV ("dkdv"): a CTA owns block_n = 64 x warpgroups keys of one (batch, kv head);
warpgroup w owns keys 64w .. 64w + 63, the M of its wgmma. K and V are staged once;
Q and dO tiles of block_m rows, of every query head of the GQA group and every query
tile that sees these keys, stream through shared memory double-buffered by cp.async
(forward_wgmma's issue_tile, its 128-byte-swizzled layout). Per query tile:
    S^T  = K Q^T    ss wgmma, N = block_m  (K and Q K-major)
    dP^T = V dO^T   ss wgmma, N = block_m, in flight while P^T is computed
    P^T  = exp2(S^T scale log2(e) - lse log2(e))  per column (query), lse and delta
           of the tile staged in shared memory (+inf lse for rows past seqlen_q or
           seeing no key: P = 0 there)
    dV  += P^T dO   rs wgmma, N = head_dim, dO MN-major (the staged tile read
           transposed), A = P^T packed from the S^T accumulator (the wgmma
           accumulator layout is the A fragment layout, as in forward_wgmma)
    dS^T = P^T (dP^T - delta), packed while dV's wgmma runs
    dK  += dS^T Q   rs wgmma, N = head_dim, Q MN-major
dK is scaled once at the end; dK and dV are written once as 16 bits.

dQ ("dq"): a CTA owns dq_block_m = 64 x warpgroups query rows of one (batch, query
head); Q and dO are staged once, K and V tiles of dq_block_n keys stream through
shared memory double-buffered. Per key tile:
    S  = Q K^T     ss wgmma, N = dq_block_n
    dP = dO V^T    ss wgmma (V K-major), in flight while P is computed
    dS = P (dP - delta), per row (each thread's 2 rows keep lse and delta in registers)
    dQ += dS K     rs wgmma, N = head_dim, K MN-major.
Causal (bottom-right aligned): the dK/dV kernel starts at the first query tile that
sees its keys and the dQ kernel stops after the last key tile its rows see; only tiles
crossing the diagonal are masked (and, in the dQ kernel, the tile crossing seqlen_k).

Launch contract: backward_mma.launch_backward's for the "dkdv" and "dq" parts (same
arguments, grids and shared_bytes through launch.shared_bytes), so the API runs either
family through one launcher; the variant and cu_seqlens arguments are never read.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda
from numba.cuda import float32, uint32

from ..spec import BackwardMmaSpec
from . import ptx
from . import ptx_wgmma as wg
from .forward_wgmma import K_MAJOR_LBO, make_issue_tile

LOG2E = 1.4426950408889634
HEAD_DIMS = (64, 128)
STAGES = 2
ZERO = np.int32(0)  # make_issue_tile's row offset: dense tensors start at row 0


def _dkdv_layout(spec):
    """Word offsets of the dK/dV kernel's shared buffers: K, V, Q stages, dO stages
    (16-bit swizzled tiles, each 1024-byte aligned), then lse and delta stages."""
    kv = wg.tile_bytes(spec.block_n, spec.head_dim) // 4
    qt = wg.tile_bytes(spec.block_m, spec.head_dim) // 4
    k_off, v_off = 0, kv
    q_off = 2 * kv
    do_off = q_off + STAGES * qt
    lse_off = do_off + STAGES * qt
    delta_off = lse_off + STAGES * spec.block_m
    return k_off, v_off, q_off, do_off, lse_off, delta_off, delta_off + STAGES * spec.block_m


def _dq_layout(spec):
    """Word offsets of the dQ kernel's shared buffers: Q, dO, K stages, V stages."""
    qt = wg.tile_bytes(spec.dq_block_m, spec.head_dim) // 4
    kv = wg.tile_bytes(spec.dq_block_n, spec.head_dim) // 4
    k_off = 2 * qt
    v_off = k_off + STAGES * kv
    return 0, qt, k_off, v_off, v_off + STAGES * kv


def shared_bytes(spec: BackwardMmaSpec) -> int:
    words = _dkdv_layout(spec)[-1] if spec.part == "dkdv" else _dq_layout(spec)[-1]
    return 4 * words + wg.TILE_ALIGN


def build(spec: BackwardMmaSpec):
    """The kernel of spec.part ("dkdv" or "dq"); see the module docstring."""
    assert spec.wgmma and spec.dtype in ("fp16", "bf16") and spec.head_dim in HEAD_DIMS
    assert not spec.variant and not spec.varlen and not spec.dbias and not spec.dq_atomics
    if spec.part == "dkdv":
        return _build_dkdv(spec)
    if spec.part == "dq":
        return _build_dq(spec)
    raise ValueError(f"spec.part: expected dkdv or dq for the wgmma backward; got {spec.part!r}")


@cuda.jit(device=True, inline=True)
def _lse_log2(lse, b, h, i, seqlen_q):
    """lse log2(e) of row i; +inf past seqlen_q or where the row sees no key (lse -inf),
    so that P = exp2(s - it) is 0 there."""
    x = float32(math.inf)
    if i < seqlen_q:
        y = lse[b, h, i]
        if y != -math.inf:
            x = float32(y * LOG2E)
    return x


@cuda.jit(device=True, inline=True)
def _delta_of(delta, b, h, i, seqlen_q):
    x = float32(0)
    if i < seqlen_q:
        x = delta[b, h, i]
    return x


def _make_store(head_dim, pack):
    BLOCKS = head_dim // 8

    @cuda.jit(device=True, inline=True)
    def store(dst, acc, b, h, row, nrows, scale, t):
        """dst[b, row (+ 8), h, :] = scale * the accumulator's two rows, as 16 bits;
        rows at or past nrows are not written."""
        for half in range(2):
            i = row + np.int32(8 * half)
            if i < nrows:
                for j in range(BLOCKS):
                    word = pack(acc[4 * j + 2 * half] * scale, acc[4 * j + 2 * half + 1] * scale)
                    col = j * 8 + 2 * t
                    dst[b, i, h, col] = np.uint16(word & 0xFFFF)
                    dst[b, i, h, col + 1] = np.uint16(word >> 16)

    return store


def _build_dkdv(spec):
    D = spec.head_dim
    BM, BN, T = spec.block_m, spec.block_n, spec.threads
    assert T % 128 == 0 and BN == 64 * (T // 128) and BM % 16 == 0 and 16 <= BM <= 256
    assert T >= BM  # one thread per query row stages lse and delta
    mma_t = wg.wgmma_ss(spec.dtype, BM, False)  # S^T = K Q^T, dP^T = V dO^T
    mma_acc = wg.wgmma_rs(spec.dtype, D, True)  # dV += P^T dO, dK += dS^T Q
    pack = ptx.pack_f16x2 if spec.dtype == "fp16" else ptx.pack_bf16x2
    store = _make_store(D, pack)
    K_OFF, V_OFF, Q_OFF, DO_OFF, LSE_OFF, DELTA_OFF, _ = _dkdv_layout(spec)
    Q_BYTES = wg.tile_bytes(BM, D)
    Q_WORDS = Q_BYTES // 4
    KV_PANEL, Q_PANEL = wg.panel_bytes(BN), wg.panel_bytes(BM)
    WG_ROWS_WORDS = 64 * wg.SWIZZLE_BYTES // 4
    S_REGS, ACC_REGS, P_REGS = BM // 2, D // 2, BM // 4
    K_STEPS, M_STEPS, S_BLOCKS = D // 16, BM // 16, BM // 8
    CAUSAL = spec.causal
    issue_kv = make_issue_tile(D, BN, T)
    issue_q = make_issue_tile(D, BM, T)

    def backward_dkdv_wgmma(q, k, v, do, lse, delta, dk, dv, dq_acc, scale, group,
                            window_left, window_right, softcap, alibi, bias, mask,
                            keep_threshold, keep_scale, seed_lo, seed_hi, dbias, cu_seqlens_q, cu_seqlens_k):
        tid = cuda.threadIdx.x
        lane = tid % 32
        wgi = tid // 128
        g = lane // 4
        t = lane % 4
        n0 = np.int32(cuda.blockIdx.x * BN)
        hk = cuda.blockIdx.y
        b = cuda.blockIdx.z
        seqlen_q = np.int32(q.shape[1])
        seqlen_k = np.int32(k.shape[1])
        shift = seqlen_k - seqlen_q  # key j is hidden from query i when j > i + shift
        my_key = np.int32(n0 + wgi * 64 + (tid // 32) % 4 * 16 + g)  # and my_key + 8
        scale_log2 = float32(scale * LOG2E)

        smem = cuda.shared.array(0, uint32)
        base = wg.shared_align_words(smem)

        m_begin = np.int32(0)
        if CAUSAL:  # the first query tile with a row that sees key n0
            m_begin = max(np.int32(0), n0 - shift) // np.int32(BM) * np.int32(BM)
        m_tiles = max(np.int32(0), (seqlen_q - m_begin + np.int32(BM - 1)) // np.int32(BM))
        if n0 >= seqlen_k:
            m_tiles = np.int32(0)
        total = np.int32(uint32(m_tiles) * uint32(group))  # (query head, query tile) pairs
        h0 = uint32(hk) * uint32(group)

        issue_kv(k, smem, base + K_OFF, b, hk, ZERO, n0, seqlen_k, tid)
        issue_kv(v, smem, base + V_OFF, b, hk, ZERO, n0, seqlen_k, tid)
        if total > 0:
            issue_q(q, smem, base + Q_OFF, b, h0, ZERO, m_begin, seqlen_q, tid)
            issue_q(do, smem, base + DO_OFF, b, h0, ZERO, m_begin, seqlen_q, tid)
            if tid < BM:
                smem[base + LSE_OFF + tid] = ptx.f32_as_u32(_lse_log2(lse, b, h0, m_begin + tid, seqlen_q))
                smem[base + DELTA_OFF + tid] = ptx.f32_as_u32(_delta_of(delta, b, h0, m_begin + tid, seqlen_q))
        ptx.cp_async_commit()

        desc_k = wg.smem_desc(ptx.shared_address(smem, (base + K_OFF + wgi * WG_ROWS_WORDS,)), K_MAJOR_LBO)
        desc_v = wg.smem_desc(ptx.shared_address(smem, (base + V_OFF + wgi * WG_ROWS_WORDS,)), K_MAJOR_LBO)
        desc_q0 = wg.smem_desc(ptx.shared_address(smem, (base + Q_OFF,)), K_MAJOR_LBO)
        desc_do0 = wg.smem_desc(ptx.shared_address(smem, (base + DO_OFF,)), K_MAJOR_LBO)
        desc_qt0 = wg.smem_desc(ptx.shared_address(smem, (base + Q_OFF,)), Q_PANEL)  # Q read MN-major
        desc_dot0 = wg.smem_desc(ptx.shared_address(smem, (base + DO_OFF,)), Q_PANEL)

        dk_acc = cuda.local.array(ACC_REGS, float32)
        dv_acc = cuda.local.array(ACC_REGS, float32)
        for i in range(ACC_REGS):
            dk_acc[i] = 0
            dv_acc[i] = 0
        s = cuda.local.array(S_REGS, float32)
        dp = cuda.local.array(S_REGS, float32)
        p = cuda.local.array(P_REGS, uint32)
        ds = cuda.local.array(P_REGS, uint32)

        for it in range(total):
            stage = it % 2
            # 32-bit division: a 64-bit one is a call in SASS, and a call serializes wgmma
            hi = uint32(it) // uint32(m_tiles)
            m0 = m_begin + np.int32(uint32(it) - hi * uint32(m_tiles)) * np.int32(BM)
            next_lse = float32(0)
            next_delta = float32(0)
            if it + 1 < total:
                h1 = uint32(it + 1) // uint32(m_tiles)
                m1 = m_begin + np.int32(uint32(it + 1) - h1 * uint32(m_tiles)) * np.int32(BM)
                h1 = h0 + h1
                nxt = (1 - stage) * Q_WORDS
                issue_q(q, smem, base + Q_OFF + nxt, b, h1, ZERO, m1, seqlen_q, tid)
                issue_q(do, smem, base + DO_OFF + nxt, b, h1, ZERO, m1, seqlen_q, tid)
                if tid < BM:
                    next_lse = _lse_log2(lse, b, h1, m1 + tid, seqlen_q)
                    next_delta = _delta_of(delta, b, h1, m1 + tid, seqlen_q)
            ptx.cp_async_commit()
            ptx.cp_async_wait_group(1)  # this tile's group (and K, V) has landed
            wg.fence_proxy_async()
            cuda.syncthreads()

            q_bytes = stage * Q_BYTES
            desc_q = wg.desc_add(desc_q0, q_bytes)
            desc_do = wg.desc_add(desc_do0, q_bytes)
            wg.wgmma_fence()
            mma_t(s, desc_k, desc_q, 0)
            for kk in range(1, K_STEPS):
                mma_t(s, wg.desc_add(desc_k, (kk // 4) * KV_PANEL + (kk % 4) * 32),
                      wg.desc_add(desc_q, (kk // 4) * Q_PANEL + (kk % 4) * 32), 1)
            wg.wgmma_commit()
            mma_t(dp, desc_v, desc_do, 0)
            for kk in range(1, K_STEPS):
                mma_t(dp, wg.desc_add(desc_v, (kk // 4) * KV_PANEL + (kk % 4) * 32),
                      wg.desc_add(desc_do, (kk // 4) * Q_PANEL + (kk % 4) * 32), 1)
            wg.wgmma_commit()
            wg.wgmma_wait(1)  # S^T is in; dP^T may still run
            wg.fence_operands(s, S_REGS)

            # P^T: rows are keys (my_key, my_key + 8), columns queries m0 + 8j + 2t + e
            lse_base = base + LSE_OFF + stage * BM
            for j in range(S_BLOCKS):
                for e in range(2):
                    row_lse = ptx.u32_as_f32(smem[lse_base + j * 8 + 2 * t + e])
                    for half in range(2):
                        idx = 4 * j + 2 * half + e
                        s[idx] = ptx.ex2(s[idx] * scale_log2 - row_lse)
            # causal: query column c hides key j when c < j - m0 - shift; only tiles
            # crossing the diagonal have such columns
            if CAUSAL and n0 + np.int32(BN - 1) > m0 + shift:
                for half in range(2):
                    first_seen = my_key + np.int32(8 * half) - m0 - shift
                    for j in range(S_BLOCKS):
                        for e in range(2):
                            if np.int32(j * 8 + 2 * t + e) < first_seen:
                                s[4 * j + 2 * half + e] = float32(0)
            for i in range(P_REGS):
                p[i] = pack(s[2 * i], s[2 * i + 1])

            # dV += P^T dO: k-step kk takes queries 16kk .. 16kk + 15
            wg.wgmma_fence()
            for kk in range(M_STEPS):
                mma_acc(dv_acc, p[4 * kk], p[4 * kk + 1], p[4 * kk + 2], p[4 * kk + 3],
                        wg.desc_add(desc_dot0, q_bytes + kk * 2 * wg.SBO_BYTES), 1)
            wg.wgmma_commit()
            wg.wgmma_wait(1)  # dP^T is in; dV may still run
            wg.fence_operands(dp, S_REGS)

            delta_base = base + DELTA_OFF + stage * BM
            for j in range(S_BLOCKS):
                for e in range(2):
                    row_delta = ptx.u32_as_f32(smem[delta_base + j * 8 + 2 * t + e])
                    for half in range(2):
                        idx = 4 * j + 2 * half + e
                        dp[idx] = s[idx] * (dp[idx] - row_delta)
            for i in range(P_REGS):
                ds[i] = pack(dp[2 * i], dp[2 * i + 1])

            # dK += dS^T Q
            wg.wgmma_fence()
            for kk in range(M_STEPS):
                mma_acc(dk_acc, ds[4 * kk], ds[4 * kk + 1], ds[4 * kk + 2], ds[4 * kk + 3],
                        wg.desc_add(desc_qt0, q_bytes + kk * 2 * wg.SBO_BYTES), 1)
            wg.wgmma_commit()
            wg.wgmma_wait(0)
            wg.fence_operands(dv_acc, ACC_REGS)
            wg.fence_operands(dk_acc, ACC_REGS)
            if it + 1 < total and tid < BM:  # the other stage's last readers passed the last barrier
                other = (1 - stage) * BM
                smem[base + LSE_OFF + other + tid] = ptx.f32_as_u32(next_lse)
                smem[base + DELTA_OFF + other + tid] = ptx.f32_as_u32(next_delta)
            cuda.syncthreads()  # everyone is done with this stage before it is refilled

        ptx.cp_async_wait_group(0)
        store(dk, dk_acc, b, hk, my_key, seqlen_k, float32(scale), t)
        store(dv, dv_acc, b, hk, my_key, seqlen_k, float32(1), t)

    bounds = {} if ptx.SIMULATED else {"launch_bounds": T}
    return cuda.jit(backward_dkdv_wgmma, fastmath={"contract"}, **bounds)


def _build_dq(spec):
    D = spec.head_dim
    BM, BN, T = spec.dq_block_m, spec.dq_block_n, spec.dq_threads
    assert T % 128 == 0 and BM == 64 * (T // 128) and BN % 16 == 0 and 16 <= BN <= 256
    mma_s = wg.wgmma_ss(spec.dtype, BN, False)  # S = Q K^T, dP = dO V^T (K and V K-major)
    mma_dq = wg.wgmma_rs(spec.dtype, D, True)  # dQ += dS K: K read MN-major
    pack = ptx.pack_f16x2 if spec.dtype == "fp16" else ptx.pack_bf16x2
    store = _make_store(D, pack)
    Q_OFF, DO_OFF, K_OFF, V_OFF, _ = _dq_layout(spec)
    KV_BYTES = wg.tile_bytes(BN, D)
    KV_WORDS = KV_BYTES // 4
    Q_PANEL, KV_PANEL = wg.panel_bytes(BM), wg.panel_bytes(BN)
    WG_ROWS_WORDS = 64 * wg.SWIZZLE_BYTES // 4
    S_REGS, ACC_REGS, P_REGS = BN // 2, D // 2, BN // 4
    K_STEPS, N_STEPS, S_BLOCKS = D // 16, BN // 16, BN // 8
    CAUSAL = spec.causal
    issue_q = make_issue_tile(D, BM, T)
    issue_kv = make_issue_tile(D, BN, T)

    def backward_dq_wgmma(q, k, v, do, lse, delta, dq, scale, group,
                          window_left, window_right, softcap, alibi, bias, mask,
                          keep_threshold, keep_scale, seed_lo, seed_hi, cu_seqlens_q, cu_seqlens_k):
        tid = cuda.threadIdx.x
        lane = tid % 32
        wgi = tid // 128
        g = lane // 4
        t = lane % 4
        m_block = cuda.blockIdx.x
        if CAUSAL:  # the longest rows first
            m_block = cuda.gridDim.x - 1 - m_block
        m0 = np.int32(m_block * BM)
        h = cuda.blockIdx.y
        hk = uint32(h) // uint32(group)
        b = cuda.blockIdx.z
        seqlen_q = np.int32(q.shape[1])
        seqlen_k = np.int32(k.shape[1])
        shift = seqlen_k - seqlen_q
        my_row = np.int32(m0 + wgi * 64 + (tid // 32) % 4 * 16 + g)  # and my_row + 8
        scale_log2 = float32(scale * LOG2E)
        row_lse = cuda.local.array(2, float32)
        row_delta = cuda.local.array(2, float32)
        for half in range(2):
            row_lse[half] = _lse_log2(lse, b, h, my_row + np.int32(8 * half), seqlen_q)
            row_delta[half] = _delta_of(delta, b, h, my_row + np.int32(8 * half), seqlen_q)

        smem = cuda.shared.array(0, uint32)
        base = wg.shared_align_words(smem)

        key_end = seqlen_k
        if CAUSAL:
            key_end = max(np.int32(0), min(seqlen_k, m0 + np.int32(BM) + shift))
        n_tiles = (key_end + np.int32(BN - 1)) // np.int32(BN)

        issue_q(q, smem, base + Q_OFF, b, h, ZERO, m0, seqlen_q, tid)
        issue_q(do, smem, base + DO_OFF, b, h, ZERO, m0, seqlen_q, tid)
        if n_tiles > 0:
            issue_kv(k, smem, base + K_OFF, b, hk, ZERO, np.int32(0), seqlen_k, tid)
            issue_kv(v, smem, base + V_OFF, b, hk, ZERO, np.int32(0), seqlen_k, tid)
        ptx.cp_async_commit()

        desc_q = wg.smem_desc(ptx.shared_address(smem, (base + Q_OFF + wgi * WG_ROWS_WORDS,)), K_MAJOR_LBO)
        desc_do = wg.smem_desc(ptx.shared_address(smem, (base + DO_OFF + wgi * WG_ROWS_WORDS,)), K_MAJOR_LBO)
        desc_k0 = wg.smem_desc(ptx.shared_address(smem, (base + K_OFF,)), K_MAJOR_LBO)
        desc_v0 = wg.smem_desc(ptx.shared_address(smem, (base + V_OFF,)), K_MAJOR_LBO)
        desc_kt0 = wg.smem_desc(ptx.shared_address(smem, (base + K_OFF,)), KV_PANEL)  # K read MN-major

        dq_acc = cuda.local.array(ACC_REGS, float32)
        for i in range(ACC_REGS):
            dq_acc[i] = 0
        s = cuda.local.array(S_REGS, float32)
        dp = cuda.local.array(S_REGS, float32)
        ds = cuda.local.array(P_REGS, uint32)

        for it in range(n_tiles):
            stage = it % 2
            n0 = np.int32(it * BN)
            if it + 1 < n_tiles:
                nxt = (1 - stage) * KV_WORDS
                issue_kv(k, smem, base + K_OFF + nxt, b, hk, ZERO, n0 + np.int32(BN), seqlen_k, tid)
                issue_kv(v, smem, base + V_OFF + nxt, b, hk, ZERO, n0 + np.int32(BN), seqlen_k, tid)
            ptx.cp_async_commit()
            ptx.cp_async_wait_group(1)
            wg.fence_proxy_async()
            cuda.syncthreads()

            kv_bytes = stage * KV_BYTES
            desc_k = wg.desc_add(desc_k0, kv_bytes)
            desc_v = wg.desc_add(desc_v0, kv_bytes)
            wg.wgmma_fence()
            mma_s(s, desc_q, desc_k, 0)
            for kk in range(1, K_STEPS):
                mma_s(s, wg.desc_add(desc_q, (kk // 4) * Q_PANEL + (kk % 4) * 32),
                      wg.desc_add(desc_k, (kk // 4) * KV_PANEL + (kk % 4) * 32), 1)
            wg.wgmma_commit()
            mma_s(dp, desc_do, desc_v, 0)
            for kk in range(1, K_STEPS):
                mma_s(dp, wg.desc_add(desc_do, (kk // 4) * Q_PANEL + (kk % 4) * 32),
                      wg.desc_add(desc_v, (kk // 4) * KV_PANEL + (kk % 4) * 32), 1)
            wg.wgmma_commit()
            wg.wgmma_wait(1)
            wg.fence_operands(s, S_REGS)

            needs_mask = n0 + np.int32(BN) > seqlen_k
            if CAUSAL:
                needs_mask = needs_mask or (n0 + np.int32(BN - 1) > m0 + shift)
            for half in range(2):
                visible = seqlen_k - n0  # keys of this tile the row sees: [0, visible)
                if CAUSAL:
                    visible = min(visible, my_row + np.int32(8 * half) + shift - n0 + np.int32(1))
                for j in range(S_BLOCKS):
                    for e in range(2):
                        idx = 4 * j + 2 * half + e
                        pv = ptx.ex2(s[idx] * scale_log2 - row_lse[half])
                        if needs_mask:
                            if np.int32(j * 8 + 2 * t + e) >= visible:
                                pv = float32(0)
                        s[idx] = pv
            wg.wgmma_wait(0)
            wg.fence_operands(dp, S_REGS)
            for half in range(2):
                for j in range(S_BLOCKS):
                    for e in range(2):
                        idx = 4 * j + 2 * half + e
                        dp[idx] = s[idx] * (dp[idx] - row_delta[half])
            for i in range(P_REGS):
                ds[i] = pack(dp[2 * i], dp[2 * i + 1])

            wg.wgmma_fence()
            for kk in range(N_STEPS):
                mma_dq(dq_acc, ds[4 * kk], ds[4 * kk + 1], ds[4 * kk + 2], ds[4 * kk + 3],
                       wg.desc_add(desc_kt0, kv_bytes + kk * 2 * wg.SBO_BYTES), 1)
            wg.wgmma_commit()
            wg.wgmma_wait(0)
            wg.fence_operands(dq_acc, ACC_REGS)
            cuda.syncthreads()

        ptx.cp_async_wait_group(0)
        store(dq, dq_acc, b, h, my_row, seqlen_q, float32(scale), t)

    bounds = {} if ptx.SIMULATED else {"launch_bounds": T}
    return cuda.jit(backward_dq_wgmma, fastmath={"contract"}, **bounds)
