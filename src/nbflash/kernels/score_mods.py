"""The attention variants inside a kernel: which keys a row sees (causal and sliding
window), which key tiles a block of rows can skip, and how a score is modified
(softcap, ALiBi, bias) before the softmax. Shared by the forward and backward
kernels, so both compute the same scores; values arrive as the kernel arguments in
nbflash.variants.KERNEL_ARGS (window bounds with causal folded in, UNBOUNDED for no
bound).

Order (as nbflash.reference._scores): t = scale * q.k; t = softcap * tanh(t /
softcap); t -= slope * |i + seqlen_k - seqlen_q - j|; t += bias[b, h, i, j]; hidden
(-inf) outside the window or where mask[b, h, i, j] is 0.
"""

from __future__ import annotations

import math

from numba import cuda, float32

from .convert import bf16_bits_to_f32


@cuda.jit(device=True, inline=True)
def window_visible(i, j, seqlen_q, seqlen_k, window_left, window_right):
    """Key j is visible to query i: inside the keys and the window band around the
    bottom-right-aligned diagonal i + seqlen_k - seqlen_q."""
    diagonal = i + seqlen_k - seqlen_q
    return j < seqlen_k and j >= diagonal - window_left and j <= diagonal + window_right


@cuda.jit(device=True, inline=True)
def window_key_range(row_start, row_end, seqlen_q, seqlen_k, window_left, window_right):
    """[first, end) of the keys any query row in [row_start, row_end) can see: key
    tiles outside it are skipped (row_end > row_start; the range may be empty)."""
    offset = seqlen_k - seqlen_q
    first = max(0, row_start + offset - window_left)
    end = min(seqlen_k, row_end - 1 + offset + window_right + 1)
    return first, max(first, end)


@cuda.jit(device=True, inline=True)
def tile_crosses_band(key_start, keys, diagonal, rows, window_left, window_right):
    """Keys [key_start, key_start + keys) cross an edge of the band that query rows
    whose diagonals (i + seqlen_k - seqlen_q) run from ``diagonal`` for ``rows`` rows
    see: some of those keys are hidden from some of those rows (mask per element)."""
    return (key_start + keys - 1 > diagonal + window_right
            or key_start < diagonal + rows - 1 - window_left)


@cuda.jit(device=True, inline=True)
def soft_cap(t, softcap):
    """(softcap * tanh(t / softcap), its derivative 1 - tanh^2) in float32."""
    th = math.tanh(float32(t) / softcap)
    return softcap * th, float32(1) - th * th


@cuda.jit(device=True, inline=True)
def alibi_term(slope, i, j, seqlen_q, seqlen_k):
    """-slope * |i + seqlen_k - seqlen_q - j|, added to the score of (i, j)."""
    return -slope * float32(abs(i + seqlen_k - seqlen_q - j))


@cuda.jit(device=True, inline=True)
def alibi_split(q_first, rows, k_first, keys, seqlen_q, seqlen_k, slope_u, slope_log2):
    """ALiBi's split for the tile of query rows [q_first, q_first + rows) and keys
    [k_first, k_first + keys) (derived in forward_mma at the S mma): (col_step,
    row_step, c0, crossing). With c_i = i + seqlen_k - seqlen_q and c0 = c_{q_first},
    keys at or left of every diagonal have -slope (c_i - j) = slope (j - c0) - slope
    (i - q_first), keys right of every one the mirror image. The key part is col_step
    (j - c0) in S units (col_step = +-slope_u, the slope in S units), the query part
    row_step (i - q_first) in exp2 units (row_step = -+slope log2(e)); both are 0 on a
    tile crossing the diagonals (crossing), which takes the exact term per score."""
    c0 = q_first + seqlen_k - seqlen_q
    left = k_first + keys - 1 <= c0
    right = k_first >= c0 + rows - 1
    col_step = float32(0)
    row_step = float32(0)
    if left:
        col_step = slope_u
        row_step = -slope_log2
    if right:
        col_step = -slope_u
        row_step = slope_log2
    return col_step, row_step, c0, not (left or right)


def bias_reader(dtype: str):
    """A device function reading bias[b, h, i, j] as float32 for a bias of short dtype
    name ``dtype`` (bfloat16 arrives as uint16 bits, see variants.kernel_values)."""
    if dtype == "bf16":
        @cuda.jit(device=True, inline=True)
        def read(bias, b, h, i, j):
            return bf16_bits_to_f32(bias[b, h, i, j])
    else:
        @cuda.jit(device=True, inline=True)
        def read(bias, b, h, i, j):
            return float32(bias[b, h, i, j])
    return read


@cuda.jit(device=True, inline=True)
def window_query_range(key_start, key_end, seqlen_q, seqlen_k, window_left, window_right):
    """[first, end) of the query rows that see any key in [key_start, key_end) (the
    backward's dK/dV kernels skip the query tiles outside it; key_end > key_start, keys
    past seqlen_k ignored; the range may be empty). Query i sees key j when
    j - offset - window_right <= i <= j - offset + window_left, offset = seqlen_k - seqlen_q."""
    offset = seqlen_k - seqlen_q
    last_key = min(key_end, seqlen_k) - 1
    first = max(0, key_start - offset - window_right)
    end = min(seqlen_q, last_key - offset + window_left + 1)
    return first, max(first, end)
