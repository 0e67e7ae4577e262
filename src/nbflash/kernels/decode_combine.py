"""Merge the partial outputs of split-KV decoding by their log-sum-exp.

Split s produced o_s (normalized by its own sum) and lse_s over its keys; the whole
row is out = sum_s exp(lse_s - lse) o_s with lse = log sum_s exp(lse_s). Splits that
saw no key have lse_s = -inf and weigh nothing; a row no split saw is 0 with lse -inf.
"""

from __future__ import annotations

import math

from numba import cuda

from ..spec import CombineSpec
from .forward_simt import _converters


MAX_SPLITS = 1024  # api_kvcache.MAX_SPLITS: the split weights live in shared memory


def build(spec: CombineSpec):
    """Kernel over grid (Nq, Hq, B) with spec.threads threads (a power of two).

    Arguments: part_out (splits, B, Hq, Nq, Dv), part_lse (splits, B, Hq, Nq) of the
    accumulator dtype; out (B, Nq, Hq, Dv) in the storage dtype (uint16 for bf16);
    lse float32 (B, Hq, Nq) (ignored unless spec.with_lse).

    The threads load the splits' lse together into shared memory, reduce their max
    and the sum of the weights exp(lse_s - max) across the CTA, then each output
    column is one pass over the splits with the loads independent of each other (the
    old kernel walked the splits three times per thread, one dependent load at a time:
    tens of microseconds at 32-128 splits).
    """
    _, store, acc_t = _converters(spec.dtype)
    DV, T, WITH_LSE = spec.head_dim_v, spec.threads, spec.with_lse
    assert T & (T - 1) == 0
    NEG_INF = -math.inf
    UNROLL = 4

    def combine(part_out, part_lse, out, lse):
        i = cuda.blockIdx.x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        tid = cuda.threadIdx.x
        n_splits = part_lse.shape[0]
        weight = cuda.shared.array(MAX_SPLITS, acc_t)
        red = cuda.shared.array(T, acc_t)

        # the max lse over the splits
        local = acc_t(NEG_INF)
        for sp in range(tid, n_splits, T):
            x = part_lse[sp, b, h, i]
            weight[sp] = x
            local = max(local, x)
        red[tid] = local
        cuda.syncthreads()
        step = T // 2
        while step > 0:
            if tid < step:
                red[tid] = max(red[tid], red[tid + step])
            cuda.syncthreads()
            step //= 2
        lse_max = red[0]
        cuda.syncthreads()

        # the weights exp(lse_s - max) and their sum (splits that saw no key weigh 0)
        local = acc_t(0)
        for sp in range(tid, n_splits, T):
            w = acc_t(0)
            if lse_max != NEG_INF:
                w = math.exp(weight[sp] - lse_max)
            weight[sp] = w
            local += w
        red[tid] = local
        cuda.syncthreads()
        step = T // 2
        while step > 0:
            if tid < step:
                red[tid] = red[tid] + red[tid + step]
            cuda.syncthreads()
            step //= 2
        total = red[0]

        scale = acc_t(0)
        if total > 0:
            scale = acc_t(1) / total
        main = n_splits - n_splits % UNROLL
        for d in range(tid, DV, T):
            o0 = acc_t(0)
            o1 = acc_t(0)
            o2 = acc_t(0)
            o3 = acc_t(0)
            for sp in range(0, main, UNROLL):  # four independent loads in flight
                o0 += weight[sp] * part_out[sp, b, h, i, d]
                o1 += weight[sp + 1] * part_out[sp + 1, b, h, i, d]
                o2 += weight[sp + 2] * part_out[sp + 2, b, h, i, d]
                o3 += weight[sp + 3] * part_out[sp + 3, b, h, i, d]
            for sp in range(main, n_splits):
                o0 += weight[sp] * part_out[sp, b, h, i, d]
            out[b, i, h, d] = store(((o0 + o1) + (o2 + o3)) * scale)
        if WITH_LSE and tid == 0:
            lse[b, h, i] = lse_max + math.log(total) if total > 0 else NEG_INF

    return cuda.jit(combine)
