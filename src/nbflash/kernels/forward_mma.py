"""The tensor-core forward kernel (FlashAttention-2) for float16 and bfloat16.

Work partition: a CTA owns block_m = 16 * warps query rows of one (batch, query head);
each warp owns 16 of them. K and V tiles of block_n keys stream through shared memory,
double-buffered with cp.async so the next tile's loads overlap this tile's math.
S = Q K^T and P stay in registers (the mma C fragment of S is, packed to 16 bits,
the A fragment of P for P V); the online softmax runs in the exp2 domain with
scale * log2(e) folded in; the output is normalized once at the end.

Per thread, in registers (ptx.py gives the fragment layouts): the Q A-fragments
(q_frag, head_dim / 4 words), the output accumulator (acc, head_dim / 2 floats, 4 per
8-column block), the scores of one tile (s, block_n / 2 floats), and the running max
m_i and sum l_i of its two rows (g and g + 8 of its warp's 16).
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda
from numba.cuda import float32, uint32

from ..spec import ForwardSpec
from . import ptx

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
PAD_WORDS = 4  # 16 bytes per shared row: fragment loads and ldmatrix rows hit distinct banks
HEAD_DIMS = (32, 64, 96, 128, 192, 256)


def shared_bytes(spec: ForwardSpec) -> int:
    words = spec.head_dim // 2 + PAD_WORDS
    return 2 * spec.stages * spec.block_n * words * 4


def build(spec: ForwardSpec):
    """Compile-time specialized kernel; launch with grid (cdiv(seqlen_q, block_m),
    heads_q, batch) and spec.threads threads.

    Arguments as the portable kernel's, with q, k, v, out as uint16 views of the
    16-bit data: q (B, Nq, Hq, D), k (B, Nk, Hkv, D), v (B, Nk, Hkv, D), out
    (B, Nq, Hq, D), lse (B, Hq, Nq) float32, scale (float32), group = Hq // Hkv.
    Requires 16-byte aligned rows of k and v (checked by the caller).
    """
    assert spec.kernel == "mma" and spec.dtype in ("fp16", "bf16")
    assert spec.head_dim == spec.head_dim_v and spec.head_dim in HEAD_DIMS
    mma = ptx.mma_f16 if spec.dtype == "fp16" else ptx.mma_bf16
    pack = ptx.pack_f16x2 if spec.dtype == "fp16" else ptx.pack_bf16x2
    D = spec.head_dim
    BM, BN, T, STAGES = spec.block_m, spec.block_n, spec.threads, spec.stages
    assert BM == 16 * (T // 32) and BN % 16 == 0 and STAGES == 2
    ROW_WORDS = D // 2 + PAD_WORDS
    CHUNKS = D // 8  # 16-byte chunks per row
    D_BLOCKS = D // 8  # 8-column output blocks
    K_STEPS = D // 16  # k-steps of S = Q K^T
    N_BLOCKS = BN // 8  # 8-key blocks of S
    PV_STEPS = BN // 16  # k-steps of P V
    Q_REGS, ACC_REGS, S_REGS = K_STEPS * 4, D_BLOCKS * 4, N_BLOCKS * 4
    CAUSAL, WITH_LSE = spec.causal, spec.with_lse
    NEG_INF = -math.inf

    @cuda.jit(device=True, inline=True)
    def issue_tile(src, smem, stage, b, hk, n0, seqlen_k, tid):
        """cp.async one block_n x D tile (rows past seqlen_k zero-filled)."""
        for e in range(tid, BN * CHUNKS, T):
            r = e // CHUNKS
            c = e - r * CHUNKS
            j = n0 + r
            nbytes = 16 if j < seqlen_k else 0
            j = min(j, seqlen_k - 1)
            ptx.cp_async_16(
                ptx.shared_address(smem, (stage, r, c * 4)),
                ptx.global_address(src, (b, j, hk, c * 8)),
                nbytes,
            )

    @cuda.jit(device=True, inline=True)
    def q_word(q, b, i, h, c, seqlen_q):
        if i < seqlen_q:
            return uint32(q[b, i, h, c]) | (uint32(q[b, i, h, c + 1]) << uint32(16))
        return uint32(0)

    @cuda.jit
    def forward_mma(q, k, v, out, lse, scale, group):
        tid = cuda.threadIdx.x
        lane = tid % 32
        warp = tid // 32
        g = lane // 4
        t = lane % 4
        row0 = cuda.blockIdx.x * BM
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        hk = h // group
        seqlen_q = q.shape[1]
        seqlen_k = k.shape[1]
        row_w = row0 + warp * 16  # this warp's first row
        scale_log2 = float32(scale * LOG2E)

        k_s = cuda.shared.array((STAGES, BN, ROW_WORDS), uint32)
        v_s = cuda.shared.array((STAGES, BN, ROW_WORDS), uint32)

        key_end = seqlen_k
        if CAUSAL:
            key_end = max(0, min(seqlen_k, row0 + BM + seqlen_k - seqlen_q))
        n_tiles = (key_end + BN - 1) // BN
        if n_tiles > 0:
            issue_tile(k, k_s, 0, b, hk, 0, seqlen_k, tid)
            issue_tile(v, v_s, 0, b, hk, 0, seqlen_k, tid)
        ptx.cp_async_commit()

        q_frag = cuda.local.array(Q_REGS, uint32)
        for kk in range(K_STEPS):
            col = kk * 16 + 2 * t
            q_frag[kk * 4 + 0] = q_word(q, b, row_w + g, h, col, seqlen_q)
            q_frag[kk * 4 + 1] = q_word(q, b, row_w + g + 8, h, col, seqlen_q)
            q_frag[kk * 4 + 2] = q_word(q, b, row_w + g, h, col + 8, seqlen_q)
            q_frag[kk * 4 + 3] = q_word(q, b, row_w + g + 8, h, col + 8, seqlen_q)
        acc = cuda.local.array(ACC_REGS, float32)
        for i in range(ACC_REGS):
            acc[i] = 0
        s = cuda.local.array(S_REGS, float32)
        m_i = cuda.local.array(2, float32)
        l_i = cuda.local.array(2, float32)
        for half in range(2):
            m_i[half] = NEG_INF
            l_i[half] = 0

        for it in range(n_tiles):
            stage = it % 2
            n0 = it * BN
            if it + 1 < n_tiles:
                issue_tile(k, k_s, 1 - stage, b, hk, n0 + BN, seqlen_k, tid)
                issue_tile(v, v_s, 1 - stage, b, hk, n0 + BN, seqlen_k, tid)
            ptx.cp_async_commit()
            ptx.cp_async_wait_group(1)  # this tile's group has landed
            cuda.syncthreads()

            # S = Q K^T  (16 x BN per warp)
            for nb in range(N_BLOCKS):
                c0 = float32(0)
                c1 = float32(0)
                c2 = float32(0)
                c3 = float32(0)
                for kk in range(K_STEPS):
                    b0 = k_s[stage, nb * 8 + g, kk * 8 + t]
                    b1 = k_s[stage, nb * 8 + g, kk * 8 + 4 + t]
                    c0, c1, c2, c3 = mma(
                        q_frag[kk * 4], q_frag[kk * 4 + 1], q_frag[kk * 4 + 2], q_frag[kk * 4 + 3],
                        b0, b1, c0, c1, c2, c3,
                    )
                s[nb * 4 + 0] = c0
                s[nb * 4 + 1] = c1
                s[nb * 4 + 2] = c2
                s[nb * 4 + 3] = c3

            # mask only tiles that cross seqlen_k or the causal diagonal
            needs_mask = n0 + BN > seqlen_k
            if CAUSAL:
                needs_mask = needs_mask or (n0 + BN - 1 > row0 + seqlen_k - seqlen_q)
            if needs_mask:
                for nb in range(N_BLOCKS):
                    for r in range(4):
                        j = n0 + nb * 8 + 2 * t + (r % 2)
                        i = row_w + g + 8 * (r // 2)
                        hidden = j >= seqlen_k
                        if CAUSAL:
                            hidden = hidden or j > i + seqlen_k - seqlen_q
                        if hidden:
                            s[nb * 4 + r] = NEG_INF

            # online softmax, exp2 domain (FlashAttention-2, Algorithm 1, lines 8-10)
            for half in range(2):
                row_max = float32(NEG_INF)
                for nb in range(N_BLOCKS):
                    row_max = max(row_max, max(s[nb * 4 + 2 * half], s[nb * 4 + 2 * half + 1]))
                row_max = max(row_max, ptx.shfl_xor(row_max, 1))
                row_max = max(row_max, ptx.shfl_xor(row_max, 2))
                m_new = max(m_i[half], row_max * scale_log2)
                m_use = m_new if m_new != NEG_INF else float32(0)
                alpha = ptx.ex2(m_i[half] - m_use)
                row_sum = float32(0)
                for nb in range(N_BLOCKS):
                    for e in range(2):
                        p = ptx.ex2(s[nb * 4 + 2 * half + e] * scale_log2 - m_use)
                        s[nb * 4 + 2 * half + e] = p
                        row_sum += p
                m_i[half] = m_new
                l_i[half] = l_i[half] * alpha + row_sum  # partial over this thread's columns
                for db in range(D_BLOCKS):
                    acc[db * 4 + 2 * half] *= alpha
                    acc[db * 4 + 2 * half + 1] *= alpha

            # acc += P V: P's C fragments, packed to 16 bits, are the A fragments
            for kk in range(PV_STEPS):
                a0 = pack(s[(2 * kk) * 4 + 0], s[(2 * kk) * 4 + 1])
                a1 = pack(s[(2 * kk) * 4 + 2], s[(2 * kk) * 4 + 3])
                a2 = pack(s[(2 * kk + 1) * 4 + 0], s[(2 * kk + 1) * 4 + 1])
                a3 = pack(s[(2 * kk + 1) * 4 + 2], s[(2 * kk + 1) * 4 + 3])
                mat = lane // 8
                key = kk * 16 + (mat % 2) * 8 + lane % 8
                for db2 in range(D_BLOCKS // 2):
                    word = (db2 * 16 + (mat // 2) * 8) // 2
                    b0, b1, b2, b3 = ptx.ldmatrix_x4_trans(ptx.shared_address(v_s, (stage, key, word)))
                    d = 2 * db2
                    acc[d * 4], acc[d * 4 + 1], acc[d * 4 + 2], acc[d * 4 + 3] = mma(
                        a0, a1, a2, a3, b0, b1,
                        acc[d * 4], acc[d * 4 + 1], acc[d * 4 + 2], acc[d * 4 + 3],
                    )
                    d = 2 * db2 + 1
                    acc[d * 4], acc[d * 4 + 1], acc[d * 4 + 2], acc[d * 4 + 3] = mma(
                        a0, a1, a2, a3, b2, b3,
                        acc[d * 4], acc[d * 4 + 1], acc[d * 4 + 2], acc[d * 4 + 3],
                    )
            cuda.syncthreads()  # everyone is done with this stage before it is refilled

        ptx.cp_async_wait_group(0)
        for half in range(2):
            l_sum = l_i[half]
            l_sum += ptx.shfl_xor(l_sum, 1)
            l_sum += ptx.shfl_xor(l_sum, 2)
            inv = float32(0)
            if l_sum > 0:
                inv = float32(1) / l_sum
            i = row_w + g + 8 * half
            if i < seqlen_q:
                for db in range(D_BLOCKS):
                    word = pack(acc[db * 4 + 2 * half] * inv, acc[db * 4 + 2 * half + 1] * inv)
                    col = db * 8 + 2 * t
                    out[b, i, h, col] = np.uint16(word & 0xFFFF)
                    out[b, i, h, col + 1] = np.uint16(word >> 16)
                if WITH_LSE and t == 0:
                    if l_sum > 0:
                        lse[b, h, i] = m_i[half] * LN2 + math.log(l_sum)
                    else:
                        lse[b, h, i] = NEG_INF

    return forward_mma
