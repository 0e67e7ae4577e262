"""Per-sequence offsets for packed variable-length batches (nbflash.attention_varlen).

Sequence b of a packed batch owns rows cu_seqlens[b]:cu_seqlens[b + 1] of its tensor.
Kernels built with spec.varlen read the span of their CTA's sequence here; the clamp
keeps every access inside the tensor even when cu_seqlens was not checked on the host.
"""

from __future__ import annotations

import numpy as np
from numba import cuda


@cuda.jit(device=True, inline=True)
def sequence_span(cu_seqlens, b, total):
    """(start, length) of sequence b, clamped to rows 0..total; int32 like cu_seqlens,
    so that they take one register each for the life of the CTA."""
    last = np.int32(total)
    start = min(max(cu_seqlens[b], np.int32(0)), last)
    end = min(max(cu_seqlens[b + 1], start), last)
    return start, end - start
