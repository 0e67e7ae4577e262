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
MMA_TILES = {
    32: (128, 64, 128, 2, True),
    64: (128, 32, 128, 2, True),
    96: (128, 32, 128, 2, False),
    128: (128, 64, 256, 2, False),
}
MMA_TILES_SM90 = {  # (head_dim, causal) entries that beat MMA_TILES on Hopper
    (128, False): (128, 32, 128, 2, False),
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

    importlib.import_module(".plan", __package__).forget()  # the module; nbflash.plan is the function


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
