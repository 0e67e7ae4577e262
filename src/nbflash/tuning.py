"""Tile configurations per (backend, dtype, head_dim).

The portable kernel's tiles are sized to fit the 48 KB of static shared memory;
tensor-core tiles come from perf/ measurements (see perf/NOTES.md), and each
shipped one compiles without spills (tests/test_ptx_gate.py).
"""

from __future__ import annotations

import os

_STATIC_SHARED_BYTES = 40 * 1024  # under the 48 KB static limit, with headroom


def simt_shared_bytes(block_m, block_n, head_dim, head_dim_v, acc_bytes):
    kv_width = max(head_dim, head_dim_v) + 1  # +1 pad: rows land on different banks
    words = block_m * head_dim + block_n * kv_width + block_m * block_n + 3 * block_m
    return words * acc_bytes


def simt_tiles(acc_bytes: int, head_dim: int, head_dim_v: int, simulator: bool):
    """(block_m, block_n, threads) for the portable kernel.

    Under the simulator small tiles keep CPU time down and make test sequences
    span several tiles.
    """
    if simulator:
        return 16, 16, 32
    for block_m, block_n in ((64, 64), (64, 32), (32, 32), (32, 16), (16, 16), (16, 8), (8, 8)):
        if simt_shared_bytes(block_m, block_n, head_dim, head_dim_v, acc_bytes) <= _STATIC_SHARED_BYTES:
            return block_m, block_n, 128
    raise AssertionError("unreachable: 8x8 tiles fit every head_dim up to 256")


# head_dim: (block_m, block_n, threads, stages, q_in_registers) for the tensor-core
# kernel, sm_80+. Measured on an H100 (perf/NOTES.md); block_m / (16 * warps) is the
# number of 16-row slices per warp.
MMA_TILES = {
    32: (128, 64, 128, 2, True),
    64: (128, 32, 128, 2, True),
    96: (64, 64, 128, 2, False),
    128: (128, 64, 256, 2, False),
}
# One warp and short key tiles on the simulator: the emulated mma is slow.
MMA_TILES_SIMULATOR = (16, 16, 32, 2, False)

_OVERRIDE_VARIABLE = "NBFLASH_MMA_TILES"


def _override(head_dim):
    """perf/ sweeps set NBFLASH_MMA_TILES="64=128,64,128,2,0;128=..." to time other tiles."""
    text = os.environ.get(_OVERRIDE_VARIABLE, "")
    for item in filter(None, text.split(";")):
        dim, values = item.split("=")
        if int(dim) == head_dim:
            bm, bn, threads, stages, q_regs = (int(x) for x in values.split(","))
            return bm, bn, threads, stages, bool(q_regs)
    return None


def mma_tiles(head_dim: int, simulator: bool):
    """(block_m, block_n, threads, stages, q_in_registers), or None when no
    tensor-core tile is shipped for head_dim."""
    if head_dim not in MMA_TILES:
        return None
    if simulator:
        return MMA_TILES_SIMULATOR
    return _override(head_dim) or MMA_TILES[head_dim]


# ---- split-KV decoding (kernels/decode.py) ----------------------------------------

DECODE_THREADS = 128  # 4 warps striding along the keys
DECODE_THREADS_SIMULATOR = 32  # one warp: every simulated thread costs CPU time
DECODE_MAX_ROWS = 4  # query rows held in registers per CTA (more: row chunks); 8 spills
DECODE_MAX_ROWS_SIMULATOR = 4  # tests cover row chunks with group x seqlen_q > 4
DECODE_BUSY_CTAS_PER_SM = 2  # resident CTAs an SM needs to keep its loads in flight
DECODE_MIN_SPLIT_KEYS = 256  # num_splits=0 never makes splits shorter than this
DECODE_MIN_SPLIT_KEYS_SIMULATOR = 8  # so simulator-sized caches still split
DECODE_MAX_AUTO_SPLITS = 128
DECODE_SIMULATOR_SMS = 4  # stands in for the SM count on the simulator
COMBINE_THREADS = 128
_DECODE_OVERRIDE = "NBFLASH_DECODE_TILES"  # "max_rows,threads,unroll" for perf/ sweeps


def decode_geometry(itemsize: int, head_dim: int, head_dim_v: int):
    """(vec, ept, lanes): elements per 16-byte load, elements of a key row each thread
    owns (a multiple of vec) and lanes per key row (a power of two <= 32)."""
    vec = 16 // itemsize
    width = max(head_dim, head_dim_v)
    ept = max(vec, -(-width // 32))
    ept = -(-ept // vec) * vec
    need = -(-width // ept)
    lanes = 1
    while lanes < need:
        lanes *= 2
    return vec, ept, lanes


def decode_tiles(itemsize: int, head_dim: int, head_dim_v: int, rows_needed: int,
                 vectorized: bool, simulator: bool):
    """(rows, threads, unroll) for the decode kernel.

    rows: the power of two >= rows_needed, capped so q and the accumulator of every
    row stay within ~32 registers each; unroll: keys per thread per step, as many
    as ~32 registers of K and V buffers allow (up to 4), double-buffered by the
    kernel's software pipeline. Measured with ptxas for sm_90a (tests/
    test_ptx_gate_decode.py): fp16, head_dim 128, 4 rows, unroll 4 compile to
    244-252 registers without spills (2 CTAs of 128 threads per SM); 8 rows spill.
    Scalar loads (misaligned caches) convert while loading and get half the unroll.
    """
    _, ept, _ = decode_geometry(itemsize, head_dim, head_dim_v)
    acc_words = 2 if itemsize == 8 else 1
    cap = DECODE_MAX_ROWS_SIMULATOR if simulator else DECODE_MAX_ROWS
    threads = DECODE_THREADS_SIMULATOR if simulator else DECODE_THREADS
    key_words = 2 * (ept * itemsize // 4 if vectorized else ept * acc_words)
    unroll = max(1, min(2 if simulator else 4, (32 if vectorized else 16) // key_words))
    if max(head_dim, head_dim_v) > 128:
        unroll = min(unroll, 2)  # unroll 4 compiles to 255 registers at head_dim 256: no margin
    override = os.environ.get(_DECODE_OVERRIDE, "")
    if override and not simulator:
        cap, threads, unroll = (int(x) for x in override.split(","))
    cap = max(1, min(cap, 32 // (ept * acc_words)))
    rows = 1
    while rows < min(rows_needed, cap):
        rows *= 2
    return min(rows, cap), threads, unroll


# Decode specializations the no-GPU gate compiles for sm_90a (tests/test_ptx_gate_decode.py):
# (dtype, head_dim, rows, block_size, causal, split, with_lse), all with 16-byte loads.
DECODE_GATE = [
    ("fp16", 128, 4, 0, True, True, False),
    ("fp16", 128, 4, 16, True, False, True),
    ("fp16", 128, 4, 256, False, False, False),
    ("bf16", 128, 4, 16, True, True, False),
    ("fp16", 128, 1, 0, True, True, False),
    ("fp16", 64, 4, 16, True, True, False),
    ("fp16", 256, 4, 0, True, True, False),
    ("fp32", 128, 4, 0, True, True, False),
]
