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
# kernel, per GPU generation. Measured on an H100 (perf/NOTES.md); block_m / (16 *
# warps) is the number of 16-row slices per warp. Every entry compiles without spills
# for its generation (tests/test_ptx_gate.py): sm_80's ptxas needs more registers for
# the m128n32 d128 tile than Hopper's, and at d128 the causal mask's few extra
# registers tip the m128n32 tile into spilling on sm_90 too.
# head_dim 192 and 256: the O accumulator alone is 96 / 128 registers per 16-row slice,
# so one slice per warp and Q in shared memory; not yet timed (perf/sweep_tiles.py),
# chosen as the largest spill-free tiles whose shared memory fits (ptxas -v, every
# dtype / causal / varlen: 171-255 registers): sm_80 spills at block_n 64 (4-44 bytes)
# and d256 n64 needs 198 KB, over an A100's 164 KB; on sm_90 m128n64t256 compiles clean.
MMA_TILES = {
    32: (128, 64, 128, 2, True),
    64: (128, 32, 128, 2, True),
    96: (128, 32, 128, 2, False),
    128: (128, 64, 256, 2, False),
    192: (128, 32, 256, 2, False),
    256: (128, 32, 256, 2, False),
}
MMA_TILES_SM90 = {  # (head_dim, causal) entries that beat MMA_TILES on Hopper
    (64, False): (128, 64, 128, 2, True),
    (64, True): (128, 64, 128, 2, True),
    (128, False): (128, 32, 128, 2, False),
    (128, True): (128, 32, 128, 2, False),
    (192, False): (128, 64, 256, 2, False),
    (192, True): (128, 64, 256, 2, False),
    (256, False): (128, 64, 256, 2, False),
    (256, True): (128, 64, 256, 2, False),
}
# One warp and short key tiles on the simulator: the emulated mma is slow.
MMA_TILES_SIMULATOR = (16, 16, 32, 2, False)

_OVERRIDE_VARIABLE = "NBFLASH_MMA_TILES"


_parsed_override: tuple[str, dict] = ("", {})


def _override(head_dim):
    """perf/ sweeps set NBFLASH_MMA_TILES="64=128,64,128,2,0;128=..." to time other tiles
    (read when a call signature is first dispatched; see set_override)."""
    global _parsed_override
    text = os.environ.get(_OVERRIDE_VARIABLE, "")
    if text != _parsed_override[0]:
        table = {}
        for item in filter(None, text.split(";")):
            dim, values = item.split("=")
            bm, bn, threads, stages, q_regs = (int(x) for x in values.split(","))
            table[int(dim)] = (bm, bn, threads, stages, bool(q_regs))
        _parsed_override = (text, table)
    return _parsed_override[1].get(head_dim)


def set_override(text: str):
    """Set NBFLASH_MMA_TILES for this process and its children, and forget the
    dispatch decisions nbflash.attention remembered under the previous tiles."""
    os.environ[_OVERRIDE_VARIABLE] = text
    import importlib

    importlib.import_module(".plans", __package__).forget()


def mma_tiles(head_dim: int, simulator: bool, arch: tuple = (8, 0), causal: bool = False):
    """(block_m, block_n, threads, stages, q_in_registers) for compute capability
    ``arch``, or None when no tensor-core tile is shipped for head_dim."""
    if head_dim not in MMA_TILES:
        return None
    if simulator:
        return MMA_TILES_SIMULATOR
    override = _override(head_dim)
    if override:
        return override
    if tuple(arch[:2]) >= (9, 0):
        return MMA_TILES_SM90.get((head_dim, causal), MMA_TILES[head_dim])
    return MMA_TILES[head_dim]


def _odd(n: int) -> int:
    """n, or n + 1 when even: an odd row length in words spreads a column over banks."""
    return n | 1


def backward_simt_shared_bytes(block_m, block_n, head_dim, head_dim_v, acc_bytes):
    """Static shared memory of the portable backward kernels (the larger of the two):
    K and V tiles with odd row lengths, Q and dO tiles, one block_m x block_n tile (P,
    then dS in place), and lse and delta of block_m rows, all in accumulation precision."""
    words = (
        block_n * (_odd(head_dim) + _odd(head_dim_v))
        + block_m * (head_dim + head_dim_v)
        + block_m * block_n
        + 2 * block_m
    )
    return words * acc_bytes


_BACKWARD_SIMT_TILES = (
    (64, 64), (32, 64), (32, 32), (16, 32), (16, 16), (8, 16), (8, 8), (4, 8), (4, 4),
)


def backward_simt_tiles(acc_bytes: int, head_dim: int, head_dim_v: int, simulator: bool):
    """(block_m, block_n, threads) for the portable backward kernels: the largest tile
    pair whose static shared memory fits. block_m != block_n on the simulator, so an
    index that mixes up query and key tiles fails the tests."""
    if simulator:
        return 8, 16, 32
    for block_m, block_n in _BACKWARD_SIMT_TILES:
        if backward_simt_shared_bytes(block_m, block_n, head_dim, head_dim_v, acc_bytes) <= _STATIC_SHARED_BYTES:
            return block_m, block_n, 128
    raise AssertionError("unreachable: 4x4 tiles fit every head_dim up to 256")


# head_dim: ((block_m, block_n, threads, kv_in_registers) of the dK/dV kernel,
#            (block_m, block_n, threads, q_in_registers) of the separate dQ kernel)
# for the tensor-core backward (kernels/backward_mma.py), sm_80+. Each compiles
# without spills (tests/test_ptx_gate_backward.py); block_n / (16 * warps) of the
# dK/dV kernel is the number of 16-key slices per warp, block_m / (16 * warps) of the
# dQ kernel the number of 16-query slices per warp.
MMA_BWD_TILES = {
    32: ((64, 64, 128, True), (64, 64, 128, True)),
    64: ((64, 128, 256, True), (64, 64, 128, True)),
    96: ((32, 64, 128, False), (64, 64, 128, False)),
    128: ((32, 64, 128, False), (64, 64, 128, True)),
}
# dQ by float32 atomics from the dK/dV kernel (FlashAttention-2's way) instead of the
# separate dQ kernel. Measured on an H100 (perf/results/sweeps/H100-backward-tiles-*):
# the separate kernel was faster in 27 of 28 (tiles, head_dim, causal) rows, by 10-35%,
# so no head_dim ships atomics; the atomic path stays buildable for other GPUs.
MMA_BWD_DQ_ATOMICS: dict[int, bool] = {}
# One warp, 16-row tiles on the simulator: the emulated mma is slow.
MMA_BWD_TILES_SIMULATOR = ((16, 16, 32, False), (16, 16, 32, False))


def mma_bwd_tiles(head_dim: int, simulator: bool):
    """((block_m, block_n, threads, kv_in_registers), (dq_block_m, dq_block_n,
    dq_threads, dq_in_registers)), or None when no tensor-core backward is shipped
    for head_dim."""
    if head_dim not in MMA_BWD_TILES:
        return None
    if simulator:
        return MMA_BWD_TILES_SIMULATOR
    return _bwd_override(head_dim) or MMA_BWD_TILES[head_dim]


def mma_bwd_dq_atomics(head_dim: int, simulator: bool) -> bool:
    """Whether the non-deterministic tensor-core backward accumulates dQ with float32
    atomics (the simulator always does, so both paths stay tested)."""
    return simulator or MMA_BWD_DQ_ATOMICS.get(head_dim, False)


_BWD_OVERRIDE_VARIABLE = "NBFLASH_MMA_BWD_TILES"


def _bwd_override(head_dim):
    """perf/ sweeps set NBFLASH_MMA_BWD_TILES="128=32,128,256,0/64,64,128,0;64=..."
    (dK/dV tiles / dQ tiles) to time other tiles."""
    for item in filter(None, os.environ.get(_BWD_OVERRIDE_VARIABLE, "").split(";")):
        dim, values = item.split("=")
        if int(dim) == head_dim:
            kv, dq = ([int(x) for x in part.split(",")] for part in values.split("/"))
            return (kv[0], kv[1], kv[2], bool(kv[3])), (dq[0], dq[1], dq[2], bool(dq[3]))
    return None



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


# ---- split-KV decoding on the tensor cores (kernels/decode_mma.py) ------------------
# The fast path for 16-bit caches with 16-byte aligned rows. Sizing (perf/NOTES.md,
# "Decode"): HBM3 needs ~20-30 KB in flight per SM (3 TB/s x ~1 us / 132 SMs). A warp
# owns a ring of `stages` buffers of 16 keys of K and V (8 KB of data at d128, 8.5 KB
# with the bank-conflict padding), stages - 1 of them in flight while it computes: 4
# warps x 3 stages = 104 KB of shared memory per CTA, two CTAs per SM, ~128 KB in flight
# per SM. The tensor cores and shared memory have ~10x headroom at 3 TB/s.
DECODE_MMA_THREADS = 128
DECODE_MMA_STAGES = 3
DECODE_MMA_SIMULATOR = (64, 2)  # two warps, so the cross-warp merge is exercised
DECODE_MMA_BUSY_CTAS_PER_SM = 2  # CTAs that fit an SM's shared memory (the split heuristic)
DECODE_MMA_MAX_HEAD_DIM = 256
DECODE_MMA_MIN_SPLIT_KEYS = 512  # num_splits=0 keeps each split >= 8 tiles per warp
_DECODE_MMA_OVERRIDE = "NBFLASH_DECODE_MMA_TILES"  # "threads,stages" for perf/ sweeps


def decode_mma_tiles(head_dim: int, head_dim_v: int, simulator: bool):
    """(threads, stages) of the tensor-core decode kernel; at head dims above 128 the
    rows are twice as long, so one stage fewer keeps two CTAs per SM."""
    if simulator:
        return DECODE_MMA_SIMULATOR
    override = os.environ.get(_DECODE_MMA_OVERRIDE, "")
    if override:
        threads, stages = (int(x) for x in override.split(","))
        return threads, stages
    if max(head_dim, head_dim_v) > 128:
        return DECODE_MMA_THREADS, 2
    return DECODE_MMA_THREADS, DECODE_MMA_STAGES


# Tensor-core decode specializations the no-GPU gate compiles (tests/test_ptx_gate_decode.py):
# (dtype, head_dim, head_dim_v, block_size, causal, split, with_lse).
# Measured (sm_90a, 0 spills): d128 166-168 registers (32-bit issue math; two 128-thread
# CTAs per SM fit both registers and the 102 KB of shared memory, three would by
# registers), d64 128, d96/80 168, d256 254 with Q in shared memory (140 KB: one CTA per SM).
DECODE_MMA_GATE = [
    ("fp16", 128, 128, 0, True, True, False),
    ("fp16", 128, 128, 16, True, False, False),
    ("fp16", 128, 128, 256, True, False, True),
    ("bf16", 128, 128, 64, False, True, False),
    ("fp16", 64, 64, 16, True, True, False),
    ("fp16", 256, 256, 0, True, True, False),
    ("bf16", 96, 80, 8, True, True, False),
]


# ---- variants in the portable backward (kernels/backward_simt.py) ------------------


def backward_simt_variant_tiles(acc_bytes: int, head_dim: int, head_dim_v: int, simulator: bool, softcap: bool):
    """backward_simt_tiles for a variant spec: softcap keeps 1 - tanh^2 of every P
    element in one more block_m x block_n tile, so the tiles shrink until it fits too."""
    if not softcap or simulator:
        return backward_simt_tiles(acc_bytes, head_dim, head_dim_v, simulator)
    for block_m, block_n in _BACKWARD_SIMT_TILES:
        words = block_m * block_n
        if backward_simt_shared_bytes(block_m, block_n, head_dim, head_dim_v, acc_bytes) + words * acc_bytes \
                <= _STATIC_SHARED_BYTES:
            return block_m, block_n, 128
    raise AssertionError("unreachable: 4x4 tiles fit every head_dim up to 256")


# Tensor-core backward tiles for variant specs where the plain ones spill: the
# per-element variant step (scores, visibility, dropout, dbias) needs registers that
# the d128 dQ kernel's Q/dO fragments in registers use up (tests/
# test_ptx_gate_backward_variants.py), so its fragments stay in shared memory.
MMA_BWD_VARIANT_TILES = {
    128: ((32, 64, 128, False), (64, 64, 128, False)),
}


def mma_bwd_variant_tiles(head_dim: int, simulator: bool):
    """mma_bwd_tiles for a spec with variants on."""
    if head_dim not in MMA_BWD_TILES or simulator or _bwd_override(head_dim):
        return mma_bwd_tiles(head_dim, simulator)
    return MMA_BWD_VARIANT_TILES.get(head_dim, MMA_BWD_TILES[head_dim])


# ---- attention variants (issue 7) ----------------------------------------------

# (head_dim, causal, heavy) -> tensor-core tiles for specs with variants compiled in,
# where the plain tiles would spill; heavy: see heavy_variant (per-element bias or
# mask reads, Philox words), else only window / softcap / ALiBi or staged tiles. Each entry compiles
# without spills for sm_90a (tests/test_ptx_gate_variants.py).
MMA_VARIANT_TILES: dict = {
    # heavy variants with two 16-row slices per warp spill (bf16, every variant: 4 to
    # 132 bytes): one slice per warp, or d128's 256-thread tile, halves acc and S
    (32, False, True): (64, 64, 128, 2, True),
    (32, True, True): (64, 64, 128, 2, True),
    (64, False, True): (64, 32, 128, 2, True),
    (64, True, True): (64, 32, 128, 2, True),
    (96, False, True): (64, 32, 128, 2, False),
    (96, True, True): (64, 32, 128, 2, False),
    (128, False, True): (128, 64, 256, 2, False),
    # light variants at d64 keep the 32-key tile: on sm_90's plain m128n64t128 the staged
    # fp32 bias + mask spills 16 bytes (bf16, causal)
    (64, False, False): (128, 32, 128, 2, True),
    (64, True, False): (128, 32, 128, 2, True),
    # d192 / d256: sm_90's plain m128n64t256 spills with every heavy variant (24 bytes)
    # and with staged tiles (4-48 bytes; d256's staged bias also needs 234 KB): the
    # 32-key tile (sm_80's plain one) for all of them, spill-free with every variant
    **{(d, causal, heavy): (128, 32, 256, 2, False) for d in (192, 256) for causal in (False, True)
       for heavy in (False, True)},
}


def mma_variant_tiles(head_dim: int, simulator: bool, arch: tuple, causal: bool, variant, tiles):
    """The tensor-core tiles for a spec with ``variant`` compiled in: ``tiles`` (the
    plain ones) unless MMA_VARIANT_TILES names smaller ones."""
    if simulator or _override(head_dim):
        return tiles
    return MMA_VARIANT_TILES.get((head_dim, causal, heavy_variant(variant)), tiles)


def heavy_variant(variant) -> bool:
    """Dropout, or a bias / mask read per element, or a staged one beside window,
    softcap or ALiBi: the plain tiles spill (d128 with every light variant and staged
    tiles: 16 bytes). Staged tiles alone keep the plain tiles spill-free (bias or mask
    at d128: 253-255 registers on sm_90a; tests/test_ptx_gate_variants.py)."""
    per_element = (variant.bias and not variant.bias_staged) or (variant.mask and not variant.mask_staged)
    staged = variant.bias_staged or variant.mask_staged
    return bool(variant.dropout or per_element or (staged and (variant.window or variant.softcap or variant.alibi)))


# ---- the Hopper wgmma forward (kernels/forward_wgmma.py) ---------------------------
# On by default on sm_90 (NBFLASH_WGMMA=0 turns it off, =1 turns it on in the simulator
# too): fp16 / bf16, head_dim 64, 128, 192 and 256, dense, plain or (head_dim 64 and
# 128) window / softcap / ALiBi (wgmma_variant). head_dim: (block_m,
# block_n, threads); block_m is 64 rows per warpgroup of threads / 128. Measured on an
# H100 (perf/sweep_wgmma_tiles.py, fp16 N 4096, TFLOP/s full / causal, same run as
# SDPA flash): d64 m128n64t256 337 / 275 (1.16 / 1.10x flash) against m128n128t256
# 264 / 225 and m192n128t384 280 / 219; d128 m128n128t256 333 / 300 (1.02 / 1.05x)
# against m128n64t256 311 / 285. Each compiles without spills for sm_90a
# (tests/test_ptx_gate_wgmma.py). d192 and d256 (3 and 4 panels): the
# largest key tiles whose Q + 2 stages of K and V fit the 227 KB (217 KB and 225 KB;
# FlashAttention-3's d256 tile is m128n80 too), 250-254 registers, no spills
# (m128n64 and m128n96 at d192, m128n64 at d256 compile clean as well).
WGMMA_TILES = {
    64: (128, 64, 256),
    128: (128, 128, 256),
    192: (128, 112, 256),
    256: (128, 80, 256),
}
# Head dims where the mma.sync kernel measured faster (H100, fp16 B4 N4096 H16, same run:
# d192 mma m128n64t256 228 / 208 TFLOP/s full / causal against wgmma m128n112t256 219 /
# 190): wgmma runs there only when NBFLASH_WGMMA=1 asks for it. d256: wgmma 406 / 343
# against mma 244 / 221 (1.28 / 1.16x SDPA flash).
WGMMA_ONLY_WHEN_ASKED = (192,)
WGMMA_TILES_SIMULATOR = (64, 64, 128)  # one warpgroup: 128 simulated threads
_WGMMA_VARIABLE = "NBFLASH_WGMMA"
_WGMMA_OVERRIDE = "NBFLASH_WGMMA_TILES"  # "64=128,128,256;128=..." for perf/ sweeps


def wgmma_enabled(simulator: bool = False) -> bool:
    """Whether the wgmma forward runs where it applies: NBFLASH_WGMMA=1 on, =0 off;
    unset, on for a GPU and off on the simulator (whose tests of the mma kernel would
    otherwise run the wgmma one; tests/test_forward_wgmma.py turns it on)."""
    value = os.environ.get(_WGMMA_VARIABLE, "")
    if value in ("0", "1"):
        return value == "1"
    return not simulator


def wgmma_tiles(head_dim: int, simulator: bool, arch: tuple):
    """(block_m, block_n, threads) of the wgmma forward, or None where it does not run:
    turned off, another head_dim, or not sm_90 (wgmma is sm_90a only; the simulator
    emulates it)."""
    if not wgmma_enabled(simulator) or head_dim not in WGMMA_TILES:
        return None
    if head_dim in WGMMA_ONLY_WHEN_ASKED and os.environ.get(_WGMMA_VARIABLE) != "1":
        return None
    if simulator:
        return WGMMA_TILES_SIMULATOR
    if tuple(arch[:2]) != (9, 0):
        return None
    for item in filter(None, os.environ.get(_WGMMA_OVERRIDE, "").split(";")):
        dim, values = item.split("=")
        if int(dim) == head_dim:
            bm, bn, threads = (int(x) for x in values.split(","))
            return bm, bn, threads
    return WGMMA_TILES[head_dim]


# FlashAttention-3's intra-warpgroup pipelining (forward_wgmma, spec.softmax_overlap):
# the softmax of key tile j overlaps O += P V of tile j - 1, holding the next S tile beside
# P and O. H100, overlap off -> on (perf/results/session10/): d128 fp16 N4096 386.3 ->
# 391.6 TFLOP/s full, 335.6 -> 347.2 causal (two runs); d128 16k, same run as off: causal
# + ALiBi 1.22 -> 1.08x plain causal (call time), + softcap 1.31 -> 1.27x, window
# (1024, 0) faster (0.848 -> 0.726 ms a call). d64 lost (388.1 -> 355.5 full, 311.0 ->
# 295.3 causal: two CTAs an SM already overlap one's softmax with the other's wgmma), so
# it runs at head_dim 128 only; d192 / d256 sit at 250-254 registers without it; d128
# with window and ALiBi together spills 92-116 bytes with it (248 registers, none,
# without); packed varlen batches keep the serial loop (ptxas serializes the wgmma of the
# varlen kernel with the overlap: api_varlen turns it off). NBFLASH_WGMMA_OVERLAP=0 turns
# it off (A/B runs).
WGMMA_OVERLAP_HEAD_DIMS = (128,)
_WGMMA_OVERLAP_VARIABLE = "NBFLASH_WGMMA_OVERLAP"


def wgmma_overlap(head_dim: int, variant=None) -> bool:
    """The wgmma forward at head_dim with this spec.Variant overlaps each tile's softmax
    with the previous tile's P V (spec.ForwardSpec.softmax_overlap)."""
    if head_dim not in WGMMA_OVERLAP_HEAD_DIMS or os.environ.get(_WGMMA_OVERLAP_VARIABLE) == "0":
        return False
    return not (head_dim == 128 and variant is not None and variant.window and variant.alibi)


# FlashAttention-4's exp2 emulation in the wgmma forward (spec.ForwardSpec.exp2_fma): of
# every four 8-key blocks of scores, this many take exp2 as a polynomial on the FMA pipe
# (kernels.ptx.ex2_fma) instead of the MUFU. Softcap puts a tanh.approx on the MUFU for
# every score beside the exp2, so it alone takes the emulation. Session 12 (two K/V stages,
# H100, d128 fp16 causal 16k H16): softcap 1.167 -> 1.154x plain causal at n = 1, worse at
# 2 and 3 (the emulation's issue slots cost as much as the MUFU time it frees). Over the
# three-stage loop (tuning.wgmma_stages), same H100, one process each (perf/results/
# session14/exp2/): softcap 2.731 / 2.703 / 2.808 ms at n = 0 / 1 / 2 against plain causal
# 2.477 (1.103 / 1.091 / 1.133x); softcap + ALiBi 1.145 / 1.140 / 1.167x. Accuracy: the
# fit's 2.7e-6 relative error, below the lse's 2e-5 (session 12's GPU check: the same fp16
# error as n = 0). Head_dim 64 stays at 0: session 12 measured its softcap 1.445 -> 1.512x
# at n = 2 and n = 1 has not run there. NBFLASH_EXP2_FMA=n sets softcap's n at every
# head_dim (A/B runs; 0-4).
EXP2_FMA_SOFTCAP = {128: 1}
_EXP2_FMA_VARIABLE = "NBFLASH_EXP2_FMA"


def wgmma_exp2_fma(head_dim: int, variant=None) -> int:
    """How many of every four 8-key blocks take exp2 on the FMA pipe in the wgmma forward
    at head_dim with this spec.Variant (spec.ForwardSpec.exp2_fma): softcap's count,
    else none."""
    return _softcap_exp2_fma(EXP2_FMA_SOFTCAP, _EXP2_FMA_VARIABLE, head_dim, variant)


def _softcap_exp2_fma(counts: dict, variable: str, head_dim: int, variant) -> int:
    """A softcap variant's count from ``counts`` (by head_dim; 0 where absent), or the
    environment ``variable``'s (0-4); 0 without softcap."""
    if variant is None or not variant.softcap:
        return 0
    override = os.environ.get(variable, "")
    return int(override) if override in ("0", "1", "2", "3", "4") else counts.get(head_dim, 0)


# The same emulation in the fused wgmma backward's softcap path (spec.BackwardMmaSpec.
# exp2_fma), where each score loads the MUFU three times (tanh for P, exp2, and lg2 to
# recover tanh from P for its derivative). H100, d128 fp16 causal 16k H16, one process
# per n (perf/results/session16/b): softcap 30 8.33 / 8.14 / 8.20 ms at n = 0 / 1 / 2
# against plain causal 7.44-7.46 (1.117 / 1.094 / 1.101x). Head_dim 64 not measured (0).
# NBFLASH_EXP2_FMA_BWD=n sets it (A/B runs; 0-4).
EXP2_FMA_BWD_SOFTCAP = {128: 1}
_EXP2_FMA_BWD_VARIABLE = "NBFLASH_EXP2_FMA_BWD"


def wgmma_bwd_exp2_fma(head_dim: int, variant=None) -> int:
    """How many of every four 8-query blocks of P take exp2 on the FMA pipe in the fused
    wgmma backward at head_dim with this spec.Variant: softcap's count, else none."""
    return _softcap_exp2_fma(EXP2_FMA_BWD_SOFTCAP, _EXP2_FMA_BWD_VARIABLE, head_dim, variant)


# K/V buffers of the wgmma forward. With two, every tile ends in a CTA-wide barrier (the
# stages it read are refilled by the next tile); with three the refilled stages are the
# ones read two tiles back, which the next tile's first barrier already covers, so that
# barrier goes. Session 12's timing-only build without it (racy) measured d128 fp16 16k
# full 4.99 -> 4.69 ms, causal 2.49 -> 2.39, causal + softcap 2.91 -> 2.67 (softcap / causal
# 1.168 -> 1.120). Shared memory: d128 m128n128 Q 32 KB + 3 x 64 KB of K and V = 225 KB of
# the 227 KB; d192 / d256 do not fit three. NBFLASH_WGMMA_STAGES=2 or 3 overrides (A/B runs;
# a count whose buffers do not fit falls back to 2).
WGMMA_STAGES = {128: 3}
_WGMMA_STAGES_VARIABLE = "NBFLASH_WGMMA_STAGES"
WGMMA_MAX_SHARED_BYTES = 232448  # sm_90's opt-in dynamic shared memory a block


def wgmma_stages(head_dim: int, block_m: int, block_n: int) -> int:
    """K/V buffers (2 or 3) the wgmma forward uses at head_dim with these tiles."""
    stages = WGMMA_STAGES.get(head_dim, 2)
    override = os.environ.get(_WGMMA_STAGES_VARIABLE, "")
    if override in ("2", "3"):
        stages = int(override)
    # Q, then K and V stages of 16-bit tiles, and the 1024-byte alignment slack
    fits = 2 * head_dim * (block_m + 2 * stages * block_n) + 1024 <= WGMMA_MAX_SHARED_BYTES
    return stages if fits else 2


WGMMA_VARIANT_HEAD_DIMS = (64, 128)  # d192/d256 sit at 250-255 registers plain: no room


# Whether the wgmma forward takes a staged 16-bit bias and a staged mask (kernels/
# forward_wgmma.py); NBFLASH_WGMMA_FWD_SCORES=0/1 overrides it (perf/ comparisons, tests).
# H100, fp16 d128 B4 H16 N4096, not causal, same run (perf/results/session16/c): plain wgmma
# 1.287 ms, + a BHNN fp16 bias 1.632 (+0.35 ms, its bytes 0.64 ms at bandwidth), + a BHNN
# mask 1.554 (+0.27 ms, bytes 0.32), where the mma.sync kernel took 2.417 / 2.344.
# At head_dim 64 the bias kernels take 133-168 registers (ptxas, sm_90a), above the 128 at
# which two 256-thread CTAs share an SM as plain d64's (114) do; no GPU has timed them
# against the mma.sync kernel, so by default they run at head_dim 128 only (=1 turns them
# on at 64 as well).
WGMMA_FWD_SCORES = True
WGMMA_FWD_SCORES_HEAD_DIMS = (128,)
_WGMMA_FWD_SCORES_OVERRIDE = "NBFLASH_WGMMA_FWD_SCORES"


def wgmma_fwd_scores(head_dim: int) -> bool:
    override = os.environ.get(_WGMMA_FWD_SCORES_OVERRIDE)
    if override is not None:
        return override == "1"
    return WGMMA_FWD_SCORES and head_dim in WGMMA_FWD_SCORES_HEAD_DIMS


def _wgmma_takes_scores(variant, scores_on: bool) -> bool:
    """What both wgmma kernels ask of a variant's bias and mask: none, or (while
    ``scores_on``) a staged 16-bit bias and a staged mask."""
    return ((not variant.bias or (variant.bias in ("fp16", "bf16") and variant.bias_staged))
            and (not variant.mask or variant.mask_staged)
            and (not (variant.bias or variant.mask) or scores_on))


def wgmma_variant(variant, head_dim: int = 64, scores=None) -> bool:
    """The wgmma forward compiles this spec.Variant in at head_dim: plain anywhere, the
    light variants (window, softcap, ALiBi, in any combination) at head_dim 64 and 128,
    and there also a staged 16-bit bias and a staged mask (spec.Variant.bias_staged /
    mask_staged) where wgmma_fwd_scores(head_dim) is on (``scores``: whether they count
    as on, default wgmma_fwd_scores(head_dim); the compile gate passes True). A float32
    or unstaged bias, an unstaged mask and dropout run the mma kernel, as do a bias and a
    mask whose stages do not fit beside the kernel's (api.choose_forward_spec checks)."""
    if not variant:
        return True
    scores_on = wgmma_fwd_scores(head_dim) if scores is None else scores
    return head_dim in WGMMA_VARIANT_HEAD_DIMS and not variant.dropout and _wgmma_takes_scores(variant, scores_on)


# Whether the fused wgmma backward takes a staged bias / mask (kernels/backward_wgmma.py);
# NBFLASH_WGMMA_BWD_SCORES=0/1 overrides it (perf/ comparisons, tests). H100, fp16 d128 B4
# H16 N4096, not causal, same run (perf/results/session16/): plain 4.12 ms, + a BHNN fp16
# bias 4.55 (+0.44 ms, bytes 0.64), + a BHNN mask 4.44 (+0.32, bytes 0.32), where the
# mma.sync backward had added 3.05 / 1.74 ms to its 7.50 (session 11).
WGMMA_BWD_SCORES = True
_WGMMA_BWD_SCORES_OVERRIDE = "NBFLASH_WGMMA_BWD_SCORES"


def wgmma_bwd_scores() -> bool:
    override = os.environ.get(_WGMMA_BWD_SCORES_OVERRIDE)
    return WGMMA_BWD_SCORES if override is None else override == "1"


def wgmma_bwd_variant(variant, head_dim: int = 64, scores=None) -> bool:
    """The wgmma backward's fused dK/dV/dQ kernel compiles this spec.Variant in at
    head_dim: plain, and at head_dim 64 and 128 window, softcap, ALiBi, a 16-bit bias and
    a mask, both staged (spec.Variant.bias_staged / mask_staged), in any combination but
    softcap with ALiBi or a bias (its tanh' would have to undo their terms too). Those
    pairs, a float32 or unstaged bias, an unstaged mask, a bias or mask while
    wgmma_bwd_scores() is off, and dropout run the mma.sync backward, as do the
    variants under deterministic=True, and so do a bias and a mask together where their
    stages do not fit beside the kernel's (head_dim 128: api_backward.choose_backward_spec
    checks). ``scores``: whether the bias / mask kernels count as on (default
    wgmma_bwd_scores(); the kernel builder and the compile gate pass True)."""
    if not variant:
        return True
    scores_on = wgmma_bwd_scores() if scores is None else scores
    light = not (variant.dropout or (variant.softcap and (variant.alibi or variant.bias)))
    scores = _wgmma_takes_scores(variant, scores_on)
    return head_dim in WGMMA_VARIANT_HEAD_DIMS and light and scores


WGMMA_VARLEN_VARIANT_HEAD_DIMS = (64,)


def wgmma_varlen(head_dim: int, variant=None) -> bool:
    """The wgmma forward also runs packed varlen batches (nbflash.attention_varlen): plain
    at head_dim 64 and 128, with the light variants at 64. ptxas (sm_90a, causal): d64
    plain 114 -> 136 registers with varlen, with window + softcap + ALiBi 168 -> 196; d128
    plain 214 -> 229, with all three 255 -> 255 and 88 bytes of spills. 192 and 256 sit
    at 250-254 registers dense. The rest keep forward_mma."""
    if variant:
        return head_dim in WGMMA_VARLEN_VARIANT_HEAD_DIMS and wgmma_variant(variant, head_dim)
    return head_dim in WGMMA_VARIANT_HEAD_DIMS


def set_wgmma(enabled: bool):
    """Set NBFLASH_WGMMA for this process and forget the dispatch decisions
    nbflash.attention remembered (perf/bench_forward.py --wgmma times both paths)."""
    os.environ[_WGMMA_VARIABLE] = "1" if enabled else "0"
    import importlib

    importlib.import_module(".plans", __package__).forget()


# The tensor-core backward's delta = rowsum(dO * O) kernel (kernels/backward_delta.py):
# head_dim / 8 lanes per row, so 256 threads cover 32 rows at head_dim 64.
DELTA_THREADS = 256
DELTA_THREADS_SIMULATOR = 32  # one warp: every simulated thread costs CPU time


def delta_threads(simulator: bool) -> int:
    return DELTA_THREADS_SIMULATOR if simulator else DELTA_THREADS

# ---- the Hopper wgmma backward (kernels/backward_wgmma.py) -------------------------
# Runs where the wgmma forward does (wgmma_enabled, sm_90), for plain dense fp16/bf16 at
# head_dim 64 and 128. head_dim: ((block_m, block_n, threads) of the dK/dV kernel,
# (dq_block_m, dq_block_n, dq_threads) of the dQ kernel); block_n and dq_block_m are
# 64 per warpgroup of threads / 128. Measured on an H100 (perf/sweep_wgmma_bwd_tiles.py,
# fp16 B4 N4096 H16, TFLOP/s full / causal, same run as SDPA flash 251 / 207 at d64 and
# 288 / 264 at d128): d64 dK/dV m64n64t128 + dQ m128n128t256 193 / 146 against
# m64n128t256 + m128n64t256 180 / 131; d128 m64n128t256 + m128n64t256 236 / 200 against
# m64n64t128 + m128n64t256 236 / 172 and m32n128t256 210 / 156. Each compiles without
# spills for sm_90a (tests/test_ptx_gate_wgmma.py; d128 dK/dV at 255 registers).
WGMMA_BWD_TILES = {
    64: ((64, 64, 128), (128, 128, 256)),
    128: ((64, 128, 256), (128, 64, 256)),
}
# One warpgroup; 16-row query tiles (dK/dV) and 16-key tiles (dQ) so that small test
# sequences span several of them.
WGMMA_BWD_TILES_SIMULATOR = ((16, 64, 128), (64, 16, 128))
_WGMMA_BWD_OVERRIDE = "NBFLASH_WGMMA_BWD_TILES"  # "128=64,128,256,128,64,256;..." for perf/ sweeps


# The fused dQ ("dkdvq"): dS^T to shared memory, dQ = dS K by wgmma in the dK/dV kernel,
# staged in shared memory and added into a float32 accumulator by one bulk reduce per
# query tile (cp.reduce.async.bulk), then dq_convert: 5 matmuls instead of the separate
# dQ kernel's 7. head_dim: whether the non-deterministic backward takes it (its dK/dV
# block_m must be 64: the dQ wgmma's M). Measured (perf/NOTES.md, session 8;
# probe_backward_kernels on an H200, fp16 B4 N4096 H16, same run, kernel sums in ms, fused /
# two kernels): d64 2.378 / 2.574 full, 1.299 / 1.420 causal; d128 4.178 / 4.279, 2.345 /
# 2.425. bench_backward on the H100 (whole calls back to back): fused 1.07x faster at d64,
# within 2% of the two kernels at d128. Per-element red.global.add (v2 or v4) instead of
# the bulk reduce lost at d64 (session 7).
# NBFLASH_WGMMA_BWD_DQ_ATOMICS=0/1 overrides it for perf/ comparisons.
WGMMA_BWD_DQ_ATOMICS: dict[int, bool] = {64: True, 128: True}
_WGMMA_BWD_DQ_ATOMICS_OVERRIDE = "NBFLASH_WGMMA_BWD_DQ_ATOMICS"


def wgmma_bwd_dq_atomics(head_dim: int, simulator: bool) -> bool:
    """Whether the non-deterministic wgmma backward fuses dQ into the dK/dV kernel. Not
    on the simulator, whose 16-row query tiles cannot feed the dQ wgmma (the tests run
    the fused kernel with 64-row tiles explicitly)."""
    override = os.environ.get(_WGMMA_BWD_DQ_ATOMICS_OVERRIDE)
    if override is not None and not simulator:
        return override == "1"
    return not simulator and WGMMA_BWD_DQ_ATOMICS.get(head_dim, False)


def wgmma_bwd_dq_cols(head_dim: int) -> int:
    """dQ columns per wgmma of the fused kernel (its accumulator holds half as many
    float32 per thread): 64 (one panel) where the dK/dV kernel has the registers, 32 at
    head_dim 128, whose dK/dV kernel already sits at 250 (64 spills 120-184 bytes, 32
    none: session 8)."""
    return 32 if head_dim >= 128 else 64


def wgmma_bwd_tiles(head_dim: int, simulator: bool, arch: tuple):
    """The wgmma backward's two tile triples (see WGMMA_BWD_TILES), or None where it
    does not run (as wgmma_tiles)."""
    if not wgmma_enabled(simulator) or head_dim not in WGMMA_BWD_TILES:
        return None
    if simulator:
        return WGMMA_BWD_TILES_SIMULATOR
    if tuple(arch[:2]) != (9, 0):
        return None
    for item in filter(None, os.environ.get(_WGMMA_BWD_OVERRIDE, "").split(";")):
        dim, values = item.split("=")
        if int(dim) == head_dim:
            v = tuple(int(x) for x in values.split(","))
            return v[:3], v[3:]
    return WGMMA_BWD_TILES[head_dim]
