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


def build(spec: CombineSpec):
    """Kernel over grid (Nq, Hq, B) with spec.threads threads.

    Arguments: part_out (splits, B, Hq, Nq, Dv), part_lse (splits, B, Hq, Nq) of the
    accumulator dtype; out (B, Nq, Hq, Dv) in the storage dtype (uint16 for bf16);
    lse float32 (B, Hq, Nq) (ignored unless spec.with_lse).
    """
    _, store, acc_t = _converters(spec.dtype)
    DV, T, WITH_LSE = spec.head_dim_v, spec.threads, spec.with_lse
    NEG_INF = -math.inf

    def combine(part_out, part_lse, out, lse):
        i = cuda.blockIdx.x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        tid = cuda.threadIdx.x
        n_splits = part_lse.shape[0]
        lse_max = acc_t(NEG_INF)
        for sp in range(n_splits):
            lse_max = max(lse_max, part_lse[sp, b, h, i])
        total = acc_t(0)
        if lse_max != NEG_INF:
            for sp in range(n_splits):
                total += math.exp(part_lse[sp, b, h, i] - lse_max)
        for d in range(tid, DV, T):
            o = acc_t(0)
            if total > 0:
                for sp in range(n_splits):
                    weight = math.exp(part_lse[sp, b, h, i] - lse_max)
                    o += weight * part_out[sp, b, h, i, d]
                o /= total
            out[b, i, h, d] = store(o)
        if WITH_LSE and tid == 0:
            lse[b, h, i] = lse_max + math.log(total) if total > 0 else NEG_INF

    return cuda.jit(combine)
