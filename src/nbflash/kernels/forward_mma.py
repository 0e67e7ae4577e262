"""The tensor-core forward kernel (FlashAttention-2) for float16 and bfloat16.

Work partition: a CTA owns block_m query rows of one (batch, query head); each warp
owns M_TILES slices of 16 rows, so every K or V fragment a warp reads from shared
memory feeds M_TILES mma instructions (shared-memory bandwidth, not the tensor cores,
bounds mma.sync on Hopper). The Q tile is copied to shared memory once; K and V tiles
of block_n keys stream through shared memory, double-buffered with cp.async so the
next tile's loads overlap this tile's math. S = Q K^T and P stay in registers: the
mma C fragment of S, packed to 16 bits, is the A fragment of P for P V. The online
softmax runs in the exp2 domain with scale * log2(e) folded in; the output is
normalized once at the end.

Per thread, in registers (ptx.py gives the fragment layouts): the output accumulator
acc (M_TILES x head_dim / 8 blocks x 4 floats), the scores of one tile s (M_TILES x
block_n / 8 blocks x 4 floats), the running max m_i and sum l_i of its 2 * M_TILES
rows, and with spec.q_in_registers the Q A-fragments.

Shared memory is one dynamic buffer of 32-bit words: Q (block_m rows), then K and V
(stages x block_n rows each); every row is head_dim / 2 words plus 4 words of padding
so that fragment reads (ldmatrix rows) from 8 consecutive rows hit distinct banks.
Where spec.variant stages them (bias_staged, mask_staged), the bias and mask tiles of
each key tile follow (stages x block_m rows each, kernels/bias_tile.py), copied with
cp.async in K and V's commit group.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda
from numba.cuda import float32, int32, uint32

from ..spec import ForwardSpec
from . import bias_tile, ptx
from .philox import keep_pair
from .score_mods import alibi_split, bias_reader, window_key_range
from .tile_copy import make_issue_rows
from .varlen import sequence_span

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
PAD_WORDS = 4
HEAD_DIMS = (32, 64, 96, 128, 192, 256)


def shared_bytes(spec: ForwardSpec) -> int:
    row_words = spec.head_dim // 2 + PAD_WORDS
    return 4 * (row_words * (spec.block_m + 2 * spec.stages * spec.block_n) + sum(_staged_words(spec)))


def _staged_words(spec: ForwardSpec):
    """Words of the staged bias and mask tiles (0 when read per element), after V."""
    var = spec.variant
    bias = mask = 0
    if var.bias and var.bias_staged:
        bias = bias_tile.stage_words(spec.block_m, spec.block_n, bias_tile.ITEMSIZE[var.bias], spec.stages)
    if var.mask and var.mask_staged:
        mask = bias_tile.stage_words(spec.block_m, spec.block_n, 1, spec.stages)
    return bias, mask


def build(spec: ForwardSpec):
    """Compile-time specialized kernel; launch with grid (cdiv(seqlen_q, block_m),
    heads_q, batch), spec.threads threads and shared_bytes(spec) dynamic shared memory.

    Arguments as the portable kernel's, with q, k, v, out as uint16 views of the
    16-bit data: q (B, Nq, Hq, D), k (B, Nk, Hkv, D), v (B, Nk, Hkv, D), out
    (B, Nq, Hq, D), lse (B, Hq, Nq) float32, scale (float32), group = Hq // Hkv,
    cu_seqlens_q, cu_seqlens_k int32 (ignored unless spec.varlen; packed layout as in
    forward_simt.build), then the variant arguments of nbflash.variants.KERNEL_ARGS
    (read only where spec.variant turns the variant on). Requires 16-byte aligned rows
    of q, k and v (checked by the caller).

    Variants (all behind compile-time flags: a plain spec compiles as before): the
    window starts the key loop at the first tile a row of the CTA can see and ends it
    after the last, and masks only tiles that cross a band edge, as causal does at
    the diagonal. Softcap, ALiBi and bias keep S in "S units" (the comment at
    ALIBI_INIT: softcap's scale folds into the exponent's, ALiBi is linear in the key
    on each side of the diagonal); each thread knows its rows (row0 + warp_row + m * 16 + g + 8 *
    half) and keys (n0 + nb * 8 + 2t + e). The mask hides (-inf); dropout
    multiplies P by keep / (1 - p) after the row sums took the undropped P.
    """
    assert spec.kernel == "mma" and spec.dtype in ("fp16", "bf16")
    assert spec.head_dim == spec.head_dim_v and spec.head_dim in HEAD_DIMS
    mma = ptx.mma_f16 if spec.dtype == "fp16" else ptx.mma_bf16
    pack = ptx.pack_f16x2 if spec.dtype == "fp16" else ptx.pack_bf16x2
    D = spec.head_dim
    BM, BN, T, STAGES = spec.block_m, spec.block_n, spec.threads, spec.stages
    WARPS = T // 32
    M_TILES = BM // (16 * WARPS)  # 16-row slices per warp
    assert M_TILES * 16 * WARPS == BM and BN % 16 == 0 and STAGES == 2 and D % 32 == 0
    ROW_WORDS = D // 2 + PAD_WORDS
    K_OFF = BM * ROW_WORDS
    V_OFF = K_OFF + STAGES * BN * ROW_WORDS
    D_BLOCKS = D // 8  # 8-column blocks of the output
    K_STEPS = D // 16  # k-steps of S = Q K^T
    N_BLOCKS = BN // 8  # 8-key blocks of S
    PV_STEPS = BN // 16  # k-steps of P V
    ACC_REGS = M_TILES * D_BLOCKS * 4
    S_REGS = M_TILES * N_BLOCKS * 4
    Q_REGS = M_TILES * K_STEPS * 4
    ROWS = 2 * M_TILES
    Q_IN_REGS = spec.q_in_registers
    # WIDE (head_dim 192, 256): the O accumulator alone is 96 / 128 registers, and the
    # kernel runs at 254-255. A shfl.sync or vote.sync where ptxas cannot prove the warp
    # converged (after the key loop; anywhere in it when varlen breaks out on a value
    # read from shared memory) gets an out-of-line fallback, an ABI call whose
    # clobbered registers spilled 188 bytes (dense) to 600 (varlen) on sm_80. So the
    # row sums are reduced over the quad inside the loop (2 shuffles per row and tile,
    # next to the row max's) rather than once after it, and varlen's exit is a warp
    # vote, which ptxas knows is uniform.
    WIDE = D > 128
    CAUSAL, WITH_LSE, VARLEN = spec.causal, spec.with_lse, spec.varlen
    NEG_INF = -math.inf
    VAR = spec.variant
    WINDOW, SOFTCAP, ALIBI, MASK, DROPOUT = VAR.window, VAR.softcap, VAR.alibi, VAR.mask, VAR.dropout
    BIAS = bool(VAR.bias)
    # Score modifications: S holds scores in "S units", the true score in exp2 units being
    # S * s_log2 + row_add (row_add: ALiBi's row part, per row and tile; derivation at
    # the S mma), with s_log2 = scale log2(e) (S: q.k, plus ALiBi's key part) or
    # softcap log2(e) (S: tanh(scale q.k / softcap), plus ALiBi's key part); a bias
    # value x is x log2(e) / s_log2 in S units. So the softmax's one FFMA per score
    # (S * s_log2 - offset) serves every variant, and row maxima are taken over S.
    ALIBI_INIT = ALIBI and not SOFTCAP  # ALiBi's key part rides in the S mma's C input
    SCORE_PASS = SOFTCAP or BIAS  # a per-score pass after the S mma
    read_bias = bias_reader(VAR.bias or "fp32")
    # staged bias / mask tiles (kernels/bias_tile.py): stages after V, bias then mask
    BIAS_STAGED, MASK_STAGED = BIAS and VAR.bias_staged, MASK and VAR.mask_staged
    assert not ((BIAS_STAGED or MASK_STAGED) and VARLEN)
    BIAS_WORDS, MASK_WORDS = _staged_words(spec)
    BIAS_OFF = (BM + 2 * STAGES * BN) * (D // 2 + PAD_WORDS)
    MASK_OFF = BIAS_OFF + BIAS_WORDS
    BIAS_STAGE, MASK_STAGE = BIAS_WORDS // STAGES, MASK_WORDS // STAGES  # words per stage
    staged_dtype = VAR.bias if BIAS_STAGED else "fp16"  # (built either way: the kernel closes over them)
    issue_bias = bias_tile.make_issue_tile(BM, BN, bias_tile.ITEMSIZE[staged_dtype], T)
    staged_bias = bias_tile.make_bias_reader(staged_dtype, BN)
    issue_mask = bias_tile.make_issue_tile(BM, BN, 1, T)
    staged_mask = bias_tile.make_mask_reader(BN)
    apply_mask = bias_tile.make_mask_apply(BN, M_TILES)
    SPAN_WORDS = 6 if WINDOW else 5

    issue_rows = make_issue_rows(D, ROW_WORDS, T)

    @cuda.jit(device=True, inline=True)
    def q_fragments(smem, warp_row, kk, lane):
        """A fragments (a0..a3) of Q rows warp_row..+15, columns kk*16..+15."""
        mat = lane // 8
        row = warp_row + (mat % 2) * 8 + lane % 8
        return ptx.ldmatrix_x4(ptx.shared_address(smem, (row * ROW_WORDS + kk * 8 + (mat // 2) * 4,)))

    def forward_mma(q, k, v, out, lse, scale, group, cu_seqlens_q, cu_seqlens_k, window_left, window_right,
                    softcap, alibi, bias, mask, keep_threshold, keep_scale, seed_lo, seed_hi):
        tid = cuda.threadIdx.x
        lane = tid % 32
        warp = tid // 32
        g = lane // 4
        t = lane % 4
        mat = lane // 8  # which 8x8 matrix this lane addresses in ldmatrix
        m_block = cuda.blockIdx.x
        if CAUSAL:  # the longest rows (the last blocks) start first: less tail at the end
            m_block = cuda.gridDim.x - 1 - m_block
        row0 = np.int32(m_block * BM)
        h = cuda.blockIdx.y
        hk = h // group
        if VARLEN:  # one packed sequence per blockIdx.z; rows are offset by its start
            b = 0
            q_start, seqlen_q = sequence_span(cu_seqlens_q, cuda.blockIdx.z, q.shape[1])
            k_start, seqlen_k = sequence_span(cu_seqlens_k, cuda.blockIdx.z, k.shape[1])
        else:
            b = cuda.blockIdx.z
            q_start = np.int32(0)
            k_start = np.int32(0)
            seqlen_q = np.int32(q.shape[1])  # 32-bit row and key arithmetic: fewer registers
            seqlen_k = np.int32(k.shape[1])
        warp_row = warp * 16 * M_TILES  # first row of this warp within the CTA tile
        s_log2 = float32(scale * LOG2E)  # what turns an S value into exp2 units in the softmax
        if SOFTCAP:  # S holds th = tanh(s scale / softcap); the score softcap th is th * s_log2 in exp2 units
            cap_in = float32(scale / softcap)
            s_log2 = float32(softcap * LOG2E)
        if ALIBI:
            slope_log2 = float32(alibi[cuda.blockIdx.z, h] * LOG2E)
            slope_u = slope_log2 / s_log2  # the slope in S units: slope / scale, or slope / softcap
            row_g = float32(warp_row + g)  # this thread's first row, relative to row0
        if BIAS:
            bias_u = float32(LOG2E) / s_log2  # a bias value in S units
        if DROPOUT:  # Philox counts (batch [varlen: sequence] * heads_q + head, row, key)
            bh = np.int32(cuda.blockIdx.z * cuda.gridDim.y + h)

        smem = cuda.shared.array(0, uint32)

        key_end = seqlen_k
        if CAUSAL:
            key_end = max(np.int32(0), min(seqlen_k, row0 + np.int32(BM) + seqlen_k - seqlen_q))
        n_tiles = (key_end + np.int32(BN - 1)) // np.int32(BN)
        tile_first = np.int32(0)
        if WINDOW:  # only the key tiles some row of this CTA sees (causal is folded in)
            first, end = window_key_range(row0, row0 + np.int32(BM), seqlen_q, seqlen_k, window_left, window_right)
            tile_first = np.int32(first // BN)
            n_tiles = (np.int32(end) + np.int32(BN - 1)) // np.int32(BN) - tile_first
        q_rows = True
        if VARLEN:  # the grid covers the longest sequence: this tile may start past ours
            q_rows = row0 < seqlen_q
            if not q_rows:  # (an early return here costs the d128 kernel spills)
                n_tiles = np.int32(0)
        loop_tiles = n_tiles
        if VARLEN:
            # The span lives in shared memory and is re-read where it is used: held in
            # registers across the key loop it pushed d96 and d128 into spills. The loop
            # runs to a bound from the kernel arguments and breaks at the sequence's end.
            span = cuda.shared.array(SPAN_WORDS, int32)
            if tid == 0:
                span[0] = q_start
                span[1] = seqlen_q
                span[2] = k_start
                span[3] = seqlen_k
                span[4] = n_tiles
                if WINDOW:
                    span[5] = tile_first
            cuda.syncthreads()
            loop_tiles = (np.int32(k.shape[1]) + np.int32(BN - 1)) // np.int32(BN)

        if q_rows:
            issue_rows(q, smem, 0, BM, b, h, q_start, row0, seqlen_q, tid)
        if n_tiles > 0:
            issue_rows(k, smem, K_OFF, BN, b, hk, k_start, tile_first * BN, seqlen_k, tid)
            issue_rows(v, smem, V_OFF, BN, b, hk, k_start, tile_first * BN, seqlen_k, tid)
            if BIAS_STAGED:
                issue_bias(bias, smem, BIAS_OFF, b, h, row0, seqlen_q, tile_first * BN, seqlen_k, tid)
            if MASK_STAGED:
                issue_mask(mask, smem, MASK_OFF, b, h, row0, seqlen_q, tile_first * BN, seqlen_k, tid)
        ptx.cp_async_commit()

        q_frag = cuda.local.array(Q_REGS, uint32)
        if Q_IN_REGS:
            ptx.cp_async_wait_group(0)
            cuda.syncthreads()
            for m in range(M_TILES):
                for kk in range(K_STEPS):
                    i = (m * K_STEPS + kk) * 4
                    q_frag[i], q_frag[i + 1], q_frag[i + 2], q_frag[i + 3] = q_fragments(
                        smem, warp_row + m * 16, kk, lane)
        acc = cuda.local.array(ACC_REGS, float32)
        for i in range(ACC_REGS):
            acc[i] = 0
        s = cuda.local.array(S_REGS, float32)
        m_i = cuda.local.array(ROWS, float32)
        l_i = cuda.local.array(ROWS, float32)
        alpha_r = cuda.local.array(ROWS, float32)
        for r in range(ROWS):
            m_i[r] = NEG_INF
            l_i[r] = 0

        for it in range(loop_tiles):
            if VARLEN:
                if WIDE:  # a vote: ptxas then knows the exit is warp-uniform (see WIDE)
                    if ptx.vote_any(it >= span[4]):
                        break
                elif it >= span[4]:
                    break
            stage = it % 2
            n0 = np.int32(it * BN)
            if WINDOW:
                if VARLEN:
                    tile_first = span[5]
                n0 = np.int32((tile_first + it) * BN)
            k_base = K_OFF + stage * BN * ROW_WORDS
            v_base = V_OFF + stage * BN * ROW_WORDS
            more = it + 1 < n_tiles
            if VARLEN:
                k_start = span[2]
                seqlen_k = span[3]
                more = it + 1 < span[4]
            if more:
                nxt = (1 - stage) * BN * ROW_WORDS
                issue_rows(k, smem, K_OFF + nxt, BN, b, hk, k_start, n0 + BN, seqlen_k, tid)
                issue_rows(v, smem, V_OFF + nxt, BN, b, hk, k_start, n0 + BN, seqlen_k, tid)
                if BIAS_STAGED:
                    issue_bias(bias, smem, BIAS_OFF + (1 - stage) * BIAS_STAGE, b, h, row0, seqlen_q, n0 + BN,
                               seqlen_k, tid)
                if MASK_STAGED:
                    issue_mask(mask, smem, MASK_OFF + (1 - stage) * MASK_STAGE, b, h, row0, seqlen_q, n0 + BN,
                               seqlen_k, tid)
            ptx.cp_async_commit()
            ptx.cp_async_wait_group(1)  # this tile's group (and Q) has landed
            cuda.syncthreads()

            if ALIBI:
                # -slope |c_i - j| with c_i = i + seqlen_k - seqlen_q, relative to c0, the CTA's
                # first row's diagonal (c_i - c0 = i - row0): a key tile at or left of every
                # row's diagonal (n0 + BN - 1 <= c0) has -slope (c_i - j) = slope (j - c0) -
                # slope (i - row0); one right of every diagonal (n0 >= c0 + BM - 1) the mirror
                # image -slope (j - c0) + slope (i - row0). The key part, col_step (j - c0) in
                # S units (col_step = +-slope_u), is the S mma's initial C (no softcap) or is
                # added after the tanh (softcap: the cap applies to scale q.k only); the row
                # part, row_step (i - row0) in exp2 units, joins the row's max and exponent
                # offset once per row. Values stay relative to c0, small near the diagonal,
                # where float32 precision matters. A tile crossing the diagonals takes
                # col_step = row_step = 0 and the exact per-score term below
                # (score_mods.alibi_split). Only the key part's start is made before
                # the mma, the rest after it: values held across the mma cost the
                # non-causal d128 kernel spills.
                if VARLEN:
                    seqlen_q = span[1]
                if ALIBI_INIT:
                    col_step, _, c0, _ = alibi_split(row0, np.int32(BM), n0, np.int32(BN), seqlen_q, seqlen_k,
                                                     slope_u, slope_log2)
                    col0 = col_step * float32(n0 - c0 + np.int32(2) * t)  # key n0 + 2t
            # S = Q K^T: each K fragment pair feeds M_TILES mma per k-step
            for m in range(M_TILES):
                for nb in range(N_BLOCKS):
                    for r in range(4):
                        if ALIBI_INIT:  # key n0 + 8 nb + 2t + r % 2
                            s[(m * N_BLOCKS + nb) * 4 + r] = col0 + col_step * float32(nb * 8 + r % 2)
                        else:
                            s[(m * N_BLOCKS + nb) * 4 + r] = 0
            for kk2 in range(K_STEPS // 2):
                for nb in range(N_BLOCKS):
                    key = nb * 8 + lane % 8
                    b0, b1, b2, b3 = ptx.ldmatrix_x4(
                        ptx.shared_address(smem, (k_base + key * ROW_WORDS + kk2 * 16 + mat * 4,)))
                    for m in range(M_TILES):
                        for half_k in range(2):
                            kk = 2 * kk2 + half_k
                            if Q_IN_REGS:
                                i = (m * K_STEPS + kk) * 4
                                a0, a1, a2, a3 = q_frag[i], q_frag[i + 1], q_frag[i + 2], q_frag[i + 3]
                            else:
                                a0, a1, a2, a3 = q_fragments(smem, warp_row + m * 16, kk, lane)
                            lo = b0 if half_k == 0 else b2
                            hi = b1 if half_k == 0 else b3
                            j = (m * N_BLOCKS + nb) * 4
                            s[j], s[j + 1], s[j + 2], s[j + 3] = mma(
                                a0, a1, a2, a3, lo, hi, s[j], s[j + 1], s[j + 2], s[j + 3])

            if VARLEN:
                seqlen_q = span[1]
                seqlen_k = span[3]
            if ALIBI:
                col_step, row_step, c0, crossing = alibi_split(row0, np.int32(BM), n0, np.int32(BN), seqlen_q,
                                                               seqlen_k, slope_u, slope_log2)
                col0 = col_step * float32(n0 - c0 + np.int32(2) * t)  # key n0 + 2t
            if SCORE_PASS:  # softcap, ALiBi's key part under softcap, bias: in S units
                for m in range(M_TILES):
                    for half in range(2):
                        i = np.int32(row0 + warp_row + m * 16 + g + 8 * half)
                        if BIAS:
                            i_read = min(i, seqlen_q - np.int32(1))  # rows past seqlen_q are never stored
                        for nb in range(N_BLOCKS):
                            for e in range(2):
                                idx = (m * N_BLOCKS + nb) * 4 + 2 * half + e
                                x = s[idx]
                                # softcap: one MUFU op, softcap log2(e) folded into s_log2.
                                # tanh.approx.f32's relative error is at most 2**-11 (PTX ISA),
                                # so the capped score t carries |t| 2**-11 at most: t rounded
                                # to fp16's 11 significant bits (P is rounded to 16 bits too)
                                if SOFTCAP:
                                    x = ptx.tanh_approx(x * cap_in)
                                    if ALIBI:
                                        x += col0 + col_step * float32(nb * 8 + e)
                                if BIAS_STAGED:  # zero-filled past seqlen_q / seqlen_k (masked below)
                                    x += staged_bias(smem, BIAS_OFF + stage * BIAS_STAGE,
                                                     warp_row + m * 16 + g + 8 * half, nb, t, e) * bias_u
                                elif BIAS:  # keys past seqlen_k are masked below
                                    jj = np.int32(n0 + nb * 8 + 2 * t + e)
                                    x += read_bias(bias, b, h, i_read, min(jj, seqlen_k - np.int32(1))) * bias_u
                                s[idx] = x
            if ALIBI:
                if crossing:  # the exact term, -slope_u |c_i - j| in S units, per score
                    # c_i - j = dist0 + (16 m + 8 half) - (8 nb + e) for this thread's first row
                    # and key: one conversion per tile, a float constant per score (integers
                    # are exact in float32 below 2**24)
                    dist0 = float32(row0 + np.int32(warp_row) + g + seqlen_k - seqlen_q - n0 - np.int32(2) * t)
                    for m in range(M_TILES):
                        for half in range(2):
                            for nb in range(N_BLOCKS):
                                for e in range(2):
                                    s[(m * N_BLOCKS + nb) * 4 + 2 * half + e] -= slope_u * abs(
                                        dist0 + float32(m * 16 + 8 * half - nb * 8 - e))

            # mask only tiles that cross seqlen_k, the causal diagonal or a window edge
            needs_mask = n0 + BN > seqlen_k
            if CAUSAL and not WINDOW:
                needs_mask = needs_mask or (n0 + BN - 1 > row0 + seqlen_k - seqlen_q)
            if WINDOW:
                diagonal0 = row0 + seqlen_k - seqlen_q  # the first row's diagonal
                needs_mask = needs_mask or (n0 + BN - 1 > diagonal0 + window_right)
                needs_mask = needs_mask or (n0 < diagonal0 + np.int32(BM - 1) - window_left)
            if MASK and not MASK_STAGED:  # read per element, beside the bounds
                needs_mask = True
            if MASK_STAGED and not needs_mask:  # a tile inside every bound: the mask bytes alone
                apply_mask(s, smem, MASK_OFF + stage * MASK_STAGE, warp_row, g, t)
            if needs_mask:
                for m in range(M_TILES):
                    for half in range(2):
                        # keys of this tile row i sees: columns in [lowest, visible) (32-bit, once per row)
                        visible = np.int32(seqlen_k - n0)
                        i = np.int32(row0 + warp_row + m * 16 + g + 8 * half)
                        if CAUSAL and not WINDOW:
                            visible = min(visible, i + np.int32(seqlen_k - seqlen_q - n0 + 1))
                        if WINDOW:
                            visible = min(visible, i + np.int32(seqlen_k - seqlen_q - n0 + 1) + window_right)
                            lowest = i + np.int32(seqlen_k - seqlen_q - n0) - window_left
                        if MASK and not MASK_STAGED:
                            i_read = min(i, seqlen_q - np.int32(1))
                        for nb in range(N_BLOCKS):
                            if MASK_STAGED:
                                bits = staged_mask(smem, MASK_OFF + stage * MASK_STAGE,
                                                   warp_row + m * 16 + g + 8 * half, nb, t)
                            for e in range(2):
                                col = np.int32(nb * 8 + 2 * t + e)
                                hide = col >= visible
                                if WINDOW:
                                    hide = hide or col < lowest
                                if MASK_STAGED:
                                    hide = hide or bits & uint32(0xFF << (8 * e)) == uint32(0)
                                elif MASK:
                                    if not hide:
                                        hide = mask[b, h, i_read, n0 + col] == 0
                                if hide:
                                    s[(m * N_BLOCKS + nb) * 4 + 2 * half + e] = NEG_INF

            # online softmax, exp2 domain (FlashAttention-2, Algorithm 1, lines 8-10): the
            # new row maxima first, then acc and l rescaled only when a maximum of the warp's
            # rows moved (alpha != 1: after the first tiles it rarely does, and the rescale is
            # one FMUL per acc register, as many as the tile's scores), then P
            rescale = False
            for m in range(M_TILES):
                for half in range(2):
                    row = 2 * m + half
                    row_max = float32(NEG_INF)
                    for nb in range(N_BLOCKS):
                        j = (m * N_BLOCKS + nb) * 4 + 2 * half
                        row_max = max(row_max, max(s[j], s[j + 1]))
                    row_max = max(row_max, ptx.shfl_xor(row_max, 1))
                    row_max = max(row_max, ptx.shfl_xor(row_max, 2))
                    if ALIBI:  # this tile's row part of ALiBi (exp2 units)
                        # (row_step (warp_row + g) + row_step (16 m + 8 half): a float32
                        # of the whole row offset would be hoisted out of the key loop,
                        # one register per row held across it)
                        row_add = row_step * row_g + row_step * float32(m * 16 + 8 * half)
                        m_new = max(m_i[row], row_max * s_log2 + row_add)
                    else:
                        m_new = max(m_i[row], row_max * s_log2)
                    m_use = m_new if m_new != NEG_INF else float32(0)
                    alpha = ptx.ex2(m_i[row] - m_use)
                    alpha_r[row] = alpha
                    rescale = rescale or alpha != float32(1)
                    m_i[row] = m_new
            if ptx.vote_any(rescale):  # warp-uniform: skipping a multiply by 1 is exact
                for m in range(M_TILES):
                    for half in range(2):
                        row = 2 * m + half
                        l_i[row] *= alpha_r[row]
                        for db in range(D_BLOCKS):
                            j = (m * D_BLOCKS + db) * 4 + 2 * half
                            acc[j] *= alpha_r[row]
                            acc[j + 1] *= alpha_r[row]
            for m in range(M_TILES):
                for half in range(2):
                    row = 2 * m + half
                    m_sub = m_i[row] if m_i[row] != NEG_INF else float32(0)  # exponent offset of S * s_log2
                    if ALIBI:  # minus the row part (recomputed: held across the rescale it costs registers)
                        m_sub -= row_step * row_g + row_step * float32(m * 16 + 8 * half)
                    row_sum = float32(0)
                    if DROPOUT:  # keep bit 2 nb + e of this row's keys, first, in a loop of its
                        # own: Philox inside the loop below stops its unrolling (s to local memory)
                        i = np.int32(row0 + warp_row + m * 16 + g + 8 * half)
                        keep_bits = uint32(0)
                        for nb in range(N_BLOCKS):  # one Philox call covers this thread's two keys
                            keep0, keep1 = keep_pair(seed_lo, seed_hi, bh, i, np.int32(n0 + nb * 8 + 2 * t),
                                                     keep_threshold)
                            keep_bits |= (uint32(keep0) | (uint32(keep1) << uint32(1))) << uint32(2 * nb)
                    for nb in range(N_BLOCKS):
                        for e in range(2):
                            j = (m * N_BLOCKS + nb) * 4 + 2 * half + e
                            p = ptx.ex2(s[j] * s_log2 - m_sub)
                            row_sum += p  # l_i sums P before dropout
                            if DROPOUT:
                                if (keep_bits >> uint32(2 * nb + e)) & uint32(1):
                                    p = p * keep_scale
                                else:
                                    p = float32(0)
                            s[j] = p
                    if WIDE:  # the whole row's sum (see WIDE)
                        row_sum += ptx.shfl_xor(row_sum, 1)
                        row_sum += ptx.shfl_xor(row_sum, 2)
                    l_i[row] += row_sum  # partial over this thread's columns unless WIDE

            # acc += P V: P's C fragments, packed to 16 bits, are the A fragments
            for kk in range(PV_STEPS):
                key = kk * 16 + (mat % 2) * 8 + lane % 8
                for db2 in range(D_BLOCKS // 2):
                    b0, b1, b2, b3 = ptx.ldmatrix_x4_trans(
                        ptx.shared_address(smem, (v_base + key * ROW_WORDS + db2 * 8 + (mat // 2) * 4,)))
                    for m in range(M_TILES):
                        j0 = (m * N_BLOCKS + 2 * kk) * 4
                        j1 = j0 + 4
                        a0 = pack(s[j0], s[j0 + 1])
                        a1 = pack(s[j0 + 2], s[j0 + 3])
                        a2 = pack(s[j1], s[j1 + 1])
                        a3 = pack(s[j1 + 2], s[j1 + 3])
                        d = (m * D_BLOCKS + 2 * db2) * 4
                        acc[d], acc[d + 1], acc[d + 2], acc[d + 3] = mma(
                            a0, a1, a2, a3, b0, b1, acc[d], acc[d + 1], acc[d + 2], acc[d + 3])
                        d += 4
                        acc[d], acc[d + 1], acc[d + 2], acc[d + 3] = mma(
                            a0, a1, a2, a3, b2, b3, acc[d], acc[d + 1], acc[d + 2], acc[d + 3])
            cuda.syncthreads()  # everyone is done with this stage before it is refilled

        ptx.cp_async_wait_group(0)
        if VARLEN:
            q_start = span[0]
            seqlen_q = span[1]
        for m in range(M_TILES):
            for half in range(2):
                row = 2 * m + half
                l_sum = l_i[row]
                if not WIDE:
                    l_sum += ptx.shfl_xor(l_sum, 1)
                    l_sum += ptx.shfl_xor(l_sum, 2)
                inv = float32(0)
                if l_sum > 0:
                    inv = float32(1) / l_sum
                i = row0 + warp_row + m * 16 + g + 8 * half
                if i < seqlen_q:
                    for db in range(D_BLOCKS):
                        j = (m * D_BLOCKS + db) * 4 + 2 * half
                        word = pack(acc[j] * inv, acc[j + 1] * inv)
                        col = db * 8 + 2 * t
                        out[b, q_start + i, h, col] = np.uint16(word & 0xFFFF)
                        out[b, q_start + i, h, col + 1] = np.uint16(word >> 16)
                    if WITH_LSE and t == 0:
                        if l_sum > 0:
                            lse[b, h, q_start + i] = m_i[row] * LN2 + math.log(l_sum)
                        else:
                            lse[b, h, q_start + i] = NEG_INF

    return cuda.jit(forward_mma, fastmath={"contract"})
