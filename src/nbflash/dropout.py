"""The dropout mask: a counter-based generator (Philox4x32-10, Salmon et al. 2011),
keyed by the user's seed and counted by element position, so the same seed gives
the same mask in the forward and the backward, in every kernel and tile shape.

Element (b, h, i, j) of a (batch, heads_q, seqlen_q, seqlen_k) score matrix takes
word j % 4 of Philox4x32-10(counter=(j // 4, i, b * heads_q + h, 0), key=(seed low
32 bits, seed high 32 bits)) and is kept when that word is >= keep_threshold(p)
(so with probability 1 - p, to 2^-32). Kept probabilities are scaled by 1 / (1 - p).
For varlen batches b is the sequence index and i, j count within the sequence.
kernels/philox.py is the device twin of :func:`philox4x32_10`.
"""

from __future__ import annotations

import numpy as np

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
ROUNDS = 10
_MASK32 = np.uint64(0xFFFFFFFF)


def keep_threshold(p: float) -> int:
    """The uint32 threshold: a word keeps its element when word >= threshold."""
    return min(int(p * 2.0**32), 2**32 - 1)


def split_seed(seed: int) -> tuple[int, int]:
    """(low, high) 32-bit halves of a 64-bit seed."""
    seed = int(seed) % 2**64
    return seed & 0xFFFFFFFF, seed >> 32


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 on NumPy arrays of counters (any broadcastable shapes, values
    below 2^32): four uint32 arrays."""
    c = [np.asarray(x, dtype=np.uint64) & _MASK32 for x in (c0, c1, c2, c3)]
    k0, k1 = np.uint64(k0), np.uint64(k1)
    for _ in range(ROUNDS):
        p0 = np.uint64(PHILOX_M0) * c[0]
        p1 = np.uint64(PHILOX_M1) * c[2]
        hi0, lo0 = p0 >> np.uint64(32), p0 & _MASK32
        hi1, lo1 = p1 >> np.uint64(32), p1 & _MASK32
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
        k0 = (k0 + np.uint64(PHILOX_W0)) & _MASK32
        k1 = (k1 + np.uint64(PHILOX_W1)) & _MASK32
    return [x.astype(np.uint32) for x in c]


def keep_mask(seed: int, p: float, batch: int, heads_q: int, seqlen_q: int, seqlen_k: int,
              batch_index=None) -> np.ndarray:
    """bool (batch, heads_q, seqlen_q, seqlen_k): True where dropout keeps the element.

    batch_index: the b used in the counter for each batch entry (default 0..batch-1;
    varlen passes the sequence index)."""
    k0, k1 = split_seed(seed)
    b = np.arange(batch) if batch_index is None else np.asarray(batch_index)
    h = np.arange(heads_q)
    i = np.arange(seqlen_q)
    j = np.arange(seqlen_k)
    bh = (b[:, None] * heads_q + h[None, :])[:, :, None, None]
    words = philox4x32_10(j[None, None, None, :] // 4, i[None, None, :, None], bh, 0, k0, k1)
    word = np.choose(j % 4, words) if seqlen_k else np.zeros((batch, heads_q, seqlen_q, 0), np.uint32)
    word = np.broadcast_to(word, (batch, heads_q, seqlen_q, seqlen_k))
    return word >= np.uint32(keep_threshold(p)) if p > 0 else np.ones(word.shape, dtype=bool)
