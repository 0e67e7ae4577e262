"""cp.async copies of (rows x head_dim) 16-bit tiles from global to shared memory,
shared by the tensor-core kernels.

The loops are written so the compiler sees fixed trip counts: ``rows`` is a
compile-time constant at every call site, each thread keeps one 16-byte chunk column
when the threads tile a row evenly, and row/key arithmetic is 32-bit. Written as
``range(tid, rows * chunks, threads)`` the same copy compiled to ~1000 SASS
instructions per tile, twice the tile's own math (perf/NOTES.md, forward v3).
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from . import ptx


def make_issue_rows(head_dim: int, row_words: int, threads: int):
    """A device function ``issue_rows(src, smem, base, rows, b, h, start, n0, seqlen, tid)``
    that cp.asyncs rows start+n0 .. start+n0+rows-1 of src[b, :, h, :] (16-bit, head_dim
    wide, 16-byte aligned rows) into the shared tile at word ``base`` (rows of
    ``row_words`` 32-bit words). ``start`` is a packed sequence's first row (0 for
    dense tensors); rows at or past ``seqlen`` are zero-filled, never read, and their
    source address is clamped into the sequence, never the next packed sequence."""
    CHUNKS = head_dim // 8  # 16-byte chunks per row
    RSTEP = threads // CHUNKS  # rows one pass of all threads covers (when it divides)
    T = threads
    assert head_dim % 8 == 0

    @cuda.jit(device=True, inline=True)
    def issue_chunk(src, smem, base, r, c, b, h, start, n0, seqlen):
        j = np.int32(n0 + r)
        nbytes = np.int32(16) if j < seqlen else np.int32(0)
        j = max(np.int32(0), min(j, np.int32(seqlen - 1)))  # an address inside the tensor even when nothing is read
        ptx.cp_async_16(
            ptx.shared_address(smem, (base + r * np.int32(row_words) + c * np.int32(4),)),
            ptx.global_address(src, (b, start + j, h, c * np.int32(8))),
            nbytes,
        )

    @cuda.jit(device=True, inline=True)
    def issue_rows(src, smem, base, rows, b, h, start, n0, seqlen, tid):
        if T % CHUNKS == 0:
            c = np.int32(tid % CHUNKS)
            r0 = np.int32(tid // CHUNKS)
            for it in range((rows + RSTEP - 1) // RSTEP):
                r = r0 + np.int32(it * RSTEP)
                if rows % RSTEP == 0 or r < rows:
                    issue_chunk(src, smem, base, r, c, b, h, start, n0, seqlen)
        else:
            total = rows * CHUNKS
            for it in range((total + T - 1) // T):
                e = np.int32(tid + it * T)
                if total % T == 0 or e < total:
                    r = e // np.int32(CHUNKS)
                    issue_chunk(src, smem, base, r, e - r * np.int32(CHUNKS), b, h, start, n0, seqlen)

    return issue_rows
