"""Split-KV decoding on the tensor cores: the fast path of attention_with_kvcache for
float16 / bfloat16 caches with 16-byte aligned rows (kernels/decode.py is the portable
path for everything else).

Work partition: a CTA owns one (split, kv head, batch) and 16 query rows of that kv
head's group (row = (query head - kv head * group) * seqlen_q + i; GQA 8 decoding fills
8 of them, the others are zeros), so every key and value row is read from memory once
for all the query heads that share it. Each warp streams its own 16-key tiles of the
split (tiles warp, warp + W, warp + 2W, ...) through a private ring of STAGES
shared-memory buffers filled by 16-byte cp.async copies: STAGES - 1 tiles of K and V
per warp are in flight while it computes one, and warps never wait for each other
before the end. A paged cache costs one block-table read per tile when 16 divides the
block size, made one tile ahead so its latency hides behind the math (else one read
per row).

A tile's math is forward_mma's with a single 16-row slice: S = Q K^T (Q's A fragments
in registers, K's B fragments by ldmatrix), the online softmax in the exp2 domain
(FlashAttention-2, Algorithm 1), acc += P V (P's C fragments packed to 16 bits are the
A fragments, V's B fragments by ldmatrix.trans). At 16 rows x (D + Dv) multiply-adds
per key (8 useful with GQA 8) against 2 (D + Dv) bytes, that is 16 tensor-core FLOP
per byte read: ~50 TFLOP/s at 3 TB/s, a tenth of mma.sync's rate, and the ldmatrix
traffic is one read of each staged byte. Nothing but the memory system is busy.

Shared memory (one dynamic buffer of 32-bit words): per warp, STAGES x (16 K rows of
KP / 2 + 4 words, then 16 V rows of VP / 2 + 4 words), KP = D rounded up to 32 and VP =
Dv rounded up to 16 (the padding columns are zero-filled copies). The 4-word row
padding makes the 8 row addresses of an ldmatrix hit distinct banks. After the loop the
same memory holds the warps' (acc, m, l) for the merge.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda
from numba.cuda import float32, int32, uint32

from ..spec import DecodeMmaSpec
from . import ptx
from .forward_simt import _converters

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
PAD_WORDS = 4
KEYS = 16  # keys per warp tile: one m16n8k16 k-step of P V


def padded_dims(spec: DecodeMmaSpec):
    """(KP, VP): head dims as staged, K rounded up to 32 (ldmatrix_x4 covers two
    k-steps), V to 16 (two 8-column blocks)."""
    return -(-spec.head_dim // 32) * 32, -(-spec.head_dim_v // 16) * 16


def q_in_shared(spec: DecodeMmaSpec) -> bool:
    """Above 128 staged K columns Q's A fragments (K_STEPS x 4 registers) would not
    leave the loop enough registers at 128 threads: they are read from shared memory
    by ldmatrix per tile instead (one x4 per k-step)."""
    return padded_dims(spec)[0] > 128


def _words(spec: DecodeMmaSpec):
    kp, vp = padded_dims(spec)
    warps = spec.threads // 32
    pipeline = warps * spec.stages * KEYS * (kp // 2 + vp // 2 + 2 * PAD_WORDS)
    if q_in_shared(spec):
        pipeline += spec.rows * (kp // 2 + PAD_WORDS)
    merge = warps * spec.rows * (vp + PAD_WORDS) + 2 * warps * spec.rows
    return pipeline, merge


def shared_bytes(spec: DecodeMmaSpec) -> int:
    """Dynamic shared memory: the K/V rings, reused by the merge."""
    return 4 * max(_words(spec))


def keys_per_step(spec: DecodeMmaSpec) -> int:
    """Keys the CTA's warps cover together in one step; splits are multiples of it."""
    return (spec.threads // 32) * KEYS


def build(spec: DecodeMmaSpec):
    """Compile-time specialized kernel; launch with grid (splits, heads_kv *
    row_chunks, batch), spec.threads threads and shared_bytes(spec) dynamic shared memory.

    Arguments as decode.build's, 16-bit data as uint16 bits except out: q (B, Nq, Hq,
    D) uint16; k_cache, v_cache (B, capacity, Hkv, D / Dv) or paged (blocks,
    block_size, Hkv, D / Dv) uint16 with 16-byte aligned rows; block_table int32 (B,
    max_blocks) (ignored when contiguous); seqlens int32 (B,), clamped into [0,
    capacity - n_new] as decode.build's; n_new; then with
    spec.split part_out float32 (splits, B, Hq, Nq, Dv) and part_lse float32 (splits,
    B, Hq, Nq), else out (B, Nq, Hq, Dv) (float16, or uint16 bits of bfloat16) and lse
    float32 (B, Hq, Nq) (ignored unless with_lse); scale; group = Hq // Hkv;
    row_chunks = cdiv(group * Nq, 16).
    """
    assert spec.dtype in ("fp16", "bf16")
    assert spec.head_dim % 8 == 0 and spec.head_dim_v % 8 == 0
    mma = ptx.mma_f16 if spec.dtype == "fp16" else ptx.mma_bf16
    pack = ptx.pack_f16x2 if spec.dtype == "fp16" else ptx.pack_bf16x2
    _, store, _ = _converters(spec.dtype)
    D, DV = spec.head_dim, spec.head_dim_v
    KP, VP = padded_dims(spec)
    T, STAGES = spec.threads, spec.stages
    W = T // 32
    assert T % 32 == 0 and STAGES >= 2
    WAIT = STAGES - 2  # cp.async groups left in flight when a tile is needed
    KROW = KP // 2 + PAD_WORDS  # words per staged K row
    VROW = VP // 2 + PAD_WORDS
    TILE_WORDS = KEYS * (KROW + VROW)
    WARP_WORDS = STAGES * TILE_WORDS
    K_STEPS = KP // 16  # k-steps of S = Q K^T
    D_BLOCKS = VP // 8  # 8-column blocks of the output
    Q_SMEM = q_in_shared(spec)
    Q_REGS = 4 if Q_SMEM else K_STEPS * 4
    QROW = KP // 2 + PAD_WORDS  # words per row of Q in shared memory (Q_SMEM)
    Q_OFF = W * WARP_WORDS  # Q after the rings (the merge may reuse it)
    ACC_REGS = D_BLOCKS * 4
    CTA_KEYS = W * KEYS
    ROWS = spec.rows
    AROW = VP + PAD_WORDS  # floats per row of the merge buffer
    M_OFF = W * ROWS * AROW
    L_OFF = M_OFF + W * ROWS
    CAUSAL, SPLIT, WITH_LSE = spec.causal, spec.split, spec.with_lse
    PAGED, BS = spec.block_size > 0, max(spec.block_size, 1)
    TILE_IN_ONE_BLOCK = PAGED and BS % KEYS == 0  # tiles start on multiples of 16
    NEG_INF = -math.inf
    assert T % ROWS == 0
    TPR = T // ROWS  # merge: threads per output row
    COLS_PER_THREAD = -(-DV // TPR)

    POW2 = BS & (BS - 1) == 0
    SHIFT = BS.bit_length() - 1

    @cuda.jit(device=True, inline=True)
    def row_in_block(j):
        """j % BS for a key j >= 0 (an AND when BS is a power of two)."""
        if POW2:
            return int32(j & int32(BS - 1))
        return int32(j % int32(BS))

    @cuda.jit(device=True, inline=True)
    def block_index(j):
        """j // BS for a key j >= 0."""
        if POW2:
            return int32(j >> int32(SHIFT))
        return int32(j // int32(BS))

    def make_issue(CH, DCH, ROW):
        """issue(cache, ...): cp.async one warp tile (16 rows, CH 16-byte chunks each,
        the first DCH holding data) into the ring at word `base`; rows at or past
        key_end and padding chunks are zero-filled, their source clamped in bounds.
        All index arithmetic is 32-bit and, when CH divides 32, each lane keeps one
        chunk column (rows r0, r0 + 32 / CH, ...), so a copy costs a few instructions."""
        FIXED = 32 % CH == 0
        RSTEP = 32 // CH if FIXED else 0
        ITERS = -(-KEYS // RSTEP) if FIXED else -(-(KEYS * CH) // 32)
        EXACT = (KEYS % RSTEP == 0) if FIXED else ((KEYS * CH) % 32 == 0)

        @cuda.jit(device=True, inline=True)
        def issue(cache, smem, base, block_table, block, b, hk, t0, key_end, lane):
            last = int32(key_end - int32(1))
            for it in range(ITERS):
                if FIXED:
                    c = int32(lane % int32(CH))
                    r = int32(lane // int32(CH) + int32(it * RSTEP))
                    inside = EXACT or r < int32(KEYS)
                else:
                    e = int32(lane + int32(it * 32))
                    r = int32(e // int32(CH))
                    c = int32(e - r * int32(CH))
                    inside = EXACT or e < int32(KEYS * CH)
                if inside:
                    j = int32(t0 + r)
                    ok = j <= last
                    if DCH < CH:
                        ok = ok and c < int32(DCH)
                    nbytes = int32(16) if ok else int32(0)
                    j = min(j, last)
                    col = int32(c * int32(8))
                    if DCH < CH:
                        col = col if c < int32(DCH) else int32(0)
                    if PAGED:
                        if TILE_IN_ONE_BLOCK:
                            src = ptx.global_address(cache, (block, row_in_block(j), hk, col))
                        else:
                            src = ptx.global_address(cache, (block_table[b, block_index(j)], row_in_block(j), hk, col))
                    else:
                        src = ptx.global_address(cache, (b, j, hk, col))
                    dst = int32(base + r * int32(ROW) + c * int32(4))
                    ptx.cp_async_16(ptx.shared_address(smem, (dst,)), src, nbytes)

        return issue

    issue_k = make_issue(KP // 8, D // 8, KROW)
    issue_v = make_issue(VP // 8, DV // 8, VROW)

    @cuda.jit(device=True, inline=True)
    def issue_tile(k_cache, v_cache, smem, base, block_table, block, b, hk, t0, key_end, lane):
        """Both halves of a tile; ``block``: its block id when TILE_IN_ONE_BLOCK."""
        issue_k(k_cache, smem, base, block_table, block, b, hk, t0, key_end, lane)
        issue_v(v_cache, smem, base + int32(KEYS * KROW), block_table, block, b, hk, t0, key_end, lane)

    @cuda.jit(device=True, inline=True)
    def block_of(block_table, b, t0):
        """The block holding the tile at key t0 (when one block holds each tile)."""
        if TILE_IN_ONE_BLOCK:
            return int32(block_table[b, block_index(t0)])
        return int32(0)

    def decode_mma(q, k_cache, v_cache, block_table, seqlens, n_new, out, lse, scale, group, row_chunks):
        tid = int32(cuda.threadIdx.x)
        lane = int32(tid % int32(32))
        warp = int32(tid // int32(32))
        g = int32(lane // int32(4))
        t = int32(lane % int32(4))
        mat = int32(lane // int32(8))  # which 8x8 matrix this lane addresses in ldmatrix
        split = int32(cuda.blockIdx.x)
        n_splits = int32(cuda.gridDim.x)
        rc = int32(row_chunks)
        hk = int32(cuda.blockIdx.y // rc)
        chunk = int32(cuda.blockIdx.y - hk * rc)
        b = int32(cuda.blockIdx.z)
        seqlen_q = int32(q.shape[1])
        grp = int32(group)
        rows_total = int32(grp * seqlen_q)
        # clamped into the cache (capacity - n_new >= 0: the host checks it), so that
        # no length, trusted unchecked (check_seqlens=False), reads outside it
        new = int32(n_new)
        capacity = int32(block_table.shape[1] * BS) if PAGED else int32(k_cache.shape[1])
        seqlen_k = int32(min(max(int32(seqlens[b]), int32(0)), int32(capacity - new)) + new)
        scale_log2 = float32(scale * LOG2E)
        smem = cuda.shared.array(0, uint32)

        # this split's keys (a multiple of CTA_KEYS each) and this warp's tiles in it;
        # 32-bit loop state throughout (Python ints would make it 64-bit)
        per_split = int32((seqlen_k + n_splits - int32(1)) // n_splits)
        per_split = int32((per_split + int32(CTA_KEYS - 1)) // int32(CTA_KEYS) * int32(CTA_KEYS))
        j_begin = int32(split * per_split)
        j_end = int32(min(seqlen_k, j_begin + per_split))
        first = int32(j_begin + warp * int32(KEYS))  # this warp's tiles start at first, first + CTA_KEYS, ...
        ring = int32(warp * int32(WARP_WORDS))

        for s in range(STAGES - 1):  # prologue: the first STAGES - 1 tiles in flight
            t_s = int32(first + int32(s * CTA_KEYS))
            if t_s < j_end:
                issue_tile(k_cache, v_cache, smem, int32(ring + int32(s * TILE_WORDS)), block_table,
                           block_of(block_table, b, t_s), b, hk, t_s, j_end, lane)
            ptx.cp_async_commit()
        # the block id of the next tile to issue is read one iteration ahead, so the
        # table read's latency hides behind a tile's math instead of delaying the copies
        next_block = int32(0)
        t_next = int32(first + int32((STAGES - 1) * CTA_KEYS))  # the key of the next tile to issue
        if TILE_IN_ONE_BLOCK and t_next < j_end:
            next_block = block_of(block_table, b, t_next)

        # Q's A fragments (rows g and g + 8 of this chunk), 16-bit pairs; zeros past D
        # and for rows past the group. last_key: the last key each of the two rows sees.
        q_frag = cuda.local.array(Q_REGS, uint32)
        last_key = cuda.local.array(2, int32)
        for half in range(2):
            row = int32(chunk * int32(ROWS) + g + int32(8 * half))
            valid = row < rows_total
            head_row = int32(row // seqlen_q)
            hq = int32(hk * grp + head_row)
            i = int32(row - head_row * seqlen_q)
            last_key[half] = int32(seqlen_k - int32(1))
            if CAUSAL and valid:
                last_key[half] = int32(i + seqlen_k - seqlen_q)
            for kk in range(K_STEPS):
                for p in range(2):
                    c = int32(kk * 16 + 8 * p) + int32(2) * t
                    word = uint32(0)
                    if valid and c < int32(D):
                        word = uint32(q[b, i, hq, c]) | (uint32(q[b, i, hq, c + int32(1)]) << uint32(16))
                    if Q_SMEM:
                        if warp == 0:
                            smem[int32(Q_OFF) + int32(g + 8 * half) * int32(QROW) + int32(kk * 8 + 4 * p) + t] = word
                    else:
                        q_frag[kk * 4 + half + 2 * p] = word
        if Q_SMEM:
            cuda.syncthreads()

        acc = cuda.local.array(ACC_REGS, float32)
        for x in range(ACC_REGS):
            acc[x] = 0
        s = cuda.local.array(8, float32)  # S of a tile: 2 blocks of 8 keys x 4
        m_i = cuda.local.array(2, float32)
        l_i = cuda.local.array(2, float32)
        for half in range(2):
            m_i[half] = NEG_INF
            l_i[half] = 0
        diag = int32(seqlen_k - seqlen_q)  # causal: the last key query row 0 sees

        stage = int32(0)  # ring buffer of the tile at t0; the tile issued next goes to the one before it
        t0 = first
        while t0 < j_end:
            ptx.cp_async_wait_group(WAIT)  # this lane's copies of the tile at t0 have landed
            ptx.syncwarp()  # ... every lane's; and all lanes are done with the tile before
            t_next = int32(t0 + int32((STAGES - 1) * CTA_KEYS))
            if t_next < j_end:  # refill the buffer the previous tile used
                fill = int32(stage - int32(1)) if stage > int32(0) else int32(STAGES - 1)
                issue_tile(k_cache, v_cache, smem, int32(ring + fill * int32(TILE_WORDS)), block_table,
                           next_block, b, hk, t_next, j_end, lane)
                t_after = int32(t_next + int32(CTA_KEYS))
                if TILE_IN_ONE_BLOCK and t_after < j_end:
                    next_block = block_of(block_table, b, t_after)
            ptx.cp_async_commit()
            k_base = int32(ring + stage * int32(TILE_WORDS))
            v_base = int32(k_base + int32(KEYS * KROW))

            # S = Q K^T: one ldmatrix_x4 gives the B fragments of 8 keys x 2 k-steps
            for x in range(8):
                s[x] = 0
            for kk2 in range(K_STEPS // 2):
                for nb in range(2):
                    key = int32(nb * 8) + lane % int32(8)
                    b0, b1, b2, b3 = ptx.ldmatrix_x4(
                        ptx.shared_address(smem, (int32(k_base + key * int32(KROW) + int32(kk2 * 16) + mat * int32(4)),)))
                    j = nb * 4
                    for h2 in range(2):  # the two k-steps of this ldmatrix
                        a = 0 if Q_SMEM else (2 * kk2 + h2) * 4
                        if Q_SMEM:  # A fragments of k-step 2 kk2 + h2: rows lane % 16, 8 columns
                            q_frag[0], q_frag[1], q_frag[2], q_frag[3] = ptx.ldmatrix_x4(ptx.shared_address(
                                smem, (int32(Q_OFF + (2 * kk2 + h2) * 8) + (lane % int32(16)) * int32(QROW)
                                       + (lane // int32(16)) * int32(4),)))
                        bb0 = b0 if h2 == 0 else b2
                        bb1 = b1 if h2 == 0 else b3
                        s[j], s[j + 1], s[j + 2], s[j + 3] = mma(
                            q_frag[a], q_frag[a + 1], q_frag[a + 2], q_frag[a + 3], bb0, bb1,
                            s[j], s[j + 1], s[j + 2], s[j + 3])

            # mask only tiles that reach past the split or the causal diagonal
            needs_mask = int32(t0 + int32(KEYS)) > j_end
            if CAUSAL:
                needs_mask = needs_mask or int32(t0 + int32(KEYS - 1)) > diag
            if needs_mask:
                for half in range(2):
                    visible = int32(min(int32(j_end - int32(1)), last_key[half]) - t0)  # last column this row sees
                    for nb in range(2):
                        for e in range(2):
                            if int32(nb * 8 + e) + int32(2) * t > visible:
                                s[nb * 4 + 2 * half + e] = NEG_INF

            # online softmax, exp2 domain (FlashAttention-2, Algorithm 1, lines 8-10)
            for half in range(2):
                row_max = max(max(s[2 * half], s[2 * half + 1]), max(s[4 + 2 * half], s[5 + 2 * half]))
                row_max = max(row_max, ptx.shfl_xor(row_max, 1))
                row_max = max(row_max, ptx.shfl_xor(row_max, 2))
                m_new = max(m_i[half], row_max * scale_log2)
                m_use = m_new if m_new != NEG_INF else float32(0)
                alpha = ptx.ex2(m_i[half] - m_use)
                row_sum = float32(0)
                for nb in range(2):
                    for e in range(2):
                        j = nb * 4 + 2 * half + e
                        p = ptx.ex2(s[j] * scale_log2 - m_use)
                        s[j] = p
                        row_sum += p
                m_i[half] = m_new
                l_i[half] = l_i[half] * alpha + row_sum  # partial over this thread's columns
                for db in range(D_BLOCKS):
                    acc[db * 4 + 2 * half] *= alpha
                    acc[db * 4 + 2 * half + 1] *= alpha

            # acc += P V: P's C fragments, packed to 16 bits, are the A fragments
            a0 = pack(s[0], s[1])
            a1 = pack(s[2], s[3])
            a2 = pack(s[4], s[5])
            a3 = pack(s[6], s[7])
            key = (mat % int32(2)) * int32(8) + lane % int32(8)
            for db2 in range(D_BLOCKS // 2):
                b0, b1, b2, b3 = ptx.ldmatrix_x4_trans(
                    ptx.shared_address(smem, (int32(v_base + key * int32(VROW) + int32(db2 * 8)
                                                    + (mat // int32(2)) * int32(4)),)))
                d = db2 * 8
                acc[d], acc[d + 1], acc[d + 2], acc[d + 3] = mma(
                    a0, a1, a2, a3, b0, b1, acc[d], acc[d + 1], acc[d + 2], acc[d + 3])
                d += 4
                acc[d], acc[d + 1], acc[d + 2], acc[d + 3] = mma(
                    a0, a1, a2, a3, b2, b3, acc[d], acc[d + 1], acc[d + 2], acc[d + 3])

            t0 = int32(t0 + int32(CTA_KEYS))
            stage = int32(stage + int32(1))
            if stage == int32(STAGES):
                stage = int32(0)

        # merge the warps: (acc, m, l) through shared memory, which the rings leave free
        ptx.cp_async_wait_group(0)  # only empty groups remain, but none may land later
        cuda.syncthreads()
        merge = cuda.shared.array(0, float32)
        for half in range(2):
            l_sum = l_i[half]
            l_sum += ptx.shfl_xor(l_sum, 1)
            l_sum += ptx.shfl_xor(l_sum, 2)
            r = warp * int32(ROWS) + g + int32(8 * half)
            for db in range(D_BLOCKS):
                for e in range(2):
                    merge[r * int32(AROW) + int32(db * 8 + e) + int32(2) * t] = acc[db * 4 + 2 * half + e]
            if t == 0:
                merge[int32(M_OFF) + r] = m_i[half]
                merge[int32(L_OFF) + r] = l_sum
        cuda.syncthreads()
        # TPR threads per row, each with every TPR-th column: the row's statistics
        # (max, warp weights, sum, lse) once per thread, then only a weighted sum and a
        # store per element; consecutive threads write consecutive columns
        r = int32(tid // int32(TPR))
        part = int32(tid - r * int32(TPR))
        row = int32(chunk * int32(ROWS) + r)
        if row < rows_total:
            head_row = int32(row // seqlen_q)
            hq = int32(hk * grp + head_row)
            i = int32(row - head_row * seqlen_q)
            m_tot = merge[int32(M_OFF) + r]
            for w in range(1, W):
                m_tot = max(m_tot, merge[int32(M_OFF + w * ROWS) + r])
            m_use = m_tot if m_tot != NEG_INF else float32(0)
            factor = cuda.local.array(W, float32)
            l_tot = float32(0)
            for w in range(W):
                factor[w] = ptx.ex2(merge[int32(M_OFF + w * ROWS) + r] - m_use)
                l_tot += merge[int32(L_OFF + w * ROWS) + r] * factor[w]
            lse_row = float32(NEG_INF)
            inv = float32(0)
            if l_tot > 0:
                inv = float32(1) / l_tot
                lse_row = m_tot * float32(LN2) + math.log(l_tot)
            for k in range(COLS_PER_THREAD):
                d = int32(part + int32(k * TPR))
                if DV % TPR == 0 or d < int32(DV):
                    o = float32(0)
                    for w in range(W):
                        o += merge[int32((w * ROWS) * AROW) + r * int32(AROW) + d] * factor[w]
                    o *= inv
                    if SPLIT:
                        out[split, b, hq, i, d] = o
                    else:
                        out[b, i, hq, d] = store(o)
            if part == 0:
                if SPLIT:
                    lse[split, b, hq, i] = lse_row
                elif WITH_LSE:
                    lse[b, hq, i] = lse_row

    return cuda.jit(decode_mma, fastmath={"contract"})
