"""The Hopper backward kernels (sm_90a): FlashAttention-2's backward on warpgroup MMA,
fp16 and bf16, head_dim 64 and 128, dense; the fused dK/dV/dQ kernel also takes a
sliding window, softcap, ALiBi, a staged 16-bit bias and a staged mask
(tuning.wgmma_bwd_variant; the other variants, and these under deterministic=True,
keep backward_mma).

The math is backward_mma's (P recomputed from the forward's lse, delta = rowsum(dO O)
from the portable preprocess kernel):
    dV = P^T dO,    dP = dO V^T,    dS = P * (dP - delta),
    dK = scale dS^T Q,    dQ = scale dS K,
either fused into one kernel with float32 reductions (the default; 5 matmuls) or, for
deterministic=True, in two kernels that use no atomics (bitwise repeatable; 7 matmuls):

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

dK/dV/dQ ("dkdvq", block_m 64: the M of the dQ wgmma): the same loop, and dS^T also
goes to shared memory (row = key, column = query, the tile layout) before dK's wgmma
takes ds as its A operand; after a CTA barrier warpgroup w computes dQ = dS K for its head_dim / warpgroups
columns over all block_n keys (ss wgmma, dS^T read MN-major through imm-trans-a, K
MN-major), tuning.wgmma_bwd_dq_cols at a time. The finished dQ goes to a float32
staging buffer in fragment order (staging_word; two buffers by tile parity) and, after
the loop's barrier, thread 0 adds the whole tile into the accumulator (batch, heads,
query tiles, block_m x head_dim) with one cp.reduce.async.bulk ... add.f32; "dq_convert"
then scales it and rounds it to 16 bits. Where one chunk covers the warpgroup's
columns (head_dim 64) the dQ wgmma of a tile is issued in the next tile's iteration,
beside S^T and dP^T, so that it runs under P's and dS's arithmetic. Keys past seqlen_k
get P = 0 (their zero-filled K rows give S = 0, and exp2(-lse) may be inf).
Per-element red.global.add (.v2 or .v4) in place of the bulk reduce measured 10-20%
slower at head_dim 64 (perf/NOTES.md, session 7).

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

Variants ("dkdvq" only, compiled in from spec.variant): a window visits only the query
tiles from the first to the last row that sees some key of the CTA
(score_mods.window_query_range; causal is folded into window_right) and masks only
tiles crossing a band edge; ALiBi subtracts slope log2(e) |i + seqlen_k - seqlen_q - j|
inside P's exponent (a constant per score has no gradient, so dS is unchanged);
softcap computes P = exp2(th softcap log2(e) - lse log2(e)) with th = tanh.approx(scale
q.k / softcap), as the forward does, and multiplies dS by tanh's derivative 1 - th^2,
th recovered from P itself, (lg2(P) + lse log2(e)) / (softcap log2(e)) (one MUFU
operation and no registers held from P to dS; where P = 0, dS is 0 anyway).

Bias and mask ("dkdvq" only): one shared stage each holds the tile of the current
(query head, query tile) x the CTA's keys, rows queries (kernels/bias_tile.py). The
16-bit bias is swizzled (16-byte chunk c of row r at c ^ (r % 8)) and read with
ldmatrix.x4.trans, which hands each thread the two query columns of one key row that
the S^T accumulator holds (4 loads for a thread's 32 scores); it is added in P's
exponent, bias log2(e), and, a constant per score, leaves dS as it is. The mask's rows
are padded by 16 bytes and read one word a score (P = 0 where its byte is 0). The next
tile's bias / mask is issued in a cp.async group of its own after a barrier that
follows this tile's reads (the dQ barrier; at head_dim 64, one after dV's wgmma is
issued) and waited for only once the next S^T is in, so that it loads under dK, dQ and
S^T; one stage each is what fits beside the head_dim 128 kernel's 210 KB (a bias and a
mask together do not: api_backward sends those to backward_mma).

Launch contract: backward_mma.launch_backward's for the "dkdv", "dkdvq" and "dq" parts (same
arguments, grids and shared_bytes through launch.shared_bytes), so the API runs either
family through one launcher; window_left, window_right and alibi are read where
spec.variant says so, the other variant and the cu_seqlens arguments never.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import cuda
from numba.cuda import float32, uint32

from .. import tuning
from ..spec import BackwardMmaSpec
from . import bias_tile, ptx
from . import ptx_wgmma as wg
from .forward_wgmma import K_MAJOR_LBO, make_issue_tile
from .score_mods import tile_crosses_band, window_query_range

LOG2E = 1.4426950408889634
HEAD_DIMS = (64, 128)
STAGES = 2
ZERO = np.int32(0)  # make_issue_tile's row offset: dense tensors start at row 0


class DkdvLayout(NamedTuple):
    """Word offsets of the dK/dV kernel's shared buffers, in their order (_dkdv_layout)."""

    k: int
    v: int
    q: int  # Q stages
    do: int  # dO stages
    ds: int  # "dkdvq": the dS^T tile (two with _dq_deferred)
    staging: int  # "dkdvq": dQ's float32 staging before its bulk reduce
    lse: int  # lse stages
    delta: int  # delta stages
    bias: int  # the bias stage (_staged_words), 128-byte aligned
    mask: int  # the mask stage
    end: int


def _dkdv_layout(spec) -> DkdvLayout:
    """Word offsets of the dK/dV kernel's shared buffers: K, V, Q stages, dO stages,
    with "dkdvq" the dS^T tile (16-bit swizzled tiles, each 1024-byte aligned), then lse
    and delta stages, the bias and mask stages (_staged_words) and the end."""
    kv = wg.tile_bytes(spec.block_n, spec.head_dim) // 4
    qt = wg.tile_bytes(spec.block_m, spec.head_dim) // 4
    k_off, v_off = 0, kv
    q_off = 2 * kv
    do_off = q_off + STAGES * qt
    ds_off = do_off + STAGES * qt
    fused = spec.part == "dkdvq"
    ds_words = wg.tile_bytes(spec.block_n, spec.block_m) // 4 * (2 if _dq_deferred(spec) else 1) if fused else 0
    staging_off = ds_off + ds_words
    lse_off = staging_off + (STAGES * spec.block_m * spec.head_dim if fused else 0)
    delta_off = lse_off + STAGES * spec.block_m
    bias_off = -(-(delta_off + STAGES * spec.block_m) // 32) * 32  # 128-byte aligned: the swizzle's banks
    bias_words, mask_words = _staged_words(spec)
    mask_off = bias_off + bias_words
    return DkdvLayout(k_off, v_off, q_off, do_off, ds_off, staging_off, lse_off, delta_off, bias_off, mask_off,
                      mask_off + mask_words)


def _staged_words(spec):
    """Words of the bias and mask stages (0 for a variant without them): one tile of
    block_m queries x block_n keys each, refilled once a tile (_build_dkdv); the bias
    swizzled for ldmatrix.trans, the mask padded (bias_tile)."""
    var = spec.variant
    bias = spec.block_m * spec.block_n * bias_tile.ITEMSIZE[var.bias] // 4 if var.bias else 0
    mask = spec.block_m * bias_tile.transposed_mask_row_words(spec.block_n) if var.mask else 0
    return bias, mask


def _dq_deferred(spec):
    """Whether the fused kernel issues a query tile's dQ wgmma in the next tile's
    iteration, beside its S^T and dP^T, so that it runs under P's and dS's arithmetic
    (two dS^T buffers), instead of right after dK with nothing to hide it: where one
    chunk covers the warpgroup's columns (its accumulator then lives through P and dS,
    which only the head_dim 64 kernel has the registers for)."""
    return spec.head_dim // (spec.threads // 128) <= tuning.wgmma_bwd_dq_cols(spec.head_dim)


@cuda.jit(device=True, inline=True)
def staging_word(wgi, block, half, e, lane, nq):
    """Word of dQ element (row 16w + g + 8 half, column wgi nq + 8 block + 2t + e) of a
    query tile in the fused kernel's staging buffer, and of the tile in the float32
    accumulator it is added into (lane = 32w + 4g + t of the warpgroup): fragment order,
    so that a warp's 32 stores of one (block, half, e) are consecutive words (no bank
    conflicts); dq_convert reads it back in this order."""
    return wgi * 64 * nq + ((block * 2 + half) * 2 + e) * 128 + lane


def _make_stage_dq(cols, nq):
    BLOCKS = cols // 8

    @cuda.jit(device=True, inline=True)
    def stage_dq(at, dq, wgi, block0, lane):
        """The dQ accumulator (columns 8 block0 .. of the warpgroup's nq) into the
        staging buffer at shared address ``at`` (staging_word's order), as float32 bits."""
        mine = at + uint32(4 * staging_word(wgi, block0, 0, 0, lane, nq))
        for j in range(BLOCKS):
            for half in range(2):
                for e in range(2):
                    ptx.st_shared_u32(mine + uint32(4 * (staging_word(0, j, half, e, 0, nq))),
                                      ptx.f32_as_u32(dq[4 * j + 2 * half + e]))

    return stage_dq


def _dq_layout(spec):
    """Word offsets of the dQ kernel's shared buffers: Q, dO, K stages, V stages."""
    qt = wg.tile_bytes(spec.dq_block_m, spec.head_dim) // 4
    kv = wg.tile_bytes(spec.dq_block_n, spec.head_dim) // 4
    k_off = 2 * qt
    v_off = k_off + STAGES * kv
    return 0, qt, k_off, v_off, v_off + STAGES * kv


def shared_bytes(spec: BackwardMmaSpec) -> int:
    words = _dkdv_layout(spec).end if spec.part in ("dkdv", "dkdvq") else _dq_layout(spec)[-1]
    return 4 * words + wg.TILE_ALIGN


def build(spec: BackwardMmaSpec):
    """The kernel of spec.part ("dkdv", "dkdvq", "dq" or "dq_convert"); see the module
    docstring."""
    assert spec.wgmma and spec.dtype in ("fp16", "bf16") and spec.head_dim in HEAD_DIMS
    assert not spec.varlen and not spec.dbias
    assert not spec.variant or (spec.part in ("dkdvq", "dq_convert")
                                and tuning.wgmma_bwd_variant(spec.variant, spec.head_dim, scores=True)), spec.key
    if spec.part in ("dkdv", "dkdvq"):
        return _build_dkdv(spec)
    if spec.part == "dq":
        return _build_dq(spec)
    if spec.part == "dq_convert":
        return _build_convert(spec)
    raise ValueError(f"spec.part: expected dkdv, dkdvq, dq or dq_convert for the wgmma backward; got {spec.part!r}")


@cuda.jit(device=True, inline=True)
def _lse_log2(lse, b, h, i, seqlen_q):
    """lse log2(e) of row i; +inf past seqlen_q or where the row sees no key (lse -inf),
    so that P = exp2(s - it) is 0 there."""
    x = float32(math.inf)
    if i < seqlen_q:
        y = lse[uint32(b), uint32(h), uint32(i)]
        if y != -math.inf:
            x = y * float32(LOG2E)
    return x


@cuda.jit(device=True, inline=True)
def _delta_of(delta, b, h, i, seqlen_q):
    x = float32(0)
    if i < seqlen_q:
        x = delta[uint32(b), uint32(h), uint32(i)]
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
    layout = _dkdv_layout(spec)
    K_OFF, V_OFF, Q_OFF, DO_OFF, DS_OFF = layout.k, layout.v, layout.q, layout.do, layout.ds
    STAGING_OFF, LSE_OFF, DELTA_OFF, BIAS_OFF, MASK_OFF = layout.staging, layout.lse, layout.delta, layout.bias, layout.mask
    # 8-byte lse / delta pairs (ld.shared.v2); dS^T tiles 1024-byte aligned (the XOR swizzle)
    assert LSE_OFF % 2 == 0 and DELTA_OFF % 2 == 0 and BM % 2 == 0, (LSE_OFF, DELTA_OFF)
    assert spec.part != "dkdvq" or (DS_OFF % (wg.TILE_ALIGN // 4) == 0 and wg.tile_bytes(BN, BM) % wg.TILE_ALIGN == 0)
    WITH_DQ = spec.part == "dkdvq"
    WARPGROUPS = T // 128
    # dQ = dS K per query tile: warpgroup w takes head-dim columns [w NQ, (w + 1) NQ)
    # over all BN keys, DQ_COLS at a time (N of the wgmma), A = dS^T read MN-major
    NQ = D // WARPGROUPS
    DQ_COLS = min(tuning.wgmma_bwd_dq_cols(D), NQ)
    DQ_CHUNKS, DQ_REGS, DQ_BLOCKS, KEY_STEPS = NQ // DQ_COLS, DQ_COLS // 2, DQ_COLS // 8, BN // 16
    if WITH_DQ:  # wgmma's M is 64 query rows; a chunk stays inside one 64-column panel of K
        assert BM == 64 and NQ % DQ_COLS == 0 and wg.PANEL_COLS % DQ_COLS == 0, (BM, NQ, DQ_COLS)
        mma_dq = wg.wgmma_ss(spec.dtype, DQ_COLS, True, trans_a=True)
    else:
        mma_dq = mma_t  # never called
    DEFER = WITH_DQ and _dq_deferred(spec)
    DS_WORDS = wg.tile_bytes(BN, BM) // 4 if WITH_DQ else 0
    STAGING_WORDS = BM * D
    stage_dq = _make_stage_dq(DQ_COLS, NQ)

    Q_BYTES = wg.tile_bytes(BM, D)
    Q_WORDS = Q_BYTES // 4
    KV_PANEL, Q_PANEL = wg.panel_bytes(BN), wg.panel_bytes(BM)
    WG_ROWS_WORDS = 64 * wg.SWIZZLE_BYTES // 4
    S_REGS, ACC_REGS, P_REGS = BM // 2, D // 2, BM // 4
    K_STEPS, M_STEPS, S_BLOCKS = D // 16, BM // 16, BM // 8
    CAUSAL = spec.causal
    WINDOW, ALIBI, SOFTCAP = spec.variant.window, spec.variant.alibi, spec.variant.softcap
    EXP2_FMA = spec.exp2_fma
    assert 0 <= EXP2_FMA <= 4 and (SOFTCAP or not EXP2_FMA), spec.key
    assert not (SOFTCAP and ALIBI)  # tuning.wgmma_bwd_variant
    # bias / mask: one stage each, tile (query tile, key block) refilled once a tile
    BIAS, MASK = bool(spec.variant.bias), spec.variant.mask
    STAGED = BIAS or MASK
    assert (not STAGED or WITH_DQ) and not (SOFTCAP and BIAS), spec.key  # tuning.wgmma_bwd_variant
    assert (not BIAS or spec.variant.bias_staged) and (not MASK or spec.variant.mask_staged), spec.key
    issue_bias = bias_tile.make_issue_tile(BM, BN, 2, T, swizzle=True)
    issue_mask = bias_tile.make_issue_tile(BM, BN, 1, T, rw=bias_tile.transposed_mask_row_words(BN))
    bias_lane_offset, BIAS_ROW_BYTES, bias_f32 = bias_tile.make_transposed_bias_reader(
        spec.variant.bias if BIAS else "fp16", BN)
    mask_lane_offset, MASK_ROW_BYTES = bias_tile.make_transposed_mask_reader(BN)
    issue_kv = make_issue_tile(D, BN, T)
    issue_q = make_issue_tile(D, BM, T)

    @cuda.jit(device=True, inline=True)
    def next_tile(h, m0, m_begin, m_end):
        """(query head, first row) of the iteration after (h, m0): the next query tile of
        head h, or head h + 1's first (iterations run the query tiles m_begin .. m_end of
        each head of the GQA group in turn); stepped, not divided out of the iteration
        count (a division is ~25 instructions an iteration)."""
        m1 = m0 + np.int32(BM)
        if m1 >= m_end:
            return h + uint32(1), m_begin
        return h, m1

    @cuda.jit(device=True, inline=True)
    def issue_scores(bias, mask, smem, base, b, h, m0, seqlen_q, n0, seqlen_k, tid):
        """cp.async the bias and mask tiles of query tile m0 of head h into their stages."""
        if BIAS:
            issue_bias(bias, smem, base + BIAS_OFF, b, h, m0, seqlen_q, n0, seqlen_k, tid)
        if MASK:
            issue_mask(mask, smem, base + MASK_OFF, b, h, m0, seqlen_q, n0, seqlen_k, tid)

    @cuda.jit(device=True, inline=True)
    def issue_next_scores(bias, mask, smem, base, b, h, m0, m_begin, m_end, it, total, seqlen_q, n0, seqlen_k, tid):
        """The next iteration's bias and mask tiles (when there is one), one committed
        group; called after a barrier that every reader of this tile's has passed."""
        if it + 1 < total:
            h1, m1 = next_tile(h, m0, m_begin, m_end)
            issue_scores(bias, mask, smem, base, b, h1, m1, seqlen_q, n0, seqlen_k, tid)
        ptx.cp_async_commit()

    @cuda.jit(device=True, inline=True)
    def reduce_tile(dq_acc, b, h, m0, smem, staging):
        """One bulk reduce (one committed bulk group) of the staging buffer at word
        ``staging`` into query tile m0 of head h in dq_acc; issued by one thread."""
        wg.bulk_reduce_add_f32(ptx.global_address(dq_acc, (b, h, m0 // np.int32(BM), 0)),
                               ptx.shared_address(smem, (staging,)), STAGING_WORDS * 4)
        wg.bulk_commit()

    @cuda.jit(device=True, inline=True)
    def issue_dq(dq, desc_ds, desc_kt, ds_bytes, col0):
        """dq = dS K, columns col0 .. col0 + DQ_COLS, dS^T at desc_ds + ds_bytes; one
        committed group."""
        desc_a = wg.desc_add(desc_ds, ds_bytes)
        desc_b = wg.desc_add(desc_kt, col0 // wg.PANEL_COLS * KV_PANEL + col0 % wg.PANEL_COLS * 2)
        wg.wgmma_fence()
        mma_dq(dq, desc_a, desc_b, 0)
        for kk in range(1, KEY_STEPS):
            mma_dq(dq, wg.desc_add(desc_a, kk * 2 * wg.SBO_BYTES), wg.desc_add(desc_b, kk * 2 * wg.SBO_BYTES), 1)
        wg.wgmma_commit()

    def backward_dkdv_wgmma(q, k, v, do, lse, delta, dk, dv, dq_acc, scale, group,
                            window_left, window_right, softcap, alibi, bias, mask,
                            keep_threshold, keep_scale, seed_lo, seed_hi, dbias, cu_seqlens_q, cu_seqlens_k):
        tid = cuda.threadIdx.x
        lane = tid % 32
        wgi = ptx.warp_uniform(np.int32(tid // 128)) if T > 128 else 0
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
        if SOFTCAP:  # P = exp2(tanh(cap_in q.k) s_log2 - lse log2(e))
            cap_in = float32(scale / softcap)
            s_log2 = float32(softcap * LOG2E)
            inv_s_log2 = float32(1) / s_log2

        smem = cuda.shared.array(0, uint32)
        base = wg.shared_align_words(smem)
        at_base = ptx.shared_address(smem, (base,))  # byte addresses from here on: ld/st_shared_u32

        m_begin = np.int32(0)
        m_stop = seqlen_q  # the query tiles m_begin .. cover the rows up to m_stop
        if WINDOW:  # the rows that see some key of the CTA (causal folded into window_right)
            q_first, m_stop = window_query_range(n0, n0 + np.int32(BN), seqlen_q, seqlen_k, window_left,
                                                 window_right)
            m_begin = q_first // np.int32(BM) * np.int32(BM)
            if m_stop <= q_first:
                m_stop = m_begin
        elif CAUSAL:  # the first query tile with a row that sees key n0
            m_begin = max(np.int32(0), n0 - shift) // np.int32(BM) * np.int32(BM)
        m_tiles = max(np.int32(0), (m_stop - m_begin + np.int32(BM - 1)) // np.int32(BM))
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
                ptx.st_shared_u32(at_base + uint32(4 * (LSE_OFF + tid)),
                                  ptx.f32_as_u32(_lse_log2(lse, b, h0, m_begin + tid, seqlen_q)))
                ptx.st_shared_u32(at_base + uint32(4 * (DELTA_OFF + tid)),
                                  ptx.f32_as_u32(_delta_of(delta, b, h0, m_begin + tid, seqlen_q)))
        ptx.cp_async_commit()
        if STAGED:  # a group of its own, waited for only once S^T is in (see the loop)
            if total > 0:
                issue_scores(bias, mask, smem, base, b, h0, m_begin, seqlen_q, n0, seqlen_k, tid)
            ptx.cp_async_commit()

        desc_k = wg.smem_desc(ptx.shared_address(smem, (base + K_OFF + wgi * WG_ROWS_WORDS,)), K_MAJOR_LBO)
        desc_v = wg.smem_desc(ptx.shared_address(smem, (base + V_OFF + wgi * WG_ROWS_WORDS,)), K_MAJOR_LBO)
        desc_q0 = wg.smem_desc(ptx.shared_address(smem, (base + Q_OFF,)), K_MAJOR_LBO)
        desc_do0 = wg.smem_desc(ptx.shared_address(smem, (base + DO_OFF,)), K_MAJOR_LBO)
        desc_qt0 = wg.smem_desc(ptx.shared_address(smem, (base + Q_OFF,)), Q_PANEL)  # Q read MN-major
        desc_dot0 = wg.smem_desc(ptx.shared_address(smem, (base + DO_OFF,)), Q_PANEL)
        desc_ds = wg.smem_desc(ptx.shared_address(smem, (base + DS_OFF,)), KV_PANEL)  # dS^T read MN-major
        desc_kt = wg.smem_desc(ptx.shared_address(smem, (base + K_OFF,)), KV_PANEL)  # K read MN-major

        dk_acc = cuda.local.array(ACC_REGS, float32)
        dv_acc = cuda.local.array(ACC_REGS, float32)
        for i in range(ACC_REGS):
            dk_acc[i] = 0
            dv_acc[i] = 0
        s = cuda.local.array(S_REGS, float32)
        dp = cuda.local.array(S_REGS, float32)
        p = cuda.local.array(P_REGS, uint32)
        ds = cuda.local.array(P_REGS, uint32)
        dq = cuda.local.array(DQ_REGS, float32)
        lane128 = tid % 128
        prev_m0 = np.int32(0)  # DEFER: the query tile and head whose dS^T waits for its dQ
        prev_h = uint32(0)
        staged_m0 = np.int32(0)  # the query tile and head whose dQ is in the staging buffer
        staged_h = uint32(0)

        m_end = m_begin + m_tiles * np.int32(BM)
        h = h0
        m0 = m_begin
        for it in range(total):
            stage = it & 1
            next_lse = float32(0)
            next_delta = float32(0)
            if it + 1 < total:
                h1, m1 = next_tile(h, m0, m_begin, m_end)
                nxt = (1 - stage) * Q_WORDS
                issue_q(q, smem, base + Q_OFF + nxt, b, h1, ZERO, m1, seqlen_q, tid)
                issue_q(do, smem, base + DO_OFF + nxt, b, h1, ZERO, m1, seqlen_q, tid)
                if tid < BM:
                    next_lse = _lse_log2(lse, b, h1, m1 + tid, seqlen_q)
                    next_delta = _delta_of(delta, b, h1, m1 + tid, seqlen_q)
            ptx.cp_async_commit()
            if STAGED:  # groups in flight: this tile's Q / dO, its bias / mask, the next Q / dO
                ptx.cp_async_wait_group(2)
            else:
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
            if DEFER:  # the last tile's dQ runs under this tile's P and dS
                if it > 0:
                    issue_dq(dq, desc_ds, desc_kt, (1 - stage) * DS_WORDS * 4, wgi * NQ)
                wg.wgmma_commit()  # (an empty group on the first tile keeps the counts below)
                wg.wgmma_wait(2)  # S^T is in; dP^T and dQ may still run
            else:
                wg.wgmma_wait(1)  # S^T is in; dP^T may still run
            wg.fence_operands(s, S_REGS)
            if STAGED:  # this tile's bias / mask (issued an iteration ago) has landed for all
                ptx.cp_async_wait_group(1)
                cuda.syncthreads()

            # P^T: rows are keys (my_key, my_key + 8), columns queries m0 + 8j + 2t + e
            lse_at = at_base + uint32(4 * (LSE_OFF + stage * BM + 2 * t))
            if ALIBI:  # query column c, key row r: distance |m0 + c + shift - r| (exact in float32 below 2^24)
                slope_log2 = alibi[uint32(b), h] * float32(LOG2E)
                distance0 = float32(m0 + np.int32(2 * t) + shift - my_key)
            key_local = my_key - n0  # and + 8: the thread's columns of the bias / mask tiles
            if BIAS:
                bias_at = at_base + uint32(4 * BIAS_OFF) + bias_lane_offset(np.int32(lane), (key_local - g) >> np.int32(3))
            if MASK:
                mask_at = at_base + uint32(4 * MASK_OFF) + mask_lane_offset(np.int32(t), key_local)
                mask_shift = uint32(8 * (key_local & np.int32(3)))
            for jj in range(S_BLOCKS // 2):
                if BIAS:  # queries 16jj .. 16jj + 15 of the thread's two keys (ldmatrix.trans)
                    bias_words = ptx.ldmatrix_x4_trans(bias_at + uint32(16 * jj * BIAS_ROW_BYTES))
                for jm in range(2):
                    j = 2 * jj + jm
                    pair = ptx.ld_shared_v2_u32(lse_at + uint32(32 * j))  # columns 8j + 2t, + 1
                    for e in range(2):
                        row_lse = ptx.u32_as_f32(pair[e])
                        for half in range(2):
                            idx = 4 * j + 2 * half + e
                            if ALIBI:
                                distance = abs(distance0 + float32(8 * j + e - 8 * half))
                                x = s[idx] * scale_log2 - row_lse - slope_log2 * distance
                            elif SOFTCAP:
                                x = ptx.tanh_approx(s[idx] * cap_in) * s_log2 - row_lse
                            else:
                                x = s[idx] * scale_log2 - row_lse
                            if BIAS:  # query column 8j + 2t + e, key row key_local + 8 half
                                x += bias_f32(bias_words[2 * jm + half], e) * float32(LOG2E)
                            # (the test of the compile-time EXP2_FMA first: a run-time test left
                            # in a kernel without it kept LLVM from unrolling the loop at d64,
                            # and the unrolled loop's registers went to the stack)
                            if EXP2_FMA and j % 4 < EXP2_FMA:  # off the MUFU, which softcap's tanh and lg2 also load
                                s[idx] = ptx.ex2_fma(x)
                            else:
                                s[idx] = ptx.ex2(x)
                            if MASK:  # query 8j + 2t + e, key key_local + 8 half
                                word = ptx.ld_shared_u32(mask_at + uint32((8 * j + e) * MASK_ROW_BYTES + 8 * half))
                                if (word >> mask_shift) & uint32(0xFF) == uint32(0):
                                    s[idx] = float32(0)
            if WINDOW:
                # query column c sees key row r when r - m0 - shift - window_right <= c
                # <= r - m0 - shift + window_left; only tiles crossing a band edge have
                # columns that do not
                if tile_crosses_band(n0, np.int32(BN), m0 + shift, np.int32(BM), window_left, window_right):
                    for half in range(2):
                        nearest = my_key + np.int32(8 * half) - m0 - shift
                        lowest = nearest - window_right
                        highest = nearest + window_left
                        for j in range(S_BLOCKS):
                            for e in range(2):
                                c = np.int32(j * 8 + 2 * t + e)
                                if c < lowest or c > highest:
                                    s[4 * j + 2 * half + e] = float32(0)
            # causal: query column c hides key j when c < j - m0 - shift; only tiles
            # crossing the diagonal have such columns
            elif CAUSAL and n0 + np.int32(BN - 1) > m0 + shift:
                for half in range(2):
                    first_seen = my_key + np.int32(8 * half) - m0 - shift
                    for j in range(S_BLOCKS):
                        for e in range(2):
                            if np.int32(j * 8 + 2 * t + e) < first_seen:
                                s[4 * j + 2 * half + e] = float32(0)
            if WITH_DQ and n0 + np.int32(BN) > seqlen_k:
                # keys past seqlen_k: their zero-filled K rows give S = 0 and P = exp2(-lse),
                # harmless for dK and dV (never stored) but possibly inf, and inf * 0 in dS K
                for half in range(2):
                    if my_key + np.int32(8 * half) >= seqlen_k:
                        for j in range(S_BLOCKS):
                            for e in range(2):
                                s[4 * j + 2 * half + e] = float32(0)
            for i in range(P_REGS):
                p[i] = pack(s[2 * i], s[2 * i + 1])

            # dV += P^T dO: k-step kk takes queries 16kk .. 16kk + 15
            wg.wgmma_fence()
            for kk in range(M_STEPS):
                mma_acc(dv_acc, p[4 * kk], p[4 * kk + 1], p[4 * kk + 2], p[4 * kk + 3],
                        wg.desc_add(desc_dot0, q_bytes + kk * 2 * wg.SBO_BYTES), 1)
            wg.wgmma_commit()
            if STAGED and DEFER:  # every thread has read this tile's bias / mask
                cuda.syncthreads()
                issue_next_scores(bias, mask, smem, base, b, h, m0, m_begin, m_end, it, total, seqlen_q, n0, seqlen_k,
                                  tid)
            if DEFER:
                wg.wgmma_wait(2)  # dP^T is in; dQ and dV may still run
            else:
                wg.wgmma_wait(1)  # dP^T is in; dV may still run
            wg.fence_operands(dp, S_REGS)

            delta_at = at_base + uint32(4 * (DELTA_OFF + stage * BM + 2 * t))
            for j in range(S_BLOCKS):
                pair = ptx.ld_shared_v2_u32(delta_at + uint32(32 * j))
                if SOFTCAP:
                    lse_pair = ptx.ld_shared_v2_u32(lse_at + uint32(32 * j))
                for e in range(2):
                    row_delta = ptx.u32_as_f32(pair[e])
                    for half in range(2):
                        idx = 4 * j + 2 * half + e
                        if SOFTCAP:  # dS of scale q.k: times tanh' = 1 - th^2, th from P
                            slope = float32(0)  # where P = 0 (hidden, or a row seeing no key: lse +inf)
                            if s[idx] > float32(0):
                                th = (ptx.lg2_approx(s[idx]) + ptx.u32_as_f32(lse_pair[e])) * inv_s_log2
                                slope = max(float32(1) - th * th, float32(0))  # |th| may pass 1 by rounding
                            dp[idx] = s[idx] * (dp[idx] - row_delta) * slope
                        else:
                            dp[idx] = s[idx] * (dp[idx] - row_delta)
            for i in range(P_REGS):
                ds[i] = pack(dp[2 * i], dp[2 * i + 1])

            if WITH_DQ:
                # dS^T to shared memory (row = key, column = query), before dK's wgmma
                # takes ds as its A operand: registers of an in-flight wgmma may not be
                # touched, not even read (PTX ISA 9.7.15.5.1)
                # (word chunk_word(row, j, BN) + t: the swizzle XORs j's chunk bits with
                # the row's, so each store is one XOR off the row's chunk-0 address)
                ds_at = at_base + uint32(4 * (DS_OFF + (stage * DS_WORDS if DEFER else 0)))
                for half in range(2):
                    row = my_key - n0 + np.int32(8 * half)
                    row_at = ds_at + uint32(4 * (wg.chunk_word(row, 0, BN) + t))
                    for j in range(S_BLOCKS):
                        ptx.st_shared_u32((row_at + uint32(j // 8 * BN * 128)) ^ uint32(j % 8 * 16), ds[2 * j + half])
                if not DEFER:  # (deferred, the staging fence below covers these stores)
                    wg.fence_proxy_async()

            # dK += dS^T Q
            wg.wgmma_fence()
            for kk in range(M_STEPS):
                mma_acc(dk_acc, ds[4 * kk], ds[4 * kk + 1], ds[4 * kk + 2], ds[4 * kk + 3],
                        wg.desc_add(desc_qt0, q_bytes + kk * 2 * wg.SBO_BYTES), 1)
            wg.wgmma_commit()
            if WITH_DQ:
                # dQ = dS K over all keys of the CTA reads dS^T MN-major. The finished dQ
                # of a tile goes to a staging buffer (two, by tile parity), which thread 0
                # adds into the accumulator with one bulk reduce after the loop's barrier
                if DEFER:
                    if it > 0:  # the last tile's dQ is in; dV and dK may still run
                        wg.wgmma_wait(2)
                        wg.fence_operands(dq, DQ_REGS)
                        stage_dq(at_base + uint32(4 * (STAGING_OFF + (1 - stage) * STAGING_WORDS)), dq, wgi, 0, lane128)
                        staged_m0 = prev_m0
                        staged_h = prev_h
                    prev_m0 = m0
                    prev_h = h
                else:
                    cuda.syncthreads()  # every warpgroup's keys are in
                    if STAGED:  # (and every thread has read this tile's bias / mask)
                        issue_next_scores(bias, mask, smem, base, b, h, m0, m_begin, m_end, it, total, seqlen_q, n0,
                                          seqlen_k, tid)
                    for c in range(DQ_CHUNKS):
                        issue_dq(dq, desc_ds, desc_kt, 0, wgi * NQ + c * DQ_COLS)
                        wg.wgmma_wait(0)
                        wg.fence_operands(dq, DQ_REGS)
                        stage_dq(at_base + uint32(4 * (STAGING_OFF + stage * STAGING_WORDS)), dq, wgi, c * DQ_BLOCKS, lane128)
                    staged_m0 = m0
                    staged_h = h
                # the staging stores, for the bulk reduce's async proxy; deferred, also this
                # tile's dS^T stores (every iteration, it == 0 included: keep it unconditional)
                wg.fence_proxy_async()
            wg.wgmma_wait(0)
            wg.fence_operands(dv_acc, ACC_REGS)
            wg.fence_operands(dk_acc, ACC_REGS)
            if it + 1 < total and tid < BM:  # the other stage's last readers passed the last barrier
                other = (1 - stage) * BM
                ptx.st_shared_u32(at_base + uint32(4 * (LSE_OFF + other + tid)), ptx.f32_as_u32(next_lse))
                ptx.st_shared_u32(at_base + uint32(4 * (DELTA_OFF + other + tid)), ptx.f32_as_u32(next_delta))
            cuda.syncthreads()  # everyone is done with this stage before it is refilled
            if WITH_DQ and tid == 0 and (it > 0 or not DEFER):
                # the previous reduce has had an iteration to read its buffer; the next
                # writes into that buffer come after the next barrier
                wg.bulk_wait_read(0)
                buffer = (1 - stage) if DEFER else stage
                reduce_tile(dq_acc, b, staged_h, staged_m0, smem, base + STAGING_OFF + buffer * STAGING_WORDS)
            h, m0 = next_tile(h, m0, m_begin, m_end)

        ptx.cp_async_wait_group(0)
        if DEFER and total > 0:  # the last tile's dQ (its dS^T passed the loop's last barrier)
            issue_dq(dq, desc_ds, desc_kt, (total - 1) % 2 * DS_WORDS * 4, wgi * NQ)
            wg.wgmma_wait(0)
            wg.fence_operands(dq, DQ_REGS)
            last = (total - 1) % 2
            if tid == 0:  # the reduce that last read this buffer (two tiles back) is done
                wg.bulk_wait_read(0)
            cuda.syncthreads()
            stage_dq(at_base + uint32(4 * (STAGING_OFF + last * STAGING_WORDS)), dq, wgi, 0, lane128)
            wg.fence_proxy_async()
            cuda.syncthreads()
            if tid == 0:
                reduce_tile(dq_acc, b, prev_h, prev_m0, smem, base + STAGING_OFF + last * STAGING_WORDS)
        if WITH_DQ and tid == 0:
            wg.bulk_wait(0)  # every reduce has finished before the CTA's shared memory goes
        store(dk, dk_acc, b, hk, my_key, seqlen_k, float32(scale), t)
        store(dv, dv_acc, b, hk, my_key, seqlen_k, float32(1), t)

    bounds = {} if ptx.SIMULATED else {"launch_bounds": T}
    return cuda.jit(backward_dkdv_wgmma, fastmath={"contract"}, **bounds)


CONVERT_THREADS = 256


def dq_accumulator_shape(spec, batch, seqlen_q, heads_q):
    """The fused kernel's float32 dQ accumulator: (batch, heads_q, query tiles,
    block_m x head_dim), each tile contiguous (one bulk reduce) in staging_word's order."""
    return batch, heads_q, -(-seqlen_q // spec.block_m), spec.block_m * spec.head_dim


def _build_convert(spec):
    D, BM = spec.head_dim, spec.block_m
    NQ = D // (spec.threads // 128)
    PAIRS = BM * D // 2
    PASSES = PAIRS // CONVERT_THREADS
    WORDS = 2 * PASSES
    assert PAIRS % CONVERT_THREADS == 0 and CONVERT_THREADS % 128 == 0
    BLOCKS = NQ // 8
    pack = ptx.pack_f16x2 if spec.dtype == "fp16" else ptx.pack_bf16x2

    def backward_dq_convert_tiles(dq_acc, dq, scale):
        """dq[b, tile rows, h, :] = scale * the accumulator's tile, rounded to 16 bits;
        one CTA per (query tile, head, batch), dq as 16-bit bits (any strides but a unit
        head_dim one). Pair p (of PASSES per thread, unrolled so that their loads are in
        flight together) reads the words p and p + 128 of its (warpgroup, block, half)
        group of 256 (staging_word's order): consecutive threads read consecutive words,
        and the 4 lanes of a quad write 16 consecutive bytes of one row, one 32-bit
        store each (dq's rows are 16-byte aligned: choose_backward_spec sends no other
        to the tensor-core kernels).
        (A thread taking a row's 8 columns read 16-byte quads but spread each store over
        32 rows: 3x slower on the H100, session 8.) Unsigned indices: no wraparound code."""
        tile = uint32(cuda.blockIdx.x)
        h = uint32(cuda.blockIdx.y)
        b = uint32(cuda.blockIdx.z)
        tid = uint32(cuda.threadIdx.x)
        rows = uint32(dq.shape[1])
        words = cuda.local.array(WORDS, float32)
        for r in range(PASSES):  # at = p // 128 * 256 + p % 128, split so that r's part is a constant
            at = uint32(r * CONVERT_THREADS // 128 * 256) + tid // uint32(128) * uint32(256) + tid % uint32(128)
            words[2 * r] = dq_acc[b, h, tile, at]
            words[2 * r + 1] = dq_acc[b, h, tile, at + uint32(128)]
        for r in range(PASSES):
            p = tid + uint32(r * CONVERT_THREADS)
            lane = p % uint32(128)
            group = p // uint32(128)  # (wgi * BLOCKS + block) * 2 + half
            half = group % uint32(2)
            block = group // uint32(2)
            wgi = block // uint32(BLOCKS)
            block -= wgi * uint32(BLOCKS)
            i = tile * uint32(BM) + (lane // uint32(32)) * uint32(16) + (lane % uint32(32)) // uint32(4) + uint32(8) * half
            if i < rows:
                word = pack(words[2 * r] * scale, words[2 * r + 1] * scale)
                col = wgi * uint32(NQ) + block * uint32(8) + uint32(2) * (lane % uint32(4))
                ptx.st_global_u32(ptx.global_address(dq, (b, i, h, col)), word)

    return cuda.jit(backward_dq_convert_tiles)


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
        wgi = ptx.warp_uniform(np.int32(tid // 128)) if T > 128 else 0
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
