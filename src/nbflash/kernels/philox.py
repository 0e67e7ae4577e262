"""Philox4x32-10 on the GPU: the device twin of nbflash.dropout.philox4x32_10 (the
counter scheme and keep rule are documented there)."""

from __future__ import annotations

from numba import cuda, uint32, uint64

from ..dropout import PHILOX_M0, PHILOX_M1, PHILOX_W0, PHILOX_W1, ROUNDS


@cuda.jit(device=True, inline=True)
def _mulhilo(a, b):
    """(high, low) 32-bit halves of the 64-bit product a * b."""
    product = uint64(a) * uint64(b)
    return uint32(product >> uint64(32)), uint32(product & uint64(0xFFFFFFFF))


@cuda.jit(device=True, inline=True)
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Four uint32 random words for counter (c0, c1, c2, c3) and key (k0, k1)."""
    c0, c1, c2, c3 = uint32(c0), uint32(c1), uint32(c2), uint32(c3)
    k0, k1 = uint32(k0), uint32(k1)
    for _ in range(ROUNDS):
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = uint32(k0 + uint32(PHILOX_W0))
        k1 = uint32(k1 + uint32(PHILOX_W1))
    return c0, c1, c2, c3


@cuda.jit(device=True, inline=True)
def keep_pair(seed_lo, seed_hi, bh, i, j, threshold):
    """(keep j, keep j + 1) for row i of (batch * heads_q + head) bh, j even: both
    words come from one Philox call (j and j + 1 share the counter j // 4)."""
    w0, w1, w2, w3 = philox4x32_10(j >> 2, i, bh, 0, seed_lo, seed_hi)
    if j & 2:
        return w2 >= threshold, w3 >= threshold
    return w0 >= threshold, w1 >= threshold
