"""Write new k/v tokens into a KV cache in place, contiguous or through a block table.

A bit copy (elements travel as unsigned integers of their width), launched on the
same stream before the decode kernel, which therefore reads the new rows.
"""

from __future__ import annotations

from numba import cuda

from ..spec import AppendSpec


def build(spec: AppendSpec):
    """Kernel over grid (seqlen_new, heads_kv, B) with spec.threads threads.

    Arguments: k_new (B, Nn, Hkv, D), v_new (B, Nn, Hkv, Dv), k_cache, v_cache
    ((B, capacity, Hkv, D / Dv), or paged (blocks, block_size, Hkv, D / Dv)),
    block_table int32 (B, max_blocks) (ignored when contiguous), seqlens int32 (B,):
    token t of sequence b goes to position L_b + t, L_b = seqlens[b] clamped into
    [0, capacity - Nn] (capacity: the cache's second axis, or max_blocks x block_size
    when paged), so no length writes outside the cache (the host checks Nn <=
    capacity). All four arrays are unsigned-integer views of spec.bits.
    """
    T, PAGED = spec.threads, spec.paged

    def kv_append(k_new, v_new, k_cache, v_cache, block_table, seqlens):
        t = cuda.blockIdx.x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        capacity = block_table.shape[1] * k_cache.shape[1] if PAGED else k_cache.shape[1]
        pos = min(max(seqlens[b], 0), capacity - k_new.shape[1]) + t
        if PAGED:
            block_size = k_cache.shape[1]
            i0 = block_table[b, pos // block_size]
            i1 = pos % block_size
        else:
            i0 = b
            i1 = pos
        d, dv = k_new.shape[3], v_new.shape[3]
        for c in range(cuda.threadIdx.x, max(d, dv), T):
            if c < d:
                k_cache[i0, i1, h, c] = k_new[b, t, h, c]
            if c < dv:
                v_cache[i0, i1, h, c] = v_new[b, t, h, c]

    return cuda.jit(kv_append)
