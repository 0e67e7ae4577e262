"""The tensor-core backward kernels (FlashAttention-2 backward) for float16 and bfloat16.

Given q, k, v, dO, the forward's lse and delta = rowsum(dO * O), with
P = exp(scale * Q K^T - lse) recomputed tile by tile (FlashAttention-2, Algorithm 2):
    dV = P^T dO,    dP = dO V^T,    dS = P * (dP - delta),
    dK = scale * dS^T Q,    dQ = scale * dS K.

dK/dV kernel ("dkdv", "dkdvq"): a CTA owns block_n keys of one (batch, kv head); each
warp owns N_TILES slices of 16 keys. K and V stay in shared memory (or, with
kv_in_registers, their A-fragments in registers) while Q and dO tiles of block_m rows,
of every query head of the GQA group and every query tile that sees these keys, stream
through shared memory double-buffered with cp.async. Working on the transposes,
S^T = K Q^T and dP^T = V dO^T give mma C fragments whose rows are keys: packed to 16
bits they are the A fragments of dV += P^T dO and dK += dS^T Q, as P feeds P V in the
forward; dK and dV accumulate in float32 registers and are written once. With "dkdvq"
dS^T also goes to shared memory as 16 bits, is read back as dS with ldmatrix.trans, and
dQ += dS K is added into a float32 global accumulator with atomics; "dq_convert" then
scales it and rounds it to 16 bits.

dQ kernel ("dq", deterministic): a CTA owns block_m query rows of one (batch, query
head) and streams K and V tiles like the forward; S = Q K^T and dP = dO V^T have query
rows, so dS's C fragments are directly the A fragments of dQ += dS K. No atomics: the
same inputs give the same bits on every run. It recomputes S and dP (7 matmuls instead
of 5) to buy that.

Shared memory is one dynamic buffer of 32-bit words. 16-bit tiles use rows of
head_dim / 2 words plus 4 words of padding, so 8 consecutive rows read by ldmatrix hit
distinct banks; lse (as log2, +inf where no key is seen: P = 0 there, never NaN) and
delta are staged as float32 bits. Fragment layouts are those of ptx.py.

Variants (spec.variant, compile-time; PLAIN specs compile to the plain code): every
kernel takes the ten nbflash.variants.KERNEL_ARGS values after its own arguments, the
dK/dV kernels then a float32 (B, Hq, Nq, Nk) dbias buffer (written with dS when
spec.dbias). P is recomputed from the modified scores (softcap, ALiBi, bias; hidden
outside the window or the mask) as in the forward; dropout multiplies P and dP by
keep / (1 - p) with the forward's Philox mask; dS = P * (dP - delta) is dbias and is
multiplied by softcap's 1 - tanh^2 before dK and dQ. A window skips the query tiles
(dK/dV) and key tiles (dQ) outside its band. Specs with only window, softcap and
ALiBi take forward_mma's "S units" (_light: ALiBi's key part in the S mma's initial
C and its query part in the lse term, softcap one tanh.approx per score, masks only
on tiles crossing seqlen_k or the band); bias, mask, dropout and dbias go through the
per-score _variant_element.

(dK/dV) and key tiles (dQ) outside its band.

Varlen (spec.varlen, nbflash.attention_varlen_backward): the tensors are packed
(1, total, heads, head_dim) views and blockIdx.z is the sequence; each dK/dV and dQ CTA
reads its sequence's start and length from cu_seqlens_q / cu_seqlens_k (varlen.
sequence_span), offsets its rows (and lse, delta) by the start and does nothing past
the sequence's end (the grids cover the longest sequence). The dQ kernel keeps the span
in shared memory and re-reads it where it is used (in registers across the key loop it
spilled at d128). dq_convert and delta need no flag: they are elementwise over the rows.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
from numba import cuda
from numba.cuda import float32, int32, uint32

from ..spec import PLAIN, BackwardMmaSpec
from . import bias_tile, ptx
from .philox import keep_pair
from .score_mods import (
    alibi_split, alibi_term, bias_reader, soft_cap, tile_crosses_band, window_key_range, window_query_range,
    window_visible,
)
from .tile_copy import make_issue_rows
from .varlen import sequence_span

LOG2E = 1.4426950408889634
PAD_WORDS = 4
HEAD_DIMS = (32, 64, 96, 128)
NO_OFFSET = np.int32(0)  # dense tensors: sequences start at row 0 (tile_copy's start)
CONVERT_ROWS = 8  # rows of dQ per CTA of the dq_convert kernel
CONVERT_THREADS = 128
DQ_CHUNK = 32  # dQ columns one warp accumulates at a time in the dkdvq kernel


def _row_words(spec):
    return spec.head_dim // 2 + PAD_WORDS


def _ds_row_words(spec):
    return spec.block_m // 2 + PAD_WORDS


def _base_words(spec: BackwardMmaSpec) -> int:
    """Shared-memory words of a part's K, V, Q, dO (and lse, delta, dS^T) stages: where
    the staged bias and mask tiles start."""
    rw = _row_words(spec)
    if spec.part in ("dkdv", "dkdvq"):
        words = rw * (2 * spec.block_n + 4 * spec.block_m) + 4 * spec.block_m
        if spec.part == "dkdvq":
            words += spec.block_n * _ds_row_words(spec)
        return words
    if spec.part == "dq":
        return rw * (2 * spec.dq_block_m + 4 * spec.dq_block_n)
    return 0


def _staged_words(spec: BackwardMmaSpec):
    """Words of the part's double-buffered staged bias and mask tiles (0 when read per
    element): tiles of its queries x keys, queries as rows (kernels/bias_tile.py)."""
    if spec.part not in ("dkdv", "dkdvq", "dq"):
        return 0, 0
    rows, keys = (spec.dq_block_m, spec.dq_block_n) if spec.part == "dq" else (spec.block_m, spec.block_n)
    var = spec.variant
    bias = mask = 0
    if var.bias and var.bias_staged:
        bias = bias_tile.stage_words(rows, keys, bias_tile.ITEMSIZE[var.bias], 2)
    if var.mask and var.mask_staged:
        mask = bias_tile.stage_words(rows, keys, 1, 2)
    return bias, mask


def _staging(spec: BackwardMmaSpec, rows: int, keys: int, threads: int):
    """A part's staged bias / mask tiles (kernels/bias_tile.py; rows queries x keys, two
    stages each, after the part's other stages): (BIAS_STAGED, MASK_STAGED, BIAS_OFF,
    MASK_OFF, BIAS_STAGE, MASK_STAGE, issue_bias, issue_mask), offsets and stage sizes
    in words."""
    var = spec.variant
    bias_staged = bool(var.bias) and var.bias_staged
    mask_staged = var.mask and var.mask_staged
    assert not ((bias_staged or mask_staged) and spec.varlen)  # the tiles are indexed by batch entry
    bias_words, mask_words = _staged_words(spec)
    bias_off = _base_words(spec)
    issue_bias = bias_tile.make_issue_tile(rows, keys, bias_tile.ITEMSIZE[var.bias if bias_staged else "fp16"], threads)
    issue_mask = bias_tile.make_issue_tile(rows, keys, 1, threads)
    return (bias_staged, mask_staged, bias_off, bias_off + bias_words, bias_words // 2, mask_words // 2,
            issue_bias, issue_mask)


def shared_bytes(spec: BackwardMmaSpec) -> int:
    return 4 * (_base_words(spec) + sum(_staged_words(spec)))


def choose_spec(dtype: str, head_dim: int, causal: bool, simulator: bool, variant=None, dbias: bool = False,
                wgmma: bool = True):
    """The plan for a problem, or None when no tensor-core backward ships for head_dim;
    with variants (spec.Variant) on, from tuning's variant tile table. Plain attention
    on sm_90 takes the wgmma kernels (kernels/backward_wgmma.py, tuning.wgmma_bwd_tiles)
    unless ``wgmma`` is False (the varlen backward: those kernels are dense only; the
    API passes False for variants under deterministic=True), and so do the variants of
    tuning.wgmma_bwd_variant where the tuning ships the fused dQ kernel (the only one
    that takes them)."""
    from .. import device, tuning

    if (wgmma and tuning.wgmma_bwd_variant(variant, head_dim) and not dbias and dtype in ("fp16", "bf16")
            and tuning.wgmma_enabled(simulator)):
        hopper = tuning.wgmma_bwd_tiles(head_dim, simulator, device.compute_capability())
        if hopper is not None:
            (bm, bn, threads), (qbm, qbn, qthreads) = hopper
            atomics = bm == 64 and tuning.wgmma_bwd_dq_atomics(head_dim, simulator)
            if atomics or not variant:
                return BackwardMmaSpec(dtype, head_dim, causal, bm, bn, threads, False, qbm, qbn, qthreads, False,
                                       atomics, wgmma=True, variant=variant or PLAIN,
                                       exp2_fma=tuning.wgmma_bwd_exp2_fma(head_dim, variant) if atomics else 0)

    if variant:
        tiles = tuning.mma_bwd_variant_tiles(head_dim, simulator)
    else:
        tiles = tuning.mma_bwd_tiles(head_dim, simulator)
    if tiles is None or dtype not in ("fp16", "bf16"):
        return None
    (bm, bn, threads, kv_regs), (qbm, qbn, qthreads, q_regs) = tiles
    atomics = tuning.mma_bwd_dq_atomics(head_dim, simulator)
    spec = BackwardMmaSpec(dtype, head_dim, causal, bm, bn, threads, kv_regs, qbm, qbn, qthreads, q_regs, atomics)
    if variant:
        spec = replace(spec, variant=variant, dbias=dbias)
    return spec


def build(spec: BackwardMmaSpec):
    """The compiled-on-launch kernel for spec.part (see launch_backward for grids)."""
    assert spec.dtype in ("fp16", "bf16") and spec.head_dim in HEAD_DIMS
    if spec.part in ("dkdv", "dkdvq"):
        return _build_dkdv(spec)
    if spec.part == "dq":
        return _build_dq(spec)
    if spec.part == "dq_convert":
        return _build_convert(spec)
    raise ValueError(f"spec.part: expected dkdv, dkdvq, dq or dq_convert; got {spec.part!r}")


def _device_helpers(spec, threads):
    """Device functions shared by the kernels, closed over the tile constants."""
    D = spec.head_dim
    RW = D // 2 + PAD_WORDS
    INF = math.inf

    issue_rows = make_issue_rows(D, RW, threads)

    @cuda.jit(device=True, inline=True)
    def a_fragments(smem, base, row0, kk, lane):
        """A fragments (a0..a3) of the 16 x 16 block rows row0..+15, columns
        kk*16..+15 of a row-major 16-bit tile at smem[base:]."""
        mat = lane // 8
        row = row0 + (mat % 2) * 8 + lane % 8
        return ptx.ldmatrix_x4(ptx.shared_address(smem, (base + row * RW + kk * 8 + (mat // 2) * 4,)))

    @cuda.jit(device=True, inline=True)
    def bt_fragments(smem, base, row0, kk, lane):
        """B fragments of X^T for the rows row0..+15 of a row-major tile X, k-step kk
        (columns kk*16..+15): (b0, b1) for the n-block of rows row0..+7, (b2, b3) for
        rows row0+8..+15."""
        mat = lane // 8
        row = row0 + (mat // 2) * 8 + lane % 8
        return ptx.ldmatrix_x4(ptx.shared_address(smem, (base + row * RW + kk * 8 + (mat % 2) * 4,)))

    @cuda.jit(device=True, inline=True)
    def b_fragments(smem, base, row0, db2, lane):
        """B fragments of X for k-rows row0..+15 of a row-major tile X: (b0, b1) for
        columns db2*16..+7, (b2, b3) for db2*16+8..+15 (ldmatrix.trans)."""
        mat = lane // 8
        row = row0 + (mat % 2) * 8 + lane % 8
        return ptx.ldmatrix_x4_trans(ptx.shared_address(smem, (base + row * RW + db2 * 8 + (mat // 2) * 4,)))

    @cuda.jit(device=True, inline=True)
    def lse_log2(lse, b, h, start, i, seqlen_q):
        """lse * log2(e) of row i (stored at start + i: a packed sequence's first row,
        0 for dense tensors), +inf for rows past seqlen_q or that see no key, so that
        P = exp2(s - lse_log2) is 0 there."""
        x = float32(INF)
        if i < seqlen_q:
            y = lse[b, h, start + i]
            if y != -INF:
                x = float32(y * LOG2E)
        return x

    @cuda.jit(device=True, inline=True)
    def delta_of(delta, b, h, start, i, seqlen_q):
        x = float32(0)
        if i < seqlen_q:
            x = delta[b, h, start + i]
        return x

    return issue_rows, a_fragments, bt_fragments, b_fragments, lse_log2, delta_of


def _light(spec):
    """(LIGHT, ALIBI_INIT): the spec's variants are only window, softcap, ALiBi and bias /
    mask tiles staged in shared memory (no per-score global reads, writes or Philox
    words), which the kernels take as the forward does (forward_mma's "S units"): S
    holds q.k plus ALiBi's key part (the S mma's initial C on key tiles left or right
    of every query's diagonal) or, with softcap, th = tanh(scale q.k / softcap) plus
    that key part, and P = exp2(S s_log2 - (lse log2(e) - row_add)) with s_log2 =
    scale log2(e) or softcap log2(e) and row_add ALiBi's query part (0 on tiles
    crossing the diagonals, which take the exact term per score). Softcap's dS factor
    d(softcap th)/d(scale s) = 1 - th^2 comes from the recomputed th (scale is applied
    to dK and dQ at the end) and is folded into dP - delta before ALiBi, the bias
    (x log2(e) / s_log2 in S units) or the mask touch S; a hidden score is S = -inf,
    P = 0."""
    var = spec.variant
    heavy = (bool(var.bias) and not var.bias_staged) or (var.mask and not var.mask_staged) or var.dropout or spec.dbias
    light = bool(var) and not heavy
    return light, light and var.alibi and not var.softcap


def _variant_element(spec, with_dbias):
    """The per-element step of a variant spec, shared by the dK/dV and dQ kernels:
    (P_d, dS * d(capped)/d(score)) of query i and key j from the raw dot products
    s = q.k and dp = dO.v (nbflash.reference.attention_backward's derivation)."""
    CAUSAL = spec.causal
    WINDOW, SOFTCAP, ALIBI = spec.variant.window, spec.variant.softcap, spec.variant.alibi
    BIAS, MASK, DROPOUT = bool(spec.variant.bias), spec.variant.mask, spec.variant.dropout
    DBIAS = with_dbias and spec.dbias
    BIAS_STAGED, MASK_STAGED = BIAS and spec.variant.bias_staged, MASK and spec.variant.mask_staged
    read_bias = bias_reader(spec.variant.bias or "fp32")
    keys = spec.dq_block_n if spec.part == "dq" else spec.block_n
    staged_bias = bias_tile.make_element_reader(spec.variant.bias if BIAS_STAGED else "fp32", keys)
    staged_mask = bias_tile.make_mask_element_reader(keys)

    @cuda.jit(device=True, inline=True)
    def element(s, dp, b, h, i, j, seqlen_q, seqlen_k, check_band, scale, lse_log2, delta_i, keep,
                window_left, window_right, softcap, alibi, bias, mask, keep_scale, dbias, smem, bias_base,
                mask_base, i_local, j_local):
        """keep: dropout keeps (i, j) (ignored without dropout); check_band: the tile
        crosses the causal diagonal or the window's edges (else every element of the
        tile is inside them). lse_log2 is +inf for rows without keys: P = 0 there.
        Staged bias / mask tiles are read at (i_local, j_local) of the stages at words
        bias_base / mask_base of smem (zero past seqlen_q / seqlen_k)."""
        inside = i < seqlen_q and j < seqlen_k
        seen = inside
        if check_band:
            if WINDOW:
                seen = seen and window_visible(i, j, seqlen_q, seqlen_k, window_left, window_right)
            elif CAUSAL:
                seen = seen and j <= i + seqlen_k - seqlen_q
        if MASK_STAGED:
            if seen:
                seen = staged_mask(smem, mask_base, i_local, j_local)
        elif MASK:
            if seen:
                seen = mask[b, h, i, j] != 0
        t = s * scale
        slope = float32(1)
        if SOFTCAP:
            t, slope = soft_cap(t, softcap)
        if ALIBI:
            t += alibi_term(alibi[b, h], i, j, seqlen_q, seqlen_k)
        if BIAS_STAGED:
            t += staged_bias(smem, bias_base, i_local, j_local)
        elif BIAS:
            if inside:
                t += read_bias(bias, b, h, i, j)
        p = float32(0)
        if seen:
            p = ptx.ex2(t * float32(LOG2E) - lse_log2)
        p_d = p
        if DROPOUT:
            if keep:
                p_d = p * keep_scale
                dp = dp * keep_scale
            else:
                p_d = float32(0)
                dp = float32(0)
        ds = p * (dp - delta_i)
        if DBIAS:
            if inside:
                dbias[b, h, i, j] = ds
        return p_d, ds * slope

    return element


def _build_dkdv(spec):
    mma = ptx.mma_f16 if spec.dtype == "fp16" else ptx.mma_bf16
    pack = ptx.pack_f16x2 if spec.dtype == "fp16" else ptx.pack_bf16x2
    D = spec.head_dim
    BM, BN, T = spec.block_m, spec.block_n, spec.threads
    WARPS = T // 32
    N_TILES = BN // (16 * WARPS)  # 16-key slices per warp
    assert N_TILES * 16 * WARPS == BN and BM % 16 == 0 and D % 32 == 0
    WITH_DQ = spec.part == "dkdvq"
    KV_IN_REGS = spec.kv_in_registers
    CAUSAL, VARLEN = spec.causal, spec.varlen
    RW = D // 2 + PAD_WORDS
    K_OFF = 0
    V_OFF = BN * RW
    Q_OFF = 2 * BN * RW  # two stages of BM rows
    DO_OFF = Q_OFF + 2 * BM * RW
    LSE_OFF = DO_OFF + 2 * BM * RW  # two stages of BM floats
    DELTA_OFF = LSE_OFF + 2 * BM
    DS_OFF = DELTA_OFF + 2 * BM  # dS^T: BN key rows of BM queries (dkdvq)
    DS_RW = BM // 2 + PAD_WORDS
    K_STEPS = D // 16  # k-steps over head_dim
    Q_BLOCKS = BM // 8  # 8-query n-blocks of S^T
    D_BLOCKS = D // 8
    S_REGS = N_TILES * Q_BLOCKS * 4
    ACC_REGS = N_TILES * D_BLOCKS * 4
    KV_REGS = N_TILES * K_STEPS * 4
    KV_BOTH_REGS = 2 * KV_REGS  # local-array sizes must be plain constants
    A_REGS = 4 * N_TILES
    DQ_CHUNKS = D // DQ_CHUNK
    DQ_ITEMS = (BM // 16) * DQ_CHUNKS  # (16-query slice, column chunk) pairs
    DQ_REGS = DQ_CHUNK // 8 * 4
    NEG_INF = -math.inf
    VARIANT = bool(spec.variant)
    WINDOW, DROPOUT = spec.variant.window, spec.variant.dropout
    PLAIN_Q_BLOCKS = 0 if VARIANT else Q_BLOCKS  # the plain P/dS loop (variants have their own)
    SOFTCAP, ALIBI = spec.variant.softcap, spec.variant.alibi
    LIGHT, ALIBI_INIT = _light(spec)
    HEAVY = VARIANT and not LIGHT  # per-score element(): bias / mask read per element, dropout or dbias
    issue_rows, a_fragments, bt_fragments, b_fragments, lse_log2, delta_of = _device_helpers(spec, T)
    element = _variant_element(spec, True)
    (BIAS_STAGED, MASK_STAGED, BIAS_OFF, MASK_OFF, BIAS_STAGE, MASK_STAGE,
     issue_bias, issue_mask) = _staging(spec, BM, BN, T)
    # the light path reads the tiles transposed: S^T's rows are keys, columns queries
    bias_at = bias_tile.make_element_reader(spec.variant.bias if BIAS_STAGED else "fp32", BN)
    attends_at = bias_tile.make_mask_element_reader(BN)

    def backward_dkdv(q, k, v, do, lse, delta, dk, dv, dq_acc, scale, group,
                      window_left, window_right, softcap, alibi, bias, mask,
                      keep_threshold, keep_scale, seed_lo, seed_hi, dbias, cu_seqlens_q, cu_seqlens_k):
        tid = cuda.threadIdx.x
        lane = tid % 32
        warp = tid // 32
        g = lane // 4
        t = lane % 4
        mat = lane // 8
        n0 = cuda.blockIdx.x * BN
        hk = cuda.blockIdx.y
        seq = cuda.blockIdx.z  # the batch entry, or with VARLEN the packed sequence
        if VARLEN:  # rows are offset by the sequence's start in the packed tensors
            b = 0
            q_start, seqlen_q = sequence_span(cu_seqlens_q, seq, q.shape[1])
            k_start, seqlen_k = sequence_span(cu_seqlens_k, seq, k.shape[1])
        else:
            b = seq
            q_start = NO_OFFSET
            k_start = NO_OFFSET
            seqlen_q = q.shape[1]
            seqlen_k = k.shape[1]
        warp_key = warp * 16 * N_TILES  # first key of this warp within the tile
        scale_log2 = float32(scale * LOG2E)
        s_log2 = scale_log2  # S units to exp2 units (_light)
        if LIGHT and SOFTCAP:
            cap_in = float32(scale / softcap)
            s_log2 = float32(softcap * LOG2E)
        inv_s_log2 = float32(1) / s_log2
        smem = cuda.shared.array(0, uint32)

        # the query tiles that see at least one of keys n0..n0+BN-1, for each head of the group
        m_first = 0
        m_tiles = (seqlen_q + BM - 1) // BM
        if WINDOW:
            q_first, q_end = window_query_range(n0, n0 + BN, seqlen_q, seqlen_k, window_left, window_right)
            m_first = q_first // BM
            m_tiles = (q_end + BM - 1) // BM
        elif CAUSAL:
            m_first = max(0, n0 - (seqlen_k - seqlen_q)) // BM
        n_m = max(0, m_tiles - m_first)
        n_iter = group * n_m
        if VARLEN:  # the grid covers the longest sequence: these keys may lie past ours
            if n0 >= seqlen_k:
                n_iter = 0

        if n_iter > 0:
            issue_rows(k, smem, K_OFF, BN, b, hk, k_start, n0, seqlen_k, tid)
            issue_rows(v, smem, V_OFF, BN, b, hk, k_start, n0, seqlen_k, tid)
            h = hk * group
            m0 = m_first * BM
            issue_rows(q, smem, Q_OFF, BM, b, h, q_start, m0, seqlen_q, tid)
            issue_rows(do, smem, DO_OFF, BM, b, h, q_start, m0, seqlen_q, tid)
            if BIAS_STAGED:
                issue_bias(bias, smem, BIAS_OFF, b, h, m0, seqlen_q, n0, seqlen_k, tid)
            if MASK_STAGED:
                issue_mask(mask, smem, MASK_OFF, b, h, m0, seqlen_q, n0, seqlen_k, tid)
            if tid < BM:
                smem[LSE_OFF + tid] = ptx.f32_as_u32(lse_log2(lse, b, h, q_start, m0 + tid, seqlen_q))
                smem[DELTA_OFF + tid] = ptx.f32_as_u32(delta_of(delta, b, h, q_start, m0 + tid, seqlen_q))
        ptx.cp_async_commit()

        kv_frag = cuda.local.array(KV_BOTH_REGS, uint32)  # K then V A-fragments
        if KV_IN_REGS and n_iter > 0:
            ptx.cp_async_wait_group(0)
            cuda.syncthreads()
            for m in range(N_TILES):
                for kk in range(K_STEPS):
                    i = (m * K_STEPS + kk) * 4
                    kv_frag[i], kv_frag[i + 1], kv_frag[i + 2], kv_frag[i + 3] = a_fragments(
                        smem, K_OFF, warp_key + m * 16, kk, lane)
                    i += KV_REGS
                    kv_frag[i], kv_frag[i + 1], kv_frag[i + 2], kv_frag[i + 3] = a_fragments(
                        smem, V_OFF, warp_key + m * 16, kk, lane)

        dk_acc = cuda.local.array(ACC_REGS, float32)
        dv_acc = cuda.local.array(ACC_REGS, float32)
        for i in range(ACC_REGS):
            dk_acc[i] = 0
            dv_acc[i] = 0
        s = cuda.local.array(S_REGS, float32)  # S^T, then P^T
        dp = cuda.local.array(S_REGS, float32)  # dP^T, then dS^T
        ka = cuda.local.array(A_REGS, uint32)
        va = cuda.local.array(A_REGS, uint32)
        dq = cuda.local.array(DQ_REGS, float32)

        for it in range(n_iter):
            stage = it % 2
            gh = it // n_m
            h = hk * group + gh
            m0 = (m_first + it - gh * n_m) * BM
            q_base = Q_OFF + stage * BM * RW
            do_base = DO_OFF + stage * BM * RW
            lse_base = LSE_OFF + stage * BM
            delta_base = DELTA_OFF + stage * BM
            next_lse = float32(0)
            next_delta = float32(0)
            if it + 1 < n_iter:
                gh1 = (it + 1) // n_m
                h1 = hk * group + gh1
                m1 = (m_first + it + 1 - gh1 * n_m) * BM
                issue_rows(q, smem, Q_OFF + (1 - stage) * BM * RW, BM, b, h1, q_start, m1, seqlen_q, tid)
                issue_rows(do, smem, DO_OFF + (1 - stage) * BM * RW, BM, b, h1, q_start, m1, seqlen_q, tid)
                if BIAS_STAGED:
                    issue_bias(bias, smem, BIAS_OFF + (1 - stage) * BIAS_STAGE, b, h1, m1, seqlen_q, n0, seqlen_k, tid)
                if MASK_STAGED:
                    issue_mask(mask, smem, MASK_OFF + (1 - stage) * MASK_STAGE, b, h1, m1, seqlen_q, n0, seqlen_k, tid)
                if tid < BM:  # loads in flight during this tile's math, stored at its end
                    next_lse = lse_log2(lse, b, h1, q_start, m1 + tid, seqlen_q)
                    next_delta = delta_of(delta, b, h1, q_start, m1 + tid, seqlen_q)
            ptx.cp_async_commit()
            ptx.cp_async_wait_group(1)  # this tile's group has landed
            cuda.syncthreads()

            if LIGHT and ALIBI:  # keys are rows of S^T here: the key part is per (m, half)
                slope_log2 = float32(alibi[seq, h] * LOG2E)  # seq: the batch entry or packed sequence
                slope_u = slope_log2 * inv_s_log2  # the slope in S units
                t2 = float32(2 * t)
                col_step, row_step, c0, crossing = alibi_split(
                    m0, BM, n0, BN, seqlen_q, seqlen_k, slope_u, slope_log2)
                col0 = col_step * float32(n0 + warp_key + g - c0)  # key n0 + warp_key + g
            # S^T = K Q^T and dP^T = V dO^T: rows are this warp's keys, columns queries
            for m in range(N_TILES):
                for nb in range(Q_BLOCKS):
                    for r in range(4):
                        j = (m * Q_BLOCKS + nb) * 4 + r
                        if ALIBI_INIT:  # key n0 + warp_key + m * 16 + g + 8 (r // 2)
                            s[j] = col0 + col_step * float32(m * 16 + 8 * (r // 2))
                        else:
                            s[j] = 0
                        dp[j] = 0
            for kk in range(K_STEPS):
                for m in range(N_TILES):
                    if KV_IN_REGS:
                        i = (m * K_STEPS + kk) * 4
                        ka[4 * m], ka[4 * m + 1], ka[4 * m + 2], ka[4 * m + 3] = (
                            kv_frag[i], kv_frag[i + 1], kv_frag[i + 2], kv_frag[i + 3])
                        i += KV_REGS
                        va[4 * m], va[4 * m + 1], va[4 * m + 2], va[4 * m + 3] = (
                            kv_frag[i], kv_frag[i + 1], kv_frag[i + 2], kv_frag[i + 3])
                    else:
                        ka[4 * m], ka[4 * m + 1], ka[4 * m + 2], ka[4 * m + 3] = a_fragments(
                            smem, K_OFF, warp_key + m * 16, kk, lane)
                        va[4 * m], va[4 * m + 1], va[4 * m + 2], va[4 * m + 3] = a_fragments(
                            smem, V_OFF, warp_key + m * 16, kk, lane)
                for nb2 in range(Q_BLOCKS // 2):
                    b0, b1, b2, b3 = bt_fragments(smem, q_base, nb2 * 16, kk, lane)
                    e0, e1, e2, e3 = bt_fragments(smem, do_base, nb2 * 16, kk, lane)
                    for m in range(N_TILES):
                        j = (m * Q_BLOCKS + 2 * nb2) * 4
                        s[j], s[j + 1], s[j + 2], s[j + 3] = mma(
                            ka[4 * m], ka[4 * m + 1], ka[4 * m + 2], ka[4 * m + 3], b0, b1,
                            s[j], s[j + 1], s[j + 2], s[j + 3])
                        dp[j], dp[j + 1], dp[j + 2], dp[j + 3] = mma(
                            va[4 * m], va[4 * m + 1], va[4 * m + 2], va[4 * m + 3], e0, e1,
                            dp[j], dp[j + 1], dp[j + 2], dp[j + 3])
                        j += 4
                        s[j], s[j + 1], s[j + 2], s[j + 3] = mma(
                            ka[4 * m], ka[4 * m + 1], ka[4 * m + 2], ka[4 * m + 3], b2, b3,
                            s[j], s[j + 1], s[j + 2], s[j + 3])
                        dp[j], dp[j + 1], dp[j + 2], dp[j + 3] = mma(
                            va[4 * m], va[4 * m + 1], va[4 * m + 2], va[4 * m + 3], e2, e3,
                            dp[j], dp[j + 1], dp[j + 2], dp[j + 3])

            if LIGHT:
                if SOFTCAP:  # th, and dP - delta times d(softcap th)/d(scale s) = 1 - th^2
                    for nb in range(Q_BLOCKS):
                        for e in range(2):
                            row_delta = ptx.u32_as_f32(smem[delta_base + nb * 8 + 2 * t + e])
                            for m in range(N_TILES):
                                for half in range(2):
                                    j = (m * Q_BLOCKS + nb) * 4 + 2 * half + e
                                    th = ptx.tanh_approx(s[j] * cap_in)
                                    dp[j] = (dp[j] - row_delta) * (float32(1) - th * th)
                                    if ALIBI:
                                        th += col0 + col_step * float32(m * 16 + 8 * half)
                                    s[j] = th
                if ALIBI:
                    if crossing:  # the exact term, -slope_u |c_i - key|, per score
                        # c_i - key = dist0 + (8 nb + e) - (16 m + 8 half): one conversion per
                        # tile, a float constant per score (integers exact below 2**24)
                        dist0 = float32(m0 + 2 * t + seqlen_k - seqlen_q - n0 - warp_key - g)
                        for nb in range(Q_BLOCKS):
                            for e in range(2):
                                for m in range(N_TILES):
                                    for half in range(2):
                                        s[(m * Q_BLOCKS + nb) * 4 + 2 * half + e] -= slope_u * abs(
                                            dist0 + float32(nb * 8 + e - m * 16 - 8 * half))
                if BIAS_STAGED:  # zero past seqlen_q / seqlen_k (hidden below)
                    bias_u = float32(LOG2E) * inv_s_log2
                    for nb in range(Q_BLOCKS):
                        for e in range(2):
                            col = nb * 8 + 2 * t + e
                            for m in range(N_TILES):
                                for half in range(2):
                                    s[(m * Q_BLOCKS + nb) * 4 + 2 * half + e] += bias_at(
                                        smem, BIAS_OFF + stage * BIAS_STAGE, col, warp_key + m * 16 + g + 8 * half
                                    ) * bias_u
                # hide keys past seqlen_k and outside the band (causal is folded into
                # window_right); queries past seqlen_q have lse_log2 = +inf, so P = 0
                if n0 + BN > seqlen_k or tile_crosses_band(n0, BN, m0 + seqlen_k - seqlen_q, BM, window_left,
                                                           window_right):
                    for m in range(N_TILES):
                        for nb in range(Q_BLOCKS):
                            for r in range(4):
                                key = n0 + warp_key + m * 16 + g + 8 * (r // 2)
                                i = m0 + nb * 8 + 2 * t + (r % 2)
                                if not window_visible(i, key, seqlen_q, seqlen_k, window_left, window_right):
                                    s[(m * Q_BLOCKS + nb) * 4 + r] = NEG_INF
                if MASK_STAGED:
                    for nb in range(Q_BLOCKS):
                        for e in range(2):
                            col = nb * 8 + 2 * t + e
                            for m in range(N_TILES):
                                for half in range(2):
                                    if not attends_at(smem, MASK_OFF + stage * MASK_STAGE, col,
                                                      warp_key + m * 16 + g + 8 * half):
                                        s[(m * Q_BLOCKS + nb) * 4 + 2 * half + e] = NEG_INF
                for nb in range(Q_BLOCKS):
                    for e in range(2):
                        col = nb * 8 + 2 * t + e
                        lse_sub = ptx.u32_as_f32(smem[lse_base + col])  # lse log2(e) - ALiBi's query part
                        if ALIBI:  # (float32(col) would be hoisted out of the loop: a register each)
                            lse_sub -= row_step * t2 + row_step * float32(nb * 8 + e)
                        row_delta = ptx.u32_as_f32(smem[delta_base + col])
                        for m in range(N_TILES):
                            for half in range(2):
                                j = (m * Q_BLOCKS + nb) * 4 + 2 * half + e
                                p = ptx.ex2(s[j] * s_log2 - lse_sub)
                                s[j] = p
                                if SOFTCAP:
                                    dp[j] = p * dp[j]
                                else:
                                    dp[j] = p * (dp[j] - row_delta)
            if HEAVY:
                # P^T and dS^T element by element with the variants (module docstring)
                diagonal = m0 + seqlen_k - seqlen_q
                check_band = False
                if WINDOW or CAUSAL:  # causal is folded into window_right (variants.KERNEL_ARGS)
                    check_band = tile_crosses_band(n0, BN, diagonal, BM, window_left, window_right)
                heads_q = q.shape[2]
                for nb in range(Q_BLOCKS):
                    for e in range(2):
                        col = nb * 8 + 2 * t + e
                        i = m0 + col
                        row_lse = ptx.u32_as_f32(smem[lse_base + col])
                        row_delta = ptx.u32_as_f32(smem[delta_base + col])
                        for m in range(N_TILES):
                            for half in range(2):
                                j = (m * Q_BLOCKS + nb) * 4 + 2 * half + e
                                key = n0 + warp_key + m * 16 + g + 8 * half
                                keep = True
                                if DROPOUT:  # this thread's keys are g and g + 8: one pair each
                                    k0, k1 = keep_pair(seed_lo, seed_hi, seq * heads_q + h, i, key - (key & 1),
                                                       keep_threshold)
                                    keep = k1 if key & 1 else k0
                                s[j], dp[j] = element(
                                    s[j], dp[j], seq, h, i, key, seqlen_q, seqlen_k, check_band, scale, row_lse,
                                    row_delta, keep, window_left, window_right, softcap, alibi, bias, mask,
                                    keep_scale, dbias, smem, BIAS_OFF + stage * BIAS_STAGE,
                                    MASK_OFF + stage * MASK_STAGE, col, warp_key + m * 16 + g + 8 * half)
            # mask only tiles that cross seqlen_k or the causal diagonal
            needs_mask = n0 + BN > seqlen_k
            if CAUSAL:
                needs_mask = needs_mask or (n0 + BN - 1 > m0 + seqlen_k - seqlen_q)
            if needs_mask and not VARIANT:
                for m in range(N_TILES):
                    for nb in range(Q_BLOCKS):
                        for r in range(4):
                            key = n0 + warp_key + m * 16 + g + 8 * (r // 2)
                            i = m0 + nb * 8 + 2 * t + (r % 2)
                            hidden = key >= seqlen_k
                            if CAUSAL:
                                hidden = hidden or key > i + seqlen_k - seqlen_q
                            if hidden:
                                s[(m * Q_BLOCKS + nb) * 4 + r] = NEG_INF

            # P^T = exp2(S^T scale log2(e) - lse log2(e)); dS^T = P^T (dP^T - delta)
            # (FlashAttention-2, Algorithm 2, lines 13 and 16)
            for nb in range(PLAIN_Q_BLOCKS):
                for e in range(2):
                    col = nb * 8 + 2 * t + e
                    row_lse = ptx.u32_as_f32(smem[lse_base + col])
                    row_delta = ptx.u32_as_f32(smem[delta_base + col])
                    for m in range(N_TILES):
                        for half in range(2):
                            j = (m * Q_BLOCKS + nb) * 4 + 2 * half + e
                            p = ptx.ex2(s[j] * scale_log2 - row_lse)
                            s[j] = p
                            dp[j] = p * (dp[j] - row_delta)

            # dV += P^T dO and dK += dS^T Q: the C fragments, packed, are A fragments
            for kq in range(BM // 16):
                for db2 in range(D_BLOCKS // 2):
                    b0, b1, b2, b3 = b_fragments(smem, do_base, kq * 16, db2, lane)
                    e0, e1, e2, e3 = b_fragments(smem, q_base, kq * 16, db2, lane)
                    for m in range(N_TILES):
                        j0 = (m * Q_BLOCKS + 2 * kq) * 4
                        j1 = j0 + 4
                        a0 = pack(s[j0], s[j0 + 1])
                        a1 = pack(s[j0 + 2], s[j0 + 3])
                        a2 = pack(s[j1], s[j1 + 1])
                        a3 = pack(s[j1 + 2], s[j1 + 3])
                        c0 = pack(dp[j0], dp[j0 + 1])
                        c1 = pack(dp[j0 + 2], dp[j0 + 3])
                        c2 = pack(dp[j1], dp[j1 + 1])
                        c3 = pack(dp[j1 + 2], dp[j1 + 3])
                        d = (m * D_BLOCKS + 2 * db2) * 4
                        dv_acc[d], dv_acc[d + 1], dv_acc[d + 2], dv_acc[d + 3] = mma(
                            a0, a1, a2, a3, b0, b1, dv_acc[d], dv_acc[d + 1], dv_acc[d + 2], dv_acc[d + 3])
                        dk_acc[d], dk_acc[d + 1], dk_acc[d + 2], dk_acc[d + 3] = mma(
                            c0, c1, c2, c3, e0, e1, dk_acc[d], dk_acc[d + 1], dk_acc[d + 2], dk_acc[d + 3])
                        d += 4
                        dv_acc[d], dv_acc[d + 1], dv_acc[d + 2], dv_acc[d + 3] = mma(
                            a0, a1, a2, a3, b2, b3, dv_acc[d], dv_acc[d + 1], dv_acc[d + 2], dv_acc[d + 3])
                        dk_acc[d], dk_acc[d + 1], dk_acc[d + 2], dk_acc[d + 3] = mma(
                            c0, c1, c2, c3, e2, e3, dk_acc[d], dk_acc[d + 1], dk_acc[d + 2], dk_acc[d + 3])

            if WITH_DQ:
                # dS^T to shared memory as 16 bits, then dQ += dS K read with ldmatrix.trans
                for m in range(N_TILES):
                    for nb in range(Q_BLOCKS):
                        j = (m * Q_BLOCKS + nb) * 4
                        row = warp_key + m * 16 + g
                        smem[DS_OFF + row * DS_RW + nb * 4 + t] = pack(dp[j], dp[j + 1])
                        smem[DS_OFF + (row + 8) * DS_RW + nb * 4 + t] = pack(dp[j + 2], dp[j + 3])
                cuda.syncthreads()
                for item in range(warp, DQ_ITEMS, WARPS):
                    qs = item // DQ_CHUNKS
                    col0 = (item - qs * DQ_CHUNKS) * DQ_CHUNK
                    for i in range(DQ_REGS):
                        dq[i] = 0
                    for kb in range(BN // 16):
                        a0, a1, a2, a3 = ptx.ldmatrix_x4_trans(ptx.shared_address(smem, (
                            DS_OFF + (kb * 16 + (mat // 2) * 8 + lane % 8) * DS_RW + qs * 8 + (mat % 2) * 4,)))
                        for db2 in range(DQ_CHUNK // 16):
                            b0, b1, b2, b3 = b_fragments(smem, K_OFF, kb * 16, col0 // 16 + db2, lane)
                            d = 8 * db2
                            dq[d], dq[d + 1], dq[d + 2], dq[d + 3] = mma(
                                a0, a1, a2, a3, b0, b1, dq[d], dq[d + 1], dq[d + 2], dq[d + 3])
                            d += 4
                            dq[d], dq[d + 1], dq[d + 2], dq[d + 3] = mma(
                                a0, a1, a2, a3, b2, b3, dq[d], dq[d + 1], dq[d + 2], dq[d + 3])
                    for db in range(DQ_CHUNK // 8):
                        for r in range(4):
                            i = m0 + qs * 16 + g + 8 * (r // 2)
                            if i < seqlen_q:
                                ptx.red_add_f32(ptx.global_address(
                                    dq_acc, (b, q_start + i, h, col0 + db * 8 + 2 * t + r % 2)), dq[db * 4 + r])

            if it + 1 < n_iter and tid < BM:
                smem[LSE_OFF + (1 - stage) * BM + tid] = ptx.f32_as_u32(next_lse)
                smem[DELTA_OFF + (1 - stage) * BM + tid] = ptx.f32_as_u32(next_delta)
            cuda.syncthreads()  # everyone is done with this stage before it is refilled

        ptx.cp_async_wait_group(0)
        for m in range(N_TILES):
            for half in range(2):
                key = n0 + warp_key + m * 16 + g + 8 * half
                if key < seqlen_k:
                    for db in range(D_BLOCKS):
                        j = (m * D_BLOCKS + db) * 4 + 2 * half
                        col = db * 8 + 2 * t
                        word = pack(dk_acc[j] * scale, dk_acc[j + 1] * scale)
                        dk[b, k_start + key, hk, col] = np.uint16(word & 0xFFFF)
                        dk[b, k_start + key, hk, col + 1] = np.uint16(word >> 16)
                        word = pack(dv_acc[j], dv_acc[j + 1])
                        dv[b, k_start + key, hk, col] = np.uint16(word & 0xFFFF)
                        dv[b, k_start + key, hk, col + 1] = np.uint16(word >> 16)

    return cuda.jit(backward_dkdv)


def _build_dq(spec):
    mma = ptx.mma_f16 if spec.dtype == "fp16" else ptx.mma_bf16
    pack = ptx.pack_f16x2 if spec.dtype == "fp16" else ptx.pack_bf16x2
    D = spec.head_dim
    BM, BN, T = spec.dq_block_m, spec.dq_block_n, spec.dq_threads
    WARPS = T // 32
    M_TILES = BM // (16 * WARPS)  # 16-query slices per warp
    assert M_TILES * 16 * WARPS == BM and BN % 16 == 0 and D % 32 == 0
    IN_REGS = spec.dq_in_registers
    CAUSAL, VARLEN = spec.causal, spec.varlen
    RW = D // 2 + PAD_WORDS
    Q_OFF = 0
    DO_OFF = BM * RW
    K_OFF = 2 * BM * RW  # two stages of BN rows
    V_OFF = K_OFF + 2 * BN * RW
    K_STEPS = D // 16
    N_BLOCKS = BN // 8  # 8-key n-blocks of S
    D_BLOCKS = D // 8
    S_REGS = M_TILES * N_BLOCKS * 4
    ACC_REGS = M_TILES * D_BLOCKS * 4
    FRAG_REGS = M_TILES * K_STEPS * 4
    FRAG_BOTH_REGS = 2 * FRAG_REGS  # local-array sizes must be plain constants
    A_REGS = 4 * M_TILES
    ROWS = 2 * M_TILES
    NEG_INF = -math.inf
    VARIANT = bool(spec.variant)
    WINDOW, DROPOUT = spec.variant.window, spec.variant.dropout
    PLAIN_M_TILES = 0 if VARIANT else M_TILES  # the plain P/dS loop (variants have their own)
    SOFTCAP, ALIBI = spec.variant.softcap, spec.variant.alibi
    LIGHT, ALIBI_INIT = _light(spec)
    HEAVY = VARIANT and not LIGHT  # per-score element(): bias / mask read per element, or dropout
    issue_rows, a_fragments, bt_fragments, b_fragments, lse_log2, delta_of = _device_helpers(spec, T)
    element = _variant_element(spec, False)
    (BIAS_STAGED, MASK_STAGED, BIAS_OFF, MASK_OFF, BIAS_STAGE, MASK_STAGE,
     issue_bias, issue_mask) = _staging(spec, BM, BN, T)
    bias_frag = bias_tile.make_bias_reader(spec.variant.bias if BIAS_STAGED else "fp32", BN)
    apply_mask = bias_tile.make_mask_apply(BN, M_TILES)

    def backward_dq(q, k, v, do, lse, delta, dq, scale, group,
                    window_left, window_right, softcap, alibi, bias, mask,
                    keep_threshold, keep_scale, seed_lo, seed_hi, cu_seqlens_q, cu_seqlens_k):
        tid = cuda.threadIdx.x
        lane = tid % 32
        warp = tid // 32
        g = lane // 4
        t = lane % 4
        m_block = cuda.blockIdx.x
        if CAUSAL:  # the longest rows (the last blocks) start first
            m_block = cuda.gridDim.x - 1 - m_block
        row0 = m_block * BM
        h = cuda.blockIdx.y
        seq = cuda.blockIdx.z  # the batch entry, or with VARLEN the packed sequence
        hk = h // group
        if VARLEN:  # rows are offset by the sequence's start in the packed tensors
            b = 0
            q_start, seqlen_q = sequence_span(cu_seqlens_q, seq, q.shape[1])
            k_start, seqlen_k = sequence_span(cu_seqlens_k, seq, k.shape[1])
        else:
            b = seq
            q_start = NO_OFFSET
            k_start = NO_OFFSET
            seqlen_q = q.shape[1]
            seqlen_k = k.shape[1]
        warp_row = warp * 16 * M_TILES
        scale_log2 = float32(scale * LOG2E)
        s_log2 = scale_log2  # S units to exp2 units (_light)
        if LIGHT and SOFTCAP:
            cap_in = float32(scale / softcap)
            s_log2 = float32(softcap * LOG2E)
        if LIGHT and ALIBI:
            slope_log2 = float32(alibi[seq, h] * LOG2E)  # seq: the batch entry or packed sequence
            slope_u = slope_log2 / s_log2  # the slope in S units
            row_g = float32(warp_row + g)
        smem = cuda.shared.array(0, uint32)

        key_end = seqlen_k
        tile0 = 0  # the first key tile any of these rows sees
        if WINDOW:
            key_first, key_end = window_key_range(row0, row0 + BM, seqlen_q, seqlen_k, window_left, window_right)
            tile0 = key_first // BN
        elif CAUSAL:
            key_end = max(0, min(seqlen_k, row0 + BM + seqlen_k - seqlen_q))
        n_tiles = max(0, (key_end + BN - 1) // BN - tile0)
        if VARLEN:  # the grid covers the longest sequence: these rows may lie past ours
            if row0 >= seqlen_q:
                n_tiles = 0
            # The span lives in shared memory and is re-read where it is used (as in
            # forward_mma): held in registers across the key loop it spilled d128.
            span = cuda.shared.array(4, int32)
            if tid == 0:
                span[0] = q_start
                span[1] = seqlen_q
                span[2] = k_start
                span[3] = seqlen_k
            cuda.syncthreads()

        issue_rows(q, smem, Q_OFF, BM, b, h, q_start, row0, seqlen_q, tid)
        issue_rows(do, smem, DO_OFF, BM, b, h, q_start, row0, seqlen_q, tid)
        if n_tiles > 0:
            issue_rows(k, smem, K_OFF, BN, b, hk, k_start, tile0 * BN, seqlen_k, tid)
            issue_rows(v, smem, V_OFF, BN, b, hk, k_start, tile0 * BN, seqlen_k, tid)
            if BIAS_STAGED:
                issue_bias(bias, smem, BIAS_OFF, b, h, row0, seqlen_q, tile0 * BN, seqlen_k, tid)
            if MASK_STAGED:
                issue_mask(mask, smem, MASK_OFF, b, h, row0, seqlen_q, tile0 * BN, seqlen_k, tid)
        ptx.cp_async_commit()

        row_lse = cuda.local.array(ROWS, float32)
        row_delta = cuda.local.array(ROWS, float32)
        for r in range(ROWS):
            i = row0 + warp_row + (r // 2) * 16 + g + 8 * (r % 2)
            row_lse[r] = lse_log2(lse, b, h, q_start, i, seqlen_q)
            row_delta[r] = delta_of(delta, b, h, q_start, i, seqlen_q)

        frag = cuda.local.array(FRAG_BOTH_REGS, uint32)  # Q then dO A-fragments
        if IN_REGS:
            ptx.cp_async_wait_group(0)
            cuda.syncthreads()
            for m in range(M_TILES):
                for kk in range(K_STEPS):
                    i = (m * K_STEPS + kk) * 4
                    frag[i], frag[i + 1], frag[i + 2], frag[i + 3] = a_fragments(
                        smem, Q_OFF, warp_row + m * 16, kk, lane)
                    i += FRAG_REGS
                    frag[i], frag[i + 1], frag[i + 2], frag[i + 3] = a_fragments(
                        smem, DO_OFF, warp_row + m * 16, kk, lane)
        acc = cuda.local.array(ACC_REGS, float32)
        for i in range(ACC_REGS):
            acc[i] = 0
        s = cuda.local.array(S_REGS, float32)  # S, then P
        dp = cuda.local.array(S_REGS, float32)  # dP, then dS
        qa = cuda.local.array(A_REGS, uint32)
        oa = cuda.local.array(A_REGS, uint32)

        for it in range(n_tiles):
            if VARLEN:
                seqlen_q = span[1]
                k_start = span[2]
                seqlen_k = span[3]
            stage = it % 2
            n0 = (tile0 + it) * BN
            k_base = K_OFF + stage * BN * RW
            v_base = V_OFF + stage * BN * RW
            if it + 1 < n_tiles:
                nxt = (1 - stage) * BN * RW
                issue_rows(k, smem, K_OFF + nxt, BN, b, hk, k_start, n0 + BN, seqlen_k, tid)
                issue_rows(v, smem, V_OFF + nxt, BN, b, hk, k_start, n0 + BN, seqlen_k, tid)
                if BIAS_STAGED:
                    issue_bias(bias, smem, BIAS_OFF + (1 - stage) * BIAS_STAGE, b, h, row0, seqlen_q, n0 + BN, seqlen_k,
                               tid)
                if MASK_STAGED:
                    issue_mask(mask, smem, MASK_OFF + (1 - stage) * MASK_STAGE, b, h, row0, seqlen_q, n0 + BN, seqlen_k,
                               tid)
            ptx.cp_async_commit()
            ptx.cp_async_wait_group(1)
            cuda.syncthreads()

            if LIGHT and ALIBI:  # keys are columns of S here: the key part is per (nb, e)
                col_step, row_step, c0, crossing = alibi_split(
                    row0, BM, n0, BN, seqlen_q, seqlen_k, slope_u, slope_log2)
                col0 = col_step * float32(n0 + 2 * t - c0)  # key n0 + 2t
            # S = Q K^T and dP = dO V^T: rows are this warp's queries, columns keys
            for m in range(M_TILES):
                for nb in range(N_BLOCKS):
                    for r in range(4):
                        j = (m * N_BLOCKS + nb) * 4 + r
                        if ALIBI_INIT:  # key n0 + 8 nb + 2t + r % 2
                            s[j] = col0 + col_step * float32(nb * 8 + r % 2)
                        else:
                            s[j] = 0
                        dp[j] = 0
            for kk in range(K_STEPS):
                for m in range(M_TILES):
                    if IN_REGS:
                        i = (m * K_STEPS + kk) * 4
                        qa[4 * m], qa[4 * m + 1], qa[4 * m + 2], qa[4 * m + 3] = (
                            frag[i], frag[i + 1], frag[i + 2], frag[i + 3])
                        i += FRAG_REGS
                        oa[4 * m], oa[4 * m + 1], oa[4 * m + 2], oa[4 * m + 3] = (
                            frag[i], frag[i + 1], frag[i + 2], frag[i + 3])
                    else:
                        qa[4 * m], qa[4 * m + 1], qa[4 * m + 2], qa[4 * m + 3] = a_fragments(
                            smem, Q_OFF, warp_row + m * 16, kk, lane)
                        oa[4 * m], oa[4 * m + 1], oa[4 * m + 2], oa[4 * m + 3] = a_fragments(
                            smem, DO_OFF, warp_row + m * 16, kk, lane)
                for nb2 in range(N_BLOCKS // 2):
                    b0, b1, b2, b3 = bt_fragments(smem, k_base, nb2 * 16, kk, lane)
                    e0, e1, e2, e3 = bt_fragments(smem, v_base, nb2 * 16, kk, lane)
                    for m in range(M_TILES):
                        j = (m * N_BLOCKS + 2 * nb2) * 4
                        s[j], s[j + 1], s[j + 2], s[j + 3] = mma(
                            qa[4 * m], qa[4 * m + 1], qa[4 * m + 2], qa[4 * m + 3], b0, b1,
                            s[j], s[j + 1], s[j + 2], s[j + 3])
                        dp[j], dp[j + 1], dp[j + 2], dp[j + 3] = mma(
                            oa[4 * m], oa[4 * m + 1], oa[4 * m + 2], oa[4 * m + 3], e0, e1,
                            dp[j], dp[j + 1], dp[j + 2], dp[j + 3])
                        j += 4
                        s[j], s[j + 1], s[j + 2], s[j + 3] = mma(
                            qa[4 * m], qa[4 * m + 1], qa[4 * m + 2], qa[4 * m + 3], b2, b3,
                            s[j], s[j + 1], s[j + 2], s[j + 3])
                        dp[j], dp[j + 1], dp[j + 2], dp[j + 3] = mma(
                            oa[4 * m], oa[4 * m + 1], oa[4 * m + 2], oa[4 * m + 3], e2, e3,
                            dp[j], dp[j + 1], dp[j + 2], dp[j + 3])

            if LIGHT:
                if SOFTCAP:  # th, and dP - delta times d(softcap th)/d(scale s) = 1 - th^2
                    for m in range(M_TILES):
                        for half in range(2):
                            for nb in range(N_BLOCKS):
                                for e in range(2):
                                    j = (m * N_BLOCKS + nb) * 4 + 2 * half + e
                                    th = ptx.tanh_approx(s[j] * cap_in)
                                    dp[j] = (dp[j] - row_delta[2 * m + half]) * (float32(1) - th * th)
                                    if ALIBI:
                                        th += col0 + col_step * float32(nb * 8 + e)
                                    s[j] = th
                if ALIBI:
                    if crossing:  # the exact term, -slope_u |c_i - key|, per score
                        # c_i - key = dist0 + (16 m + 8 half) - (8 nb + e): one conversion per
                        # tile, a float constant per score (integers exact below 2**24)
                        dist0 = float32(row0 + warp_row + g + seqlen_k - seqlen_q - n0 - 2 * t)
                        for m in range(M_TILES):
                            for half in range(2):
                                for nb in range(N_BLOCKS):
                                    for e in range(2):
                                        s[(m * N_BLOCKS + nb) * 4 + 2 * half + e] -= slope_u * abs(
                                            dist0 + float32(m * 16 + 8 * half - nb * 8 - e))
                if BIAS_STAGED:  # zero past seqlen_q / seqlen_k (hidden below)
                    bias_u = float32(LOG2E) / s_log2
                    for m in range(M_TILES):
                        for half in range(2):
                            for nb in range(N_BLOCKS):
                                for e in range(2):
                                    s[(m * N_BLOCKS + nb) * 4 + 2 * half + e] += bias_frag(
                                        smem, BIAS_OFF + stage * BIAS_STAGE, warp_row + m * 16 + g + 8 * half, nb, t, e
                                    ) * bias_u
                # hide keys past seqlen_k and outside the band (causal is folded into
                # window_right); rows past seqlen_q have lse_log2 = +inf, so P = 0
                if n0 + BN > seqlen_k or tile_crosses_band(n0, BN, row0 + seqlen_k - seqlen_q, BM, window_left,
                                                           window_right):
                    for m in range(M_TILES):
                        for nb in range(N_BLOCKS):
                            for r in range(4):
                                key = n0 + nb * 8 + 2 * t + (r % 2)
                                i = row0 + warp_row + m * 16 + g + 8 * (r // 2)
                                if not window_visible(i, key, seqlen_q, seqlen_k, window_left, window_right):
                                    s[(m * N_BLOCKS + nb) * 4 + r] = NEG_INF
                if MASK_STAGED:  # the forward's pair reads (S has the forward's layout here)
                    apply_mask(s, smem, MASK_OFF + stage * MASK_STAGE, warp_row, g, t)
                for m in range(M_TILES):
                    for half in range(2):
                        row = 2 * m + half
                        lse_sub = row_lse[row]  # lse log2(e) - ALiBi's row part
                        if ALIBI:  # (a float32 of the whole offset would be hoisted: a register each)
                            lse_sub -= row_step * row_g + row_step * float32(m * 16 + 8 * half)
                        for nb in range(N_BLOCKS):
                            for e in range(2):
                                j = (m * N_BLOCKS + nb) * 4 + 2 * half + e
                                p = ptx.ex2(s[j] * s_log2 - lse_sub)
                                if SOFTCAP:
                                    dp[j] = p * dp[j]
                                else:
                                    dp[j] = p * (dp[j] - row_delta[row])
            if HEAVY:
                # P and dS element by element with the variants (module docstring)
                diagonal = row0 + seqlen_k - seqlen_q
                check_band = False
                if WINDOW or CAUSAL:  # causal is folded into window_right (variants.KERNEL_ARGS)
                    check_band = tile_crosses_band(n0, BN, diagonal, BM, window_left, window_right)
                heads_q = q.shape[2]
                for m in range(M_TILES):
                    for half in range(2):
                        row = 2 * m + half
                        i = row0 + warp_row + m * 16 + g + 8 * half
                        for nb in range(N_BLOCKS):
                            key = n0 + nb * 8 + 2 * t  # even: keys key and key + 1 share a Philox call
                            keep0 = True
                            keep1 = True
                            if DROPOUT:
                                keep0, keep1 = keep_pair(seed_lo, seed_hi, seq * heads_q + h, i, key, keep_threshold)
                            j = (m * N_BLOCKS + nb) * 4 + 2 * half
                            i_local = warp_row + m * 16 + g + 8 * half
                            _, dp[j] = element(
                                s[j], dp[j], seq, h, i, key, seqlen_q, seqlen_k, check_band, scale, row_lse[row],
                                row_delta[row], keep0, window_left, window_right, softcap, alibi, bias, mask,
                                keep_scale, dq, smem, BIAS_OFF + stage * BIAS_STAGE, MASK_OFF + stage * MASK_STAGE,
                                i_local, nb * 8 + 2 * t)
                            _, dp[j + 1] = element(
                                s[j + 1], dp[j + 1], seq, h, i, key + 1, seqlen_q, seqlen_k, check_band, scale,
                                row_lse[row], row_delta[row], keep1, window_left, window_right, softcap, alibi,
                                bias, mask, keep_scale, dq, smem, BIAS_OFF + stage * BIAS_STAGE,
                                MASK_OFF + stage * MASK_STAGE, i_local, nb * 8 + 2 * t + 1)
            needs_mask = n0 + BN > seqlen_k
            if CAUSAL:
                needs_mask = needs_mask or (n0 + BN - 1 > row0 + seqlen_k - seqlen_q)
            if needs_mask and not VARIANT:
                for m in range(M_TILES):
                    for nb in range(N_BLOCKS):
                        for r in range(4):
                            j = n0 + nb * 8 + 2 * t + (r % 2)
                            i = row0 + warp_row + m * 16 + g + 8 * (r // 2)
                            hidden = j >= seqlen_k
                            if CAUSAL:
                                hidden = hidden or j > i + seqlen_k - seqlen_q
                            if hidden:
                                s[(m * N_BLOCKS + nb) * 4 + r] = NEG_INF

            # P = exp2(S scale log2(e) - lse log2(e)); dS = P (dP - delta)
            for m in range(PLAIN_M_TILES):
                for half in range(2):
                    row = 2 * m + half
                    for nb in range(N_BLOCKS):
                        for e in range(2):
                            j = (m * N_BLOCKS + nb) * 4 + 2 * half + e
                            p = ptx.ex2(s[j] * scale_log2 - row_lse[row])
                            dp[j] = p * (dp[j] - row_delta[row])

            # dQ += dS K: dS's C fragments, packed, are the A fragments
            for kk in range(BN // 16):
                for db2 in range(D_BLOCKS // 2):
                    b0, b1, b2, b3 = b_fragments(smem, k_base, kk * 16, db2, lane)
                    for m in range(M_TILES):
                        j0 = (m * N_BLOCKS + 2 * kk) * 4
                        j1 = j0 + 4
                        a0 = pack(dp[j0], dp[j0 + 1])
                        a1 = pack(dp[j0 + 2], dp[j0 + 3])
                        a2 = pack(dp[j1], dp[j1 + 1])
                        a3 = pack(dp[j1 + 2], dp[j1 + 3])
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
                i = row0 + warp_row + m * 16 + g + 8 * half
                if i < seqlen_q:
                    for db in range(D_BLOCKS):
                        j = (m * D_BLOCKS + db) * 4 + 2 * half
                        col = db * 8 + 2 * t
                        word = pack(acc[j] * scale, acc[j + 1] * scale)
                        dq[b, q_start + i, h, col] = np.uint16(word & 0xFFFF)
                        dq[b, q_start + i, h, col + 1] = np.uint16(word >> 16)

    return cuda.jit(backward_dq)


def _build_convert(spec):
    pack = ptx.pack_f16x2 if spec.dtype == "fp16" else ptx.pack_bf16x2
    D = spec.head_dim
    PAIRS = CONVERT_ROWS * D // 2

    def backward_dq_convert(dq_acc, dq, scale):
        """dq = scale * dq_acc rounded to 16 bits; CONVERT_ROWS rows per CTA."""
        row0 = cuda.blockIdx.x * CONVERT_ROWS
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        for e in range(cuda.threadIdx.x, PAIRS, CONVERT_THREADS):
            r = e // (D // 2)
            col = 2 * (e - r * (D // 2))
            i = row0 + r
            if i < dq.shape[1]:
                word = pack(dq_acc[b, i, h, col] * scale, dq_acc[b, i, h, col + 1] * scale)
                dq[b, i, h, col] = np.uint16(word & 0xFFFF)
                dq[b, i, h, col + 1] = np.uint16(word >> 16)

    return cuda.jit(backward_dq_convert)


def _zeros(like, shape, dtype=np.float32):
    """A zeroed buffer (float32 scratch by default) where ``like`` lives (CuPy on a
    GPU, NumPy on the simulator); CuPy zeroes it on the current stream."""
    if isinstance(like, np.ndarray):
        return np.zeros(shape, dtype)
    import cupy

    return cupy.zeros(shape, dtype)


_NO_SEQLENS: dict = {}  # device id -> the never-read cu_seqlens of dense launches


def _no_seqlens(like):
    if isinstance(like, np.ndarray):
        return np.zeros((1,), np.int32)
    import cupy

    dev = cupy.cuda.Device().id
    if dev not in _NO_SEQLENS:
        _NO_SEQLENS[dev] = cupy.zeros((1,), np.int32)
    return _NO_SEQLENS[dev]


def launch_backward(spec, q, k, v, do, lse, delta, dq, dk, dv, scale, group, deterministic, extra=None,
                    varlen=None, recording=None):
    """Launch the backward for one problem (``spec`` is a "plan" BackwardMmaSpec).

    Args (all (batch, seqlen, heads, head_dim) "bshd" views, NumPy on the simulator,
    CuPy on a GPU; 16-bit data as uint16 views with 16-byte aligned rows):
        q (B, Nq, Hq, D), k (B, Nk, Hkv, D), v (B, Nk, Hkv, D), do (B, Nq, Hq, D);
        lse (B, Hq, Nq) float32 natural log (-inf where a row sees no key);
        delta (B, Hq, Nq) float32 = rowsum(do * out);
        dq (B, Nq, Hq, D), dk (B, Nk, Hkv, D), dv (B, Nk, Hkv, D): written, every element.
        scale: the forward's scale; group = Hq // Hkv (dk, dv sum over a group's heads).
        deterministic: dQ by the separate kernel (bitwise repeatable) even where
            spec.dq_atomics would accumulate it with float32 atomics into a zeroed
            scratch (B, Nq, Hq, D) buffer.
        extra: the ten variant kernel arguments (nbflash.variants.KERNEL_ARGS, as
            Numba views) followed by the dbias buffer (float32 (B, Hq, Nq, Nk), zeroed,
            or a dummy); None for a PLAIN spec (dummies are made here).
        varlen: None for dense tensors, else a packed batch (nbflash.attention_varlen):
            (cu_seqlens_q, cu_seqlens_k, sequences, max_seqlen_q, max_seqlen_k) with
            int32 (sequences + 1,) arrays (Numba views) whose values are checked, and
            the tensors (1, total, heads, head_dim) views (lse, delta (1, Hq, total_q)).
            The dK/dV and dQ kernels are then built with spec.varlen: blockIdx.z is the
            sequence and the grids cover the longest one; dq_convert runs on the packed
            rows as on one dense sequence.
        recording: None, or a backward_plans.Recording that each launch and the dQ
            accumulator are reported to (for attention_backward's memo), each launch
            with the names of its per-call array arguments.
    """
    from .. import launch
    from ..backward_plans import launch_named

    def run(kernel, grid, threads, args, shared, names):
        launch_named(recording, kernel, grid, threads, args, shared, names)

    batch, seqlen_q, heads_q, _ = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    if batch == 0 or heads_q == 0:
        return
    if varlen is None:
        seqlens = [launch.numba_view(_no_seqlens(q))] * 2  # never read
        sequences, grid_q, grid_k = batch, seqlen_q, seqlen_k
    else:
        seqlens = list(varlen[:2])
        sequences, grid_q, grid_k = varlen[2:]
        spec = replace(spec, varlen=True)
    views = [launch.numba_view(a) for a in (q, k, v, do, lse, delta)]
    scale = np.float32(scale)
    if extra is None:
        from .. import variants

        extra = variants.kernel_values(variants.NO_VARIANTS, lambda shape, dtype: _zeros(q, shape, dtype))
        extra = [launch.numba_view(x) if hasattr(x, "shape") and x.ndim else x for x in extra]
        extra.append(launch.numba_view(_zeros(q, (1, 1, 1, 1))))
    variant_args, dbias = list(extra[:-1]), extra[-1]
    deterministic = deterministic or not spec.dq_atomics
    if deterministic:
        part = replace(spec, part="dkdv")
        dq_acc = _zeros(q, (1, 1, 1, 1))
    elif spec.wgmma:  # tile-contiguous, for the fused kernel's bulk reduce
        from .backward_wgmma import dq_accumulator_shape

        part = replace(spec, part="dkdvq")
        dq_acc = _zeros(q, dq_accumulator_shape(spec, batch, seqlen_q, heads_q))
    else:
        part = replace(spec, part="dkdvq")
        dq_acc = _zeros(q, q.shape)
    if recording is not None and not deterministic:
        recording.allocated("dq_acc", dq_acc, zeroed=True)
    inputs = ("q", "k", "v", "do", "lse", "delta")  # views' names
    if grid_k > 0:
        grid = (-(-grid_k // spec.block_n), heads_kv, sequences)
        args = [*views, launch.numba_view(dk), launch.numba_view(dv), launch.numba_view(dq_acc), scale, group,
                *variant_args, dbias, *seqlens]
        names = inputs + ("dk", "dv") + (() if deterministic else ("dq_acc",))  # else a dummy
        run(launch.compiled(part), grid, spec.threads, args, launch.shared_bytes(part), names)
    if grid_q == 0:
        return
    if deterministic:
        part = replace(spec, part="dq")
        grid = (-(-grid_q // spec.dq_block_m), heads_q, sequences)
        args = [*views, launch.numba_view(dq), scale, group, *variant_args, *seqlens]
        run(launch.compiled(part), grid, spec.dq_threads, args, launch.shared_bytes(part), inputs + ("dq",))
    elif spec.wgmma:
        from .backward_wgmma import CONVERT_THREADS as WGMMA_CONVERT_THREADS

        part = replace(spec, part="dq_convert", variant=PLAIN)  # one convert for every variant
        args = [launch.numba_view(dq_acc), launch.numba_view(dq), scale]
        grid = (dq_acc.shape[2], heads_q, batch)  # one CTA per query tile
        run(launch.compiled(part), grid, WGMMA_CONVERT_THREADS, args, 0, ("dq_acc", "dq"))
    else:  # elementwise over the rows: packed tensors convert as one dense sequence
        part = replace(spec, part="dq_convert", varlen=False)
        grid = (-(-seqlen_q // CONVERT_ROWS), heads_q, batch)
        args = [launch.numba_view(dq_acc), launch.numba_view(dq), scale]
        run(launch.compiled(part), grid, CONVERT_THREADS, args, 0, ("dq_acc", "dq"))
