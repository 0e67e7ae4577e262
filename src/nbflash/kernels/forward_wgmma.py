"""The Hopper forward kernel (sm_90a): FlashAttention-2's algorithm on warpgroup MMA,
fp16 and bf16, head_dim 64, 128, 192 and 256, with the light variants (sliding window,
softcap, ALiBi), a staged 16-bit bias and a staged mask, and packed varlen batches at
head_dim 64 and 128 (varlen with variants at 64: tuning.wgmma_varlen; a float32 or
unstaged bias or mask and dropout keep forward_mma). nbflash.attention's kernel on sm_90
for those (tuning.wgmma_tiles; NBFLASH_WGMMA=0 turns it off).

Work partition: a CTA owns block_m = 64 x warpgroups query rows of one (batch, query
head); warpgroup w owns rows 64w .. 64w + 63 (the M of every wgmma it issues). The Q
tile is staged in shared memory once; K and V tiles of block_n keys stream through
shared memory, double-buffered by 16-byte cp.async copies written straight into the
128-byte-swizzled layout the descriptors describe (kernels/ptx_wgmma.py), so no
fragment is ever loaded by the threads: S = Q K^T is a chain of head_dim / 16 wgmma
with both operands from shared memory (K K-major), and O += P V a chain of block_n / 16
wgmma with P from registers (the S accumulator after the softmax, packed to 16 bits:
wgmma's accumulator layout per warp is mma.sync's, so its C fragments are the A
fragments, as in forward_mma) and V from shared memory MN-major (the same staged
layout read transposed). The online softmax runs on the S fragment in the exp2 domain
with scale * log2(e) folded in (FlashAttention-2, Algorithm 1, lines 8-10); the output
is normalized once at the end. Causal is bottom-right aligned, key tiles no row of the
CTA sees are never visited, and tiles that cross seqlen_k or the diagonal are masked.

Variants (compile-time, from spec.variant; the scheme is forward_mma's, with the same
score_mods helpers): a window visits only the key tiles from the first to the last that
some row of the CTA sees and masks only tiles crossing a band edge; softcap applies
tanh.approx to the S fragment, softcap * log2(e) replacing scale * log2(e) as the exp2
factor; ALiBi's key part is the S accumulator's initial value (the first wgmma of the
chain accumulates, scale_d = 1, instead of overwriting) or, under softcap, is added after
the tanh, and its row part joins each row's max and exponent offset once per tile.

Per thread, in registers: the S accumulator (block_n / 2 floats), the O accumulator
(head_dim / 2), P (block_n / 4 words), m_i and l_i of its 2 rows (16w' + g, + 8 of
its warp w' in the warpgroup). With spec.softmax_overlap (head_dim 128, tuning.wgmma_overlap)
FlashAttention-3's intra-warpgroup pipelining: tile j's softmax runs while P V of tile j - 1
is on the tensor cores (the next S tile in registers beside P and O; K loaded a tile ahead
of V). No warp specialization and no ping-pong between warpgroups yet (FlashAttention-3's
other steps): both warpgroups meet at a barrier a tile once the tile's copies have landed,
and with two K/V stages at a second one before the stages they read are refilled (three
stages, tuning.wgmma_stages, refill the ones read two tiles back, which needs no second
barrier).

Bias and mask (spec.variant.bias / mask, staged: kernels/bias_tile.py): each K/V stage
has a bias tile and a mask tile of block_m queries x block_n keys beside it, copied in
the K tile's cp.async group, so the refill argument above covers them. The bias stage is
unpadded and XOR-swizzled (16-byte chunk c of row r at c ^ (r % 8)) and read with
ldmatrix.x4, which hands each lane its accumulator's key pairs (one load per 16 keys of
the warp's 16 rows); it is added in S units (bias log2(e) / s_log2) after softcap and before
the row max. The mask's rows are padded; a thread loads one 32-bit word a key pair at a
constant offset from one address and tests a byte a score (S = -inf where it is 0).

Shared memory (dynamic, aligned up to 1024 bytes at run time): Q (block_m x head_dim),
then K (stages x block_n x head_dim), then V (the same), each in ptx_wgmma's tile layout,
then the bias and mask stages (score_stage_words).
Softcap kernels may take exp2 for some of each tile's scores on the FMA pipe
(spec.exp2_fma, kernels.ptx.ex2_fma), as the tanh already loads the MUFU once a score.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda
from numba.cuda import float32, uint32

from .. import tuning
from ..spec import ForwardSpec
from . import bias_tile, ptx
from . import ptx_wgmma as wg
from .score_mods import alibi_split, window_key_range
from .varlen import sequence_span

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
HEAD_DIMS = (64, 128, 192, 256)  # whole 64-column panels
STAGES = (2, 3)  # K/V buffers a spec may ask for (tuning.wgmma_stages)
K_MAJOR_LBO = 16  # unused by the hardware for swizzled K-major operands ("assumed 1")


def score_stage_words(spec: ForwardSpec) -> tuple:
    """Words of one stage of the staged bias tile (block_m queries x block_n keys of
    16-bit values, swizzled, unpadded: make_fragment_bias_reader) and of the mask tile
    (bytes, rows padded as the mma.sync forward's); 0 for a variant without them."""
    var = spec.variant
    bias = spec.block_m * spec.block_n * 2 // 4 if var.bias else 0
    mask = spec.block_m * bias_tile.row_words(spec.block_n, 1) if var.mask else 0
    return bias, mask


def shared_bytes(spec: ForwardSpec) -> int:
    D = spec.head_dim
    scores = 4 * spec.stages * sum(score_stage_words(spec))
    return wg.tile_bytes(spec.block_m, D) + 2 * spec.stages * wg.tile_bytes(spec.block_n, D) + scores + wg.TILE_ALIGN


def make_issue_tile(head_dim: int, rows: int, threads: int):
    """issue_tile(src, smem, base, b, h, start, n0, seqlen, tid): cp.async rows n0 .. n0 +
    rows - 1 of the sequence at rows start .. start + seqlen - 1 of src[b, :, h, :] (16-bit,
    16-byte aligned rows; start is 0 but for packed varlen tensors) into the swizzled
    tile of ``rows`` rows at word ``base``; rows at or past seqlen are zero-filled (their
    source address clamped into the sequence; the address of row start of (b, h) is
    computed once, each row adds one row stride). Each thread keeps one 16-byte chunk column where the
    threads tile a row evenly; otherwise (head_dim 192: 24 chunks a row) the threads
    stride over the tile's chunks in row-major order."""
    CHUNKS = head_dim // 8
    RSTEP = threads // CHUNKS
    PASSES = (rows + RSTEP - 1) // RSTEP if threads % CHUNKS == 0 else (rows * CHUNKS + threads - 1) // threads

    @cuda.jit(device=True, inline=True)
    def issue_chunk(src, smem, base, r, c, b, h, start, n0, seqlen):
        j = np.int32(n0 + r)
        nbytes = np.int32(16) if j < seqlen else np.int32(0)
        j = max(np.int32(0), min(j, np.int32(seqlen - 1)))
        ptx.cp_async_16(ptx.shared_address(smem, (base + wg.chunk_word(r, c, rows),)),
                        ptx.global_row_address(src, (b, start, h, c * np.int32(8)), j), nbytes)

    @cuda.jit(device=True, inline=True)
    def issue_tile(src, smem, base, b, h, start, n0, seqlen, tid):
        if threads % CHUNKS == 0:
            c = np.int32(tid % CHUNKS)
            r0 = np.int32(tid // CHUNKS)
            for it in range(PASSES):
                r = r0 + np.int32(it * RSTEP)
                if rows % RSTEP == 0 or r < rows:
                    issue_chunk(src, smem, base, r, c, b, h, start, n0, seqlen)
        else:
            for it in range(PASSES):
                e = np.int32(tid + it * threads)
                if (rows * CHUNKS) % threads == 0 or e < rows * CHUNKS:
                    r = e // np.int32(CHUNKS)
                    issue_chunk(src, smem, base, r, e - r * np.int32(CHUNKS), b, h, start, n0, seqlen)

    return issue_tile


def make_chain(mma, first: int, count: int, a_panel: int, b_panel: int):
    """chain(acc, desc_a, desc_b): ``mma(acc, a, b, 1)`` for k-steps first .. first + count
    - 1 of two K-major operands (a step is 32 bytes into a panel, 4 steps a panel), as
    straight-line code: written as a loop, LLVM leaves d256's 15 steps rolled (a loop of
    wgmma and descriptor arithmetic in the PTX). Built by halving, so the nesting is
    log2(count) deep; each step's offsets are compile-time constants."""
    if count == 1:
        a_off = (first // 4) * a_panel + (first % 4) * 32
        b_off = (first // 4) * b_panel + (first % 4) * 32

        @cuda.jit(device=True, inline=True)
        def step(acc, desc_a, desc_b):
            mma(acc, wg.desc_add(desc_a, a_off), wg.desc_add(desc_b, b_off), 1)

        return step
    lower = make_chain(mma, first, count // 2, a_panel, b_panel)
    upper = make_chain(mma, first + count // 2, count - count // 2, a_panel, b_panel)

    @cuda.jit(device=True, inline=True)
    def chain(acc, desc_a, desc_b):
        lower(acc, desc_a, desc_b)
        upper(acc, desc_a, desc_b)

    return chain


def build(spec: ForwardSpec):
    """Compile-time specialized kernel; launch with grid (cdiv(seqlen_q, block_m),
    heads_q, batch), spec.threads threads and shared_bytes(spec) dynamic shared memory.

    Arguments as forward_mma's (so the launch code is shared): q, k, v, out as uint16
    views of the 16-bit data, q (B, Nq, Hq, D), k and v (B, Nk, Hkv, D), out (B, Nq, Hq,
    D), lse (B, Hq, Nq) float32, scale (float32), group = Hq // Hkv, then cu_seqlens_q and
    cu_seqlens_k (read with spec.varlen: packed (1, total, heads, D) tensors, blockIdx.z
    the sequence, the grid covering the longest one, as forward_mma) and the variant arguments of nbflash.variants.KERNEL_ARGS,
    of which window_left, window_right, softcap and alibi are read where spec.variant
    turns them on. Requires 16-byte aligned rows of q, k and v (checked by the caller)."""
    assert spec.kernel == "wgmma" and spec.dtype in ("fp16", "bf16")
    assert spec.head_dim == spec.head_dim_v and spec.head_dim in HEAD_DIMS
    assert spec.stages in STAGES
    STAGE_COUNT = spec.stages
    # With two stages a tile refills the buffers the tile before it read, so every thread
    # must be done with them first: a second CTA-wide barrier a tile. With three, the
    # buffers refilled at tile j were last read at tile j - 2, which every thread finished
    # (its wgmma waited for) before it passed tile j - 1's first barrier: no second barrier.
    REFILL_BARRIER = STAGE_COUNT == 2
    VAR = spec.variant
    assert tuning.wgmma_variant(VAR, spec.head_dim, scores=True), VAR
    VARLEN = spec.varlen
    OVERLAP = spec.softmax_overlap
    EXP2_FMA = spec.exp2_fma
    assert 0 <= EXP2_FMA <= 4, spec.key
    assert not VARLEN or tuning.wgmma_varlen(spec.head_dim, VAR), spec.key
    D = spec.head_dim
    BM, BN, T = spec.block_m, spec.block_n, spec.threads
    assert T % 128 == 0 and BM == 64 * (T // 128) and BN % 16 == 0 and 16 <= BN <= 256
    mma_s = wg.wgmma_ss(spec.dtype, BN, False)  # S = Q K^T: K staged (key, d) is K-major
    mma_o = wg.wgmma_rs(spec.dtype, D, True)  # O += P V: V staged (key, d) is MN-major
    pack = ptx.pack_f16x2 if spec.dtype == "fp16" else ptx.pack_bf16x2
    Q_WORDS = wg.tile_bytes(BM, D) // 4
    KV_BYTES = wg.tile_bytes(BN, D)
    KV_WORDS = KV_BYTES // 4
    K_OFF = Q_WORDS
    V_OFF = Q_WORDS + STAGE_COUNT * KV_WORDS
    Q_PANEL, KV_PANEL = wg.panel_bytes(BM), wg.panel_bytes(BN)
    WG_ROWS_WORDS = 64 * wg.SWIZZLE_BYTES // 4  # a warpgroup's 64 Q rows in a panel
    S_REGS, O_REGS, P_REGS = BN // 2, D // 2, BN // 4
    K_STEPS, PV_STEPS = D // 16, BN // 16
    S_BLOCKS, O_BLOCKS = BN // 8, D // 8
    CAUSAL, WITH_LSE = spec.causal, spec.with_lse
    NEG_INF = -math.inf
    WINDOW, SOFTCAP, ALIBI = VAR.window, VAR.softcap, VAR.alibi
    # S holds scores in forward_mma's "S units" (the true score in exp2 units is
    # S * s_log2 + row_add): q.k (plus ALiBi's key part) with s_log2 = scale log2(e), or
    # under softcap tanh(scale q.k / softcap) (plus ALiBi's key part) with s_log2 =
    # softcap log2(e). ALiBi's key part is the S chain's initial accumulator without
    # softcap (the cap applies to scale q.k only, so under softcap it comes after the tanh).
    ALIBI_INIT = ALIBI and not SOFTCAP
    # a staged 16-bit bias and a staged mask (bias_tile): one tile of BM queries x BN keys
    # per K/V stage, after V, in the K tile's copy group; the bias is added in S units
    # (bias log2(e) / s_log2) after softcap, the mask sets S = -inf
    BIAS, MASK = bool(VAR.bias), VAR.mask
    assert not BIAS or (VAR.bias in ("fp16", "bf16") and VAR.bias_staged), spec.key
    assert not MASK or VAR.mask_staged, spec.key
    assert not ((BIAS or MASK) and VARLEN) and not VAR.dropout, spec.key
    BIAS_STAGE, MASK_STAGE = score_stage_words(spec)
    BIAS_OFF = V_OFF + STAGE_COUNT * KV_WORDS
    MASK_OFF = BIAS_OFF + STAGE_COUNT * BIAS_STAGE
    # (built either way, the kernel closes over them; without a bias for a 64-key stand-in:
    # a swizzled row is whole 128 bytes, which d192's 112 keys are not)
    issue_bias = bias_tile.make_issue_tile(BM, BN if BIAS else 64, 2, T, swizzle=True)
    bias_lane_offset, bias_f32 = bias_tile.make_fragment_bias_reader(VAR.bias or "fp16", BN if BIAS else 64)
    assert not BIAS or BN * 2 % 128 == 0, spec.key
    issue_mask = bias_tile.make_issue_tile(BM, BN, 1, T)
    mask_lane_offset, MASK_ROW_BYTES = bias_tile.make_fragment_mask_reader(BN)
    MASK_ROW_WORDS = MASK_ROW_BYTES // 4
    issue_q = make_issue_tile(D, BM, T)
    s_chain = make_chain(mma_s, 1, K_STEPS - 1, Q_PANEL, KV_PANEL)
    issue_kv = make_issue_tile(D, BN, T)

    @cuda.jit(device=True, inline=True)
    def issue_scores(bias, mask, smem, base, stage, b, h, row0, seqlen_q, n0, seqlen_k, tid):
        """cp.async the bias and mask tiles of key tile n0 into their stage (in the
        caller's copy group)."""
        if BIAS:
            issue_bias(bias, smem, base + BIAS_OFF + stage * BIAS_STAGE, b, h, row0, seqlen_q, n0, seqlen_k, tid)
        if MASK:
            issue_mask(mask, smem, base + MASK_OFF + stage * MASK_STAGE, b, h, row0, seqlen_q, n0, seqlen_k, tid)

    @cuda.jit(device=True, inline=True)
    def stage_addresses(smem, base, stage, warp_row):
        """Shared addresses of the warp's first row in the bias and mask tiles of a stage."""
        return (ptx.shared_address(smem, (base + BIAS_OFF + stage * BIAS_STAGE + warp_row * (BN // 2),)),
                ptx.shared_address(smem, (base + MASK_OFF + stage * MASK_STAGE + warp_row * MASK_ROW_WORDS,)))

    @cuda.jit(device=True, inline=True)
    def issue_s(s, desc_q, desc_k, n0, row0, seqlen_q, seqlen_k, t, slope_u, slope_log2):
        """Issue S = Q K^T of the key tile at n0 (one wgmma group, not waited for)."""
        if ALIBI_INIT:
            # ALiBi's key part (derivation at forward_mma's S mma, score_mods.alibi_split):
            # col_step (j - c0) in S units, the S chain's initial value at key j = n0 +
            # 8 jb + 2t + e (0 on a tile crossing the diagonals: the exact term below)
            col_step, _, c0, _ = alibi_split(row0, np.int32(BM), n0, np.int32(BN), seqlen_q, seqlen_k,
                                             slope_u, slope_log2)
            col0 = col_step * float32(n0 - c0 + np.int32(2) * t)  # key n0 + 2t
            for jb in range(S_BLOCKS):
                for r in range(4):
                    s[4 * jb + r] = col0 + col_step * float32(jb * 8 + r % 2)
        # head_dim / 16 k-steps, 32 bytes apart in a panel
        wg.wgmma_fence()
        if ALIBI_INIT:  # accumulate onto the preset key part
            mma_s(s, desc_q, desc_k, 1)
        else:
            mma_s(s, desc_q, desc_k, 0)
        s_chain(s, desc_q, desc_k)  # k-steps 1 .. K_STEPS - 1
        wg.wgmma_commit()

    @cuda.jit(device=True, inline=True)
    def issue_pv(o, p, desc_v):
        """Issue O += P V for the tile whose P is packed in p (one wgmma group): k-step kk
        takes keys 16kk .. 16kk + 15 (blocks 2kk, 2kk + 1 of P; two groups of 8 rows, 2
        SBO, further into V)."""
        wg.wgmma_fence()
        for kk in range(PV_STEPS):
            mma_o(o, p[4 * kk], p[4 * kk + 1], p[4 * kk + 2], p[4 * kk + 3],
                  wg.desc_add(desc_v, kk * 2 * wg.SBO_BYTES), 1)
        wg.wgmma_commit()

    @cuda.jit(device=True, inline=True)
    def scores_to_p(s, m_i, l_i, alpha, n0, row0, my_row, seqlen_q, seqlen_k, t, window_left, window_right,
                    cap_in, s_log2, slope_u, slope_log2, row_g, bias_at, mask_at, lane, bias_u):
        """The variants' score modifications, the masks and the online softmax
        (FlashAttention-2, Algorithm 1, lines 8-10, exp2 domain) on the S fragment of
        the key tile at n0: s becomes P (float32, unnormalized), m_i and l_i move to
        this tile, and alpha[half] = exp2(m_old - m_new) is the factor O still owes.
        The staged bias and mask are read at shared addresses bias_at and mask_at (the
        warp's first row of the tile's stage)."""
        if ALIBI:
            col_step, row_step, c0, crossing = alibi_split(row0, np.int32(BM), n0, np.int32(BN), seqlen_q,
                                                           seqlen_k, slope_u, slope_log2)
        if SOFTCAP:
            # one MUFU op per score; tanh.approx.f32's relative error is at most 2**-11
            # (PTX ISA), fp16's rounding, and P is rounded to 16 bits anyway
            if ALIBI:
                col0 = col_step * float32(n0 - c0 + np.int32(2) * t)  # key n0 + 2t
            for j in range(S_BLOCKS):
                for half in range(2):
                    for e in range(2):
                        x = ptx.tanh_approx(s[4 * j + 2 * half + e] * cap_in)
                        if ALIBI:
                            x += col0 + col_step * float32(j * 8 + e)
                        s[4 * j + 2 * half + e] = x
        if BIAS:  # in S units; zero-filled past seqlen_q / seqlen_k (masked below)
            for pair in range(BN // 16):  # keys 16 pair .. + 15: accumulator blocks 2 pair, + 1
                words = ptx.ldmatrix_x4(bias_at + bias_lane_offset(lane, np.int32(pair)))
                for i in range(4):
                    for e in range(2):
                        idx = 4 * (2 * pair + i // 2) + 2 * (i % 2) + e
                        s[idx] += bias_f32(words[i], e) * bias_u
        if ALIBI:
            if crossing:  # the exact term, -slope_u |c_i - j| in S units, per score
                # c_i - j = dist0 + 8 half - (8 jb + e) for this thread's first row and key
                dist0 = float32(my_row + seqlen_k - seqlen_q - n0 - np.int32(2) * t)
                for half in range(2):
                    for jb in range(S_BLOCKS):
                        for e in range(2):
                            s[4 * jb + 2 * half + e] -= slope_u * abs(dist0 + float32(8 * half - 8 * jb - e))

        # mask only tiles that cross seqlen_k, the causal diagonal or a window edge
        needs_mask = n0 + BN > seqlen_k
        if CAUSAL and not WINDOW:
            needs_mask = needs_mask or (n0 + BN - 1 > row0 + seqlen_k - seqlen_q)
        if WINDOW:
            diagonal0 = row0 + seqlen_k - seqlen_q  # the CTA's first row's diagonal
            needs_mask = needs_mask or (n0 + BN - 1 > diagonal0 + window_right)
            needs_mask = needs_mask or (n0 < diagonal0 + np.int32(BM - 1) - window_left)
        if MASK:  # the byte of key 8j + 2t + e of a row is at bit 16 (t % 2) + 8e of its word
            mask_at = mask_at + mask_lane_offset(lane)
            keep = uint32(0xFF) << (uint32(16) * uint32(t & np.int32(1)))
        if MASK and not needs_mask:  # a tile inside every bound: the mask bytes alone
            for half in range(2):
                for j in range(S_BLOCKS):
                    word = ptx.ld_shared_u32(mask_at + uint32(8 * MASK_ROW_BYTES * half + 8 * j))
                    for e in range(2):
                        if word & (keep << uint32(8 * e)) == uint32(0):
                            s[4 * j + 2 * half + e] = NEG_INF
        if needs_mask:
            for half in range(2):
                # keys of this tile the row sees: columns [lowest, visible) (32-bit, once per row)
                visible = np.int32(seqlen_k - n0)
                if CAUSAL and not WINDOW:
                    visible = min(visible, my_row + np.int32(8 * half) + seqlen_k - seqlen_q - n0 + np.int32(1))
                if WINDOW:
                    i_diag = my_row + np.int32(8 * half) + seqlen_k - seqlen_q - n0
                    visible = min(visible, i_diag + np.int32(1) + window_right)
                    lowest = i_diag - window_left
                for j in range(S_BLOCKS):
                    if MASK:
                        word = ptx.ld_shared_u32(mask_at + uint32(8 * MASK_ROW_BYTES * half + 8 * j))
                    for e in range(2):
                        col = np.int32(j * 8 + 2 * t + e)
                        hide = col >= visible
                        if WINDOW:
                            hide = hide or col < lowest
                        if MASK:
                            hide = hide or word & (keep << uint32(8 * e)) == uint32(0)
                        if hide:
                            s[4 * j + 2 * half + e] = NEG_INF

        for half in range(2):
            row_max = float32(NEG_INF)
            for j in range(S_BLOCKS):
                row_max = max(row_max, max(s[4 * j + 2 * half], s[4 * j + 2 * half + 1]))
            row_max = max(row_max, ptx.shfl_xor(row_max, 1))
            row_max = max(row_max, ptx.shfl_xor(row_max, 2))
            if ALIBI:  # this tile's row part of ALiBi (exp2 units)
                row_add = row_step * row_g + row_step * float32(8 * half)
                m_new = max(m_i[half], row_max * s_log2 + row_add)
            else:
                m_new = max(m_i[half], row_max * s_log2)
            m_use = m_new if m_new != NEG_INF else float32(0)
            alpha[half] = ptx.ex2(m_i[half] - m_use)
            m_sub = m_use  # exponent offset of S * s_log2
            if ALIBI:
                m_sub -= row_add
            row_sum = float32(0)
            for j in range(S_BLOCKS):
                for e in range(2):
                    idx = 4 * j + 2 * half + e
                    if j % 4 < EXP2_FMA:  # off the MUFU, which softcap's tanh also needs
                        pv = ptx.ex2_fma(s[idx] * s_log2 - m_sub)
                    else:
                        pv = ptx.ex2(s[idx] * s_log2 - m_sub)
                    row_sum += pv
                    s[idx] = pv
            m_i[half] = m_new
            l_i[half] = l_i[half] * alpha[half] + row_sum  # partial over this thread's columns

    @cuda.jit(device=True, inline=True)
    def rescale_o(o, alpha):
        for half in range(2):
            for j in range(O_BLOCKS):
                o[4 * j + 2 * half] *= alpha[half]
                o[4 * j + 2 * half + 1] *= alpha[half]

    @cuda.jit(device=True, inline=True)
    def pack_p(p, s):
        for i in range(P_REGS):  # word 2j + half: row g + 8 half, columns 8j + 2t, +1
            p[i] = pack(s[2 * i], s[2 * i + 1])

    def forward_wgmma(q, k, v, out, lse, scale, group, cu_seqlens_q, cu_seqlens_k, window_left, window_right,
                      softcap, alibi, bias, mask, keep_threshold, keep_scale, seed_lo, seed_hi):
        tid = cuda.threadIdx.x
        lane = tid % 32
        wgi = ptx.warp_uniform(np.int32(tid // 128)) if T > 128 else 0  # this thread's warpgroup (uniform: see ptx)
        g = lane // 4
        t = lane % 4
        m_block = cuda.blockIdx.x
        if CAUSAL:  # the longest rows (the last blocks) start first: less tail at the end
            m_block = cuda.gridDim.x - 1 - m_block
        row0 = np.int32(m_block * BM)
        h = cuda.blockIdx.y
        # 32-bit: a 64-bit division is a call in SASS, and any call serializes the wgmma
        hk = uint32(h) // uint32(group)
        if VARLEN:  # one packed sequence per blockIdx.z; its rows are offset by its start
            b = 0
            q_start, seqlen_q = sequence_span(cu_seqlens_q, cuda.blockIdx.z, q.shape[1])
            k_start, seqlen_k = sequence_span(cu_seqlens_k, cuda.blockIdx.z, k.shape[1])
            if row0 >= seqlen_q:  # the grid covers the longest sequence; the whole CTA leaves
                return
        else:
            b = cuda.blockIdx.z
            q_start = np.int32(0)
            k_start = np.int32(0)
            seqlen_q = np.int32(q.shape[1])
            seqlen_k = np.int32(k.shape[1])
        # rows of this thread: my_row + 8 half (the accumulator layout, ptx_wgmma)
        warp_row = np.int32(wgi * 64 + (tid // 32) % 4 * 16)  # the warp's first row in the tile
        my_row = np.int32(row0 + warp_row + g)
        s_log2 = float32(scale * LOG2E)  # what turns an S value into exp2 units in the softmax
        cap_in = float32(0)
        if SOFTCAP:  # S holds th = tanh(scale q.k / softcap); the capped score is th * s_log2 in exp2 units
            cap_in = float32(scale / softcap)
            s_log2 = float32(softcap * LOG2E)
        slope_log2 = float32(0)
        slope_u = float32(0)
        row_g = float32(0)
        if ALIBI:
            slope_log2 = float32(alibi[cuda.blockIdx.z, h] * LOG2E)  # (batch or sequence, head)
            slope_u = slope_log2 / s_log2  # the slope in S units: slope / scale, or slope / softcap
            row_g = float32(my_row - row0)  # this thread's first row, relative to the CTA's
        bias_u = float32(LOG2E) / s_log2  # a bias value in S units

        smem = cuda.shared.array(0, uint32)
        base = wg.shared_align_words(smem)

        key_end = seqlen_k
        if CAUSAL:
            key_end = max(np.int32(0), min(seqlen_k, row0 + np.int32(BM) + seqlen_k - seqlen_q))
        n_tiles = (key_end + np.int32(BN - 1)) // np.int32(BN)
        tile_first = np.int32(0)
        if WINDOW:  # only the key tiles some row of this CTA sees (causal is folded into window_right)
            first, end = window_key_range(row0, row0 + np.int32(BM), seqlen_q, seqlen_k, window_left, window_right)
            tile_first = np.int32(first) // np.int32(BN)
            n_tiles = (np.int32(end) + np.int32(BN - 1)) // np.int32(BN) - tile_first
        n_first = tile_first * np.int32(BN)

        desc_q = wg.smem_desc(ptx.shared_address(smem, (base + wgi * WG_ROWS_WORDS,)), K_MAJOR_LBO)
        desc_k0 = wg.smem_desc(ptx.shared_address(smem, (base + K_OFF,)), K_MAJOR_LBO)
        desc_v0 = wg.smem_desc(ptx.shared_address(smem, (base + V_OFF,)), KV_PANEL)

        o = cuda.local.array(O_REGS, float32)
        for i in range(O_REGS):
            o[i] = 0
        s = cuda.local.array(S_REGS, float32)
        p = cuda.local.array(P_REGS, uint32)
        m_i = cuda.local.array(2, float32)
        l_i = cuda.local.array(2, float32)
        alpha = cuda.local.array(2, float32)
        for r in range(2):
            m_i[r] = NEG_INF
            l_i[r] = 0

        issue_q(q, smem, base, b, h, q_start, row0, seqlen_q, tid)
        if OVERLAP:
            # FlashAttention-3's intra-warpgroup pipelining: the softmax of key tile j runs
            # while O += P V of tile j - 1 is on the tensor cores. K runs a tile ahead of V:
            # copy group j holds K_j and V_(j-1), so iteration j reads K stage j % stages and
            # V stage (j - 1) % stages, and refills K stage (j + 1) % stages and V stage j %
            # stages: with two stages the ones iteration j - 1 read, with three iteration j - 2's.
            if n_tiles > 0:
                issue_kv(k, smem, base + K_OFF, b, hk, k_start, n_first, seqlen_k, tid)
                issue_scores(bias, mask, smem, base, 0, b, h, row0, seqlen_q, n_first, seqlen_k, tid)
            ptx.cp_async_commit()  # group 0: Q and K_0 (and tile 0's bias / mask)
            for it in range(n_tiles):
                stage = it % STAGE_COUNT
                after = (it + 1) % STAGE_COUNT
                before = (it + STAGE_COUNT - 1) % STAGE_COUNT
                n0 = n_first + np.int32(it * BN)
                if it + 1 < n_tiles:
                    issue_kv(k, smem, base + K_OFF + after * KV_WORDS, b, hk, k_start, n0 + np.int32(BN),
                             seqlen_k, tid)
                    issue_scores(bias, mask, smem, base, after, b, h, row0, seqlen_q, n0 + np.int32(BN), seqlen_k,
                                 tid)
                issue_kv(v, smem, base + V_OFF + stage * KV_WORDS, b, hk, k_start, n0, seqlen_k, tid)
                ptx.cp_async_commit()  # group it + 1: K_(it+1) (and its bias / mask), V_it
                ptx.cp_async_wait_group(1)  # group it (K_it, V_(it-1)) has landed
                wg.fence_proxy_async()  # cp.async writes are generic-proxy; wgmma reads via the async proxy
                cuda.syncthreads()
                issue_s(s, desc_q, wg.desc_add(desc_k0, stage * KV_BYTES), n0, row0, seqlen_q, seqlen_k, t,
                        slope_u, slope_log2)
                if it > 0:
                    issue_pv(o, p, wg.desc_add(desc_v0, before * KV_BYTES))
                else:  # an empty group in P V's place: the waits below count the same on every tile
                    wg.wgmma_commit()
                wg.wgmma_wait(1)  # S has landed; P V of the last tile may still run
                wg.fence_operands(s, S_REGS)
                bias_at, mask_at = stage_addresses(smem, base, stage, warp_row)
                scores_to_p(s, m_i, l_i, alpha, n0, row0, my_row, seqlen_q, seqlen_k, t, window_left,
                            window_right, cap_in, s_log2, slope_u, slope_log2, row_g, bias_at, mask_at,
                            np.int32(lane), bias_u)
                wg.wgmma_wait(0)
                wg.fence_operands(o, O_REGS)
                rescale_o(o, alpha)  # on the first tile O is 0 and alpha 0
                pack_p(p, s)
                if REFILL_BARRIER:
                    cuda.syncthreads()  # everyone is done with both stages before they are refilled
            ptx.cp_async_wait_group(0)
            if n_tiles > 0:  # the last tile's O += P V
                wg.fence_proxy_async()
                cuda.syncthreads()
                issue_pv(o, p, wg.desc_add(desc_v0, ((n_tiles - 1) % STAGE_COUNT) * KV_BYTES))
                wg.wgmma_wait(0)
                wg.fence_operands(o, O_REGS)
        else:
            if n_tiles > 0:
                issue_kv(k, smem, base + K_OFF, b, hk, k_start, n_first, seqlen_k, tid)
                issue_kv(v, smem, base + V_OFF, b, hk, k_start, n_first, seqlen_k, tid)
                issue_scores(bias, mask, smem, base, 0, b, h, row0, seqlen_q, n_first, seqlen_k, tid)
            ptx.cp_async_commit()
            for it in range(n_tiles):
                stage = it % STAGE_COUNT
                n0 = n_first + np.int32(it * BN)
                if it + 1 < n_tiles:
                    nxt = ((it + 1) % STAGE_COUNT) * KV_WORDS
                    issue_kv(k, smem, base + K_OFF + nxt, b, hk, k_start, n0 + np.int32(BN), seqlen_k, tid)
                    issue_kv(v, smem, base + V_OFF + nxt, b, hk, k_start, n0 + np.int32(BN), seqlen_k, tid)
                    issue_scores(bias, mask, smem, base, (it + 1) % STAGE_COUNT, b, h, row0, seqlen_q,
                                 n0 + np.int32(BN), seqlen_k, tid)
                ptx.cp_async_commit()
                ptx.cp_async_wait_group(1)  # this tile's group (and Q) has landed
                wg.fence_proxy_async()  # cp.async writes are generic-proxy; wgmma reads via the async proxy
                cuda.syncthreads()
                issue_s(s, desc_q, wg.desc_add(desc_k0, stage * KV_BYTES), n0, row0, seqlen_q, seqlen_k, t,
                        slope_u, slope_log2)
                wg.wgmma_wait(0)
                wg.fence_operands(s, S_REGS)
                bias_at, mask_at = stage_addresses(smem, base, stage, warp_row)
                scores_to_p(s, m_i, l_i, alpha, n0, row0, my_row, seqlen_q, seqlen_k, t, window_left,
                            window_right, cap_in, s_log2, slope_u, slope_log2, row_g, bias_at, mask_at,
                            np.int32(lane), bias_u)
                rescale_o(o, alpha)
                pack_p(p, s)
                issue_pv(o, p, wg.desc_add(desc_v0, stage * KV_BYTES))
                wg.wgmma_wait(0)
                wg.fence_operands(o, O_REGS)
                if REFILL_BARRIER:
                    cuda.syncthreads()  # everyone is done with this stage before it is refilled
            ptx.cp_async_wait_group(0)

        for half in range(2):
            l_sum = l_i[half]
            l_sum += ptx.shfl_xor(l_sum, 1)
            l_sum += ptx.shfl_xor(l_sum, 2)
            inv = float32(0)
            if l_sum > 0:
                inv = float32(1) / l_sum
            i = my_row + np.int32(8 * half)
            if i < seqlen_q:
                for j in range(O_BLOCKS):
                    word = pack(o[4 * j + 2 * half] * inv, o[4 * j + 2 * half + 1] * inv)
                    col = j * 8 + 2 * t
                    out[b, q_start + i, h, col] = np.uint16(word & 0xFFFF)
                    out[b, q_start + i, h, col + 1] = np.uint16(word >> 16)
                if WITH_LSE and t == 0:
                    if l_sum > 0:
                        lse[b, h, q_start + i] = m_i[half] * LN2 + math.log(l_sum)
                    else:
                        lse[b, h, q_start + i] = NEG_INF

    # .maxntid: ptxas keeps registers x threads within the SM's 64K (3 warpgroups: <= 168)
    bounds = {} if ptx.SIMULATED else {"launch_bounds": T}
    return cuda.jit(forward_wgmma, fastmath={"contract"}, **bounds)
