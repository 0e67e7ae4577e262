"""Bias and mask tiles staged through shared memory for the tensor-core kernels (the
mma.sync forward; the mma.sync backward's dK/dV and dQ kernels, which read the dK/dV
tile transposed through make_element_reader / make_mask_element_reader; the wgmma
backward's fused kernel, which reads its tiles transposed through
make_transposed_bias_reader (ldmatrix.trans on a swizzled stage) and
make_transposed_mask_reader; the wgmma forward, which reads a swizzled bias stage in
accumulator order through make_fragment_bias_reader (ldmatrix) and a padded mask stage
through make_fragment_mask_reader).

Read element by element in fragment order, a (block_m x block_n) bias or mask tile
costs each thread 2-byte (or 1-byte) global loads 8 rows apart, several times the
tile's bytes at memory bandwidth (perf/NOTES.md, "Attention variants"). Staged, the
tile arrives with cp.async in 16-byte chunks (16 / itemsize keys each), double
buffered beside K and V in the same commit group, and the score loop reads it from
shared memory. Rows of the stage are padded so that a warp's fragment-order reads
(8 rows x 4 threads, two keys each) hit distinct banks.

Staging needs a layout cp.async can copy: the key axis contiguous and every row,
head and batch start (and the base) on 16 bytes; a broadcast (stride 0) axis is fine.
variants.check_variants decides this on the host (spec.Variant.bias_staged /
mask_staged); otherwise the kernels keep the per-element path.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda
from numba.cuda import float32, uint32

from . import ptx

ITEMSIZE = {"fp16": 2, "bf16": 2, "fp32": 4, "mask": 1}
"""Bytes per element of the tiles that can be staged (a float64 bias is not)."""


def _bank_cost(row_words: int, itemsize: int) -> int:
    """The most distinct 32-bit words one bank serves in a warp's fragment-order read
    (lane g*4+t reads keys 2t, 2t+1 of row g); 8-byte reads go by half-warps."""
    per_lane = 2 * itemsize
    groups = [range(32)] if per_lane <= 4 else [range(16), range(16, 32)]
    worst = 0
    for lanes in groups:
        banks: dict = {}
        for lane in lanes:
            g, t = lane // 4, lane % 4
            first = g * row_words * 4 + 2 * t * itemsize
            for word in range(first // 4, (first + per_lane - 1) // 4 + 1):
                banks.setdefault(word % 32, set()).add(word)
        worst = max(worst, max(len(words) for words in banks.values()))
    return worst


@functools.lru_cache(maxsize=None)
def row_words(block_n: int, itemsize: int) -> int:
    """32-bit words per staged row: block_n keys, padded by whole 16-byte chunks until
    fragment-order reads are free of bank conflicts."""
    words = block_n * itemsize // 4
    assert (block_n * itemsize) % 16 == 0, "a staged row is whole 16-byte chunks"
    return min((words + pad for pad in range(0, 32, 4)), key=lambda w: (_bank_cost(w, itemsize), w))


def stage_words(block_m: int, block_n: int, itemsize: int, stages: int) -> int:
    """Shared-memory words of a double-buffered (stages) staged tile."""
    return stages * block_m * row_words(block_n, itemsize)


@cuda.jit(device=True, inline=True)
def swizzled_chunk(r, c):
    """Where 16-byte chunk c of row r sits in its row of a swizzled stage (make_issue_tile)."""
    return c ^ (r & np.int32(7))


def make_issue_tile(block_m: int, block_n: int, itemsize: int, threads: int, rw: int = 0, swizzle: bool = False):
    """A device function ``issue_tile(src, smem, base, b, h, row0, seqlen_q, n0, seqlen_k, tid)``
    that cp.asyncs src[b, h, row0:row0 + block_m, n0:n0 + block_n] (src a 4-d view with
    a contiguous key axis and 16-byte aligned rows) into the stage at word ``base``.
    Rows at or past seqlen_q and keys at or past seqlen_k are zero-filled (cp.async
    src-size), and a source address stays inside the array even when nothing is read.

    Rows are ``rw`` words apart (default row_words: padded for fragment-order reads);
    with ``swizzle`` they are unpadded and 16-byte chunk c of row r sits at chunk
    swizzled_chunk(r, c), the layout the wgmma backward reads with
    ldmatrix.trans, 8 rows at a time, free of bank conflicts and without padding."""
    KEYS = 16 // itemsize  # keys per 16-byte chunk
    CHUNKS = block_n // KEYS  # chunks per row
    RW = rw or (CHUNKS * 4 if swizzle else row_words(block_n, itemsize))
    BM, T = block_m, threads
    TOTAL = BM * CHUNKS
    assert CHUNKS * KEYS == block_n and RW % 4 == 0 and RW >= CHUNKS * 4
    assert not swizzle or (CHUNKS % 8 == 0 and RW == CHUNKS * 4), "a swizzled row is a multiple of 128 bytes"

    @cuda.jit(device=True, inline=True)
    def issue_chunk(src, smem, base, r, c, b, h, row0, seqlen_q, n0, seqlen_k):
        i = np.int32(row0 + r)
        j = np.int32(n0 + c * np.int32(KEYS))
        keys = max(np.int32(0), min(np.int32(KEYS), seqlen_k - j))
        if i >= seqlen_q:
            keys = np.int32(0)
        if keys == 0:
            j = np.int32(0)
        i = min(i, seqlen_q - np.int32(1))
        chunk = swizzled_chunk(r, c) if swizzle else c
        ptx.cp_async_16(
            ptx.shared_address(smem, (base + r * np.int32(RW) + chunk * np.int32(4),)),
            ptx.global_address(src, (b, h, i, j)),
            keys * np.int32(itemsize),
        )

    @cuda.jit(device=True, inline=True)
    def issue_tile(src, smem, base, b, h, row0, seqlen_q, n0, seqlen_k, tid):
        if T % CHUNKS == 0:  # each thread keeps one chunk column: fixed trip counts
            RSTEP = T // CHUNKS
            c = np.int32(tid % CHUNKS)
            r0 = np.int32(tid // CHUNKS)
            for it in range((BM + RSTEP - 1) // RSTEP):
                r = r0 + np.int32(it * RSTEP)
                if BM % RSTEP == 0 or r < BM:
                    issue_chunk(src, smem, base, r, c, b, h, row0, seqlen_q, n0, seqlen_k)
        else:
            for it in range((TOTAL + T - 1) // T):
                e = np.int32(tid + it * T)
                if TOTAL % T == 0 or e < TOTAL:
                    r = e // np.int32(CHUNKS)
                    issue_chunk(src, smem, base, r, e - r * np.int32(CHUNKS), b, h, row0, seqlen_q, n0, seqlen_k)

    return issue_tile


def make_half_to_f32(dtype: str):
    """A device function ``to_f32(word, e)``: half e (0: bits 0-15, 1: bits 16-31) of a
    32-bit word of two 16-bit values (dtype fp16 or bf16) as float32."""
    assert dtype in ("fp16", "bf16")
    if dtype == "bf16":
        @cuda.jit(device=True, inline=True)
        def to_f32(word, e):
            if e == 0:  # bfloat16 is the upper half of a float32
                return ptx.u32_as_f32(uint32(word) << uint32(16))
            return ptx.u32_as_f32(uint32(word) & uint32(0xFFFF0000))
    else:
        @cuda.jit(device=True, inline=True)
        def to_f32(word, e):
            lo, hi = ptx.f16x2_to_f32(word)
            if e == 0:
                return float32(lo)
            return float32(hi)
    return to_f32


def make_bias_reader(dtype: str, block_n: int):
    """A device function ``read(smem, base, r, nb, t, e)``: the staged bias (stage at
    word ``base``) of local row r, column nb * 8 + 2t + e (an mma C fragment's column)
    as float32. e is 0 or 1 (unrolled): a thread's two keys share one word (16-bit
    bias) or sit in adjacent words (32-bit)."""
    itemsize = ITEMSIZE[dtype]
    RW = row_words(block_n, itemsize)

    if dtype == "fp32":
        @cuda.jit(device=True, inline=True)
        def read(smem, base, r, nb, t, e):
            return ptx.u32_as_f32(smem[base + r * np.int32(RW) + nb * np.int32(8) + t * np.int32(2) + e])
    else:
        to_f32 = make_half_to_f32(dtype)

        @cuda.jit(device=True, inline=True)
        def read(smem, base, r, nb, t, e):
            return to_f32(smem[base + r * np.int32(RW) + nb * np.int32(4) + t], e)
    return read


def make_mask_reader(block_n: int):
    """A device function ``pair(smem, base, r, nb, t)``: the staged mask bytes of local
    row r, columns nb * 8 + 2t and + 1, in bits 0-7 and 8-15 of the word it returns
    (the thread's two bytes share a 32-bit word: one shared load and one shift per
    pair, and ``word & 0xFF`` / ``word & 0xFF00`` tested against 0 are one instruction
    each, a LOP3 with a predicate result)."""
    RW = row_words(block_n, 1)

    @cuda.jit(device=True, inline=True)
    def pair(smem, base, r, nb, t):
        word = smem[base + r * np.int32(RW) + nb * np.int32(2) + (t >> np.int32(1))]
        return word >> (uint32(16) * uint32(t & np.int32(1)))

    return pair


def make_mask_apply(block_n: int, m_tiles: int):
    """A device function ``apply(s, smem, base, warp_row, g, t)``: S = -inf in an mma C
    fragment ``s`` (m_tiles 16-row slices of block_n / 8 key blocks, forward_mma's
    register order; the warp's rows start at local row warp_row) wherever the staged
    mask byte is 0: one pair read per two keys, one LOP3 and one select a score, no
    branches."""
    pair = make_mask_reader(block_n)
    N_BLOCKS = block_n // 8
    NEG_INF = -math.inf

    @cuda.jit(device=True, inline=True)
    def apply(s, smem, base, warp_row, g, t):
        for m in range(m_tiles):
            for half in range(2):
                for nb in range(N_BLOCKS):
                    bits = pair(smem, base, warp_row + m * 16 + g + 8 * half, nb, t)
                    idx = (m * N_BLOCKS + nb) * 4 + 2 * half
                    if bits & uint32(0xFF) == uint32(0):
                        s[idx] = NEG_INF
                    if bits & uint32(0xFF00) == uint32(0):
                        s[idx + 1] = NEG_INF

    return apply


def make_element_reader(dtype: str, block_n: int):
    """A device function ``read_at(smem, base, r, c)``: the staged bias (stage at word
    ``base``) of local row r, column c as float32, for any c (the backward's dK/dV
    kernel reads the tile transposed: its fragment columns are queries, rows keys)."""
    itemsize = ITEMSIZE[dtype]
    RW = row_words(block_n, itemsize)

    if dtype == "fp32":
        @cuda.jit(device=True, inline=True)
        def read_at(smem, base, r, c):
            return ptx.u32_as_f32(smem[base + r * np.int32(RW) + c])
    elif dtype == "bf16":
        @cuda.jit(device=True, inline=True)
        def read_at(smem, base, r, c):
            word = smem[base + r * np.int32(RW) + (c >> np.int32(1))]
            # bfloat16 is the upper half of a float32: c's half moved there
            return ptx.u32_as_f32((word >> (uint32(16) * uint32(c & np.int32(1)))) << uint32(16))
    else:
        @cuda.jit(device=True, inline=True)
        def read_at(smem, base, r, c):
            lo, hi = ptx.f16x2_to_f32(smem[base + r * np.int32(RW) + (c >> np.int32(1))])
            return float32(hi) if c & np.int32(1) else float32(lo)
    return read_at


def make_mask_element_reader(block_n: int):
    """A device function ``attends_at(smem, base, r, c)``: the staged mask byte of local
    row r, column c is nonzero, for any c."""
    RW = row_words(block_n, 1)

    @cuda.jit(device=True, inline=True)
    def attends_at(smem, base, r, c):
        word = smem[base + r * np.int32(RW) + (c >> np.int32(2))]
        return (word >> (uint32(8) * uint32(c & np.int32(3)))) & uint32(0xFF) != uint32(0)

    return attends_at


def make_transposed_bias_reader(dtype: str, block_n: int):
    """The wgmma backward's reader of a swizzled 16-bit bias stage (make_issue_tile with
    swizzle; rows queries, columns keys), whose S^T accumulator has keys as rows and
    queries as columns. Returns (lane_offset, ROW_BYTES, to_f32):

    ``lane_offset(lane, chunk)``: the byte offset in the stage of the row this lane
    addresses in one ldmatrix.x4.trans of the 8 x 8 blocks (queries 8m .. 8m + 7, keys
    8 (chunk + h) .. + 7) for m, h = lane // 16, lane // 8 % 2. The blocks of queries
    row0 + 8m (row0 a multiple of 8) are at offset + row0 ROW_BYTES: the swizzle depends
    on the query's row % 8 only, so the offset is computed once. Register 2m + h of the
    load holds, for lane 4g + t, queries 8m + 2t and + 1 (low and high halves) of key
    8 (chunk + h) + g: the accumulator's pair of columns of that row.
    ``to_f32(word, e)``: half e of such a word as float32."""
    assert dtype in ("fp16", "bf16") and block_n * 2 % 128 == 0
    RW = block_n // 2

    @cuda.jit(device=True, inline=True)
    def lane_offset(lane, chunk):
        row = (lane >> np.int32(4)) * np.int32(8) + (lane & np.int32(7))
        c = chunk + ((lane >> np.int32(3)) & np.int32(1))
        return uint32(4 * (row * np.int32(RW) + swizzled_chunk(row, c) * np.int32(4)))

    return lane_offset, 4 * RW, make_half_to_f32(dtype)


def make_fragment_bias_reader(dtype: str, block_n: int):
    """The wgmma forward's reader of a swizzled 16-bit bias stage (make_issue_tile with
    swizzle; rows queries, columns keys: the S accumulator's orientation; rows
    block_n / 2 words apart). Returns (lane_offset, to_f32):

    ``lane_offset(lane, pair)``: the byte offset, from the first of the warp's 16 rows
    (a multiple of 8 rows into the stage), of the row this lane addresses in one
    ldmatrix.x4 of the warp's rows x keys 16 pair .. 16 pair + 15: matrix m = lane // 8
    is rows 8 (m % 2) .. + 7, keys 16 pair + 8 (m // 2) .. + 7. Register i of the load
    holds, for lane 4g + t, keys 16 pair + 8 (i // 2) + 2t and + 1 (low and high halves)
    of row g + 8 (i % 2): the accumulator's pair of columns of that row, its words
    4 (2 pair + i // 2) + 2 (i % 2) + e. The swizzle depends on the row % 8 (lane % 8)
    only; a load's chunk costs one XOR.
    ``to_f32(word, e)``: half e of such a word as float32."""
    assert dtype in ("fp16", "bf16") and block_n * 2 % 128 == 0
    RW = block_n // 2

    @cuda.jit(device=True, inline=True)
    def lane_offset(lane, pair):
        row = (lane & np.int32(7)) + ((lane >> np.int32(3)) & np.int32(1)) * np.int32(8)
        c = pair * np.int32(2) + (lane >> np.int32(4))
        return uint32(4 * (row * np.int32(RW) + swizzled_chunk(row, c) * np.int32(4)))

    return lane_offset, make_half_to_f32(dtype)


def make_fragment_mask_reader(block_n: int):
    """The wgmma forward's reader of a mask stage (make_issue_tile's padded rows: rows
    queries, columns keys, row_words(block_n, 1) apart). Returns (lane_offset, ROW_BYTES):
    ``lane_offset(lane)`` is the byte offset, from the first of the warp's 16 rows, of
    the word holding lane 4g + t's keys 2t and 2t + 1 of row g (bits 16 (t % 2) + 8e);
    keys 8j + 2t + e of row g + 8 half are at + 8j + 8 half ROW_BYTES, the same bits
    (one shared load a key pair at a constant offset, one test a score)."""
    RW = row_words(block_n, 1)

    @cuda.jit(device=True, inline=True)
    def lane_offset(lane):
        return uint32(4 * ((lane >> np.int32(2)) * np.int32(RW) + ((lane & np.int32(3)) >> np.int32(1))))

    return lane_offset, 4 * RW


def transposed_mask_row_words(block_n: int) -> int:
    """Words per row of the wgmma backward's mask stage: block_n bytes and one 16-byte
    pad, so that a warp's reads (rows 2t + e, 8 consecutive keys: make_transposed_mask_reader)
    fall in distinct banks."""
    return block_n // 4 + 4


def make_transposed_mask_reader(block_n: int):
    """The wgmma backward's reader of its mask stage (rows queries, columns keys,
    transposed_mask_row_words apart). Returns (lane_offset, ROW_BYTES): ``lane_offset(t,
    key)`` is the byte offset of the word holding (query 2t, key); query 2t + r, key + 8h
    is at + r ROW_BYTES + 8h (h: the other half of the thread's accumulator rows), and the
    byte sits at bit 8 (key % 4) of its word, the same for all of them (one shared load,
    a shift and a test a score)."""
    RW = transposed_mask_row_words(block_n)

    @cuda.jit(device=True, inline=True)
    def lane_offset(t, key):
        return uint32(4 * (np.int32(2) * t * np.int32(RW) + (key >> np.int32(2))))

    return lane_offset, 4 * RW
