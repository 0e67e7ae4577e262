"""Small cases of every entry point, for compute-sanitizer on a GPU.

    compute-sanitizer --tool memcheck --error-exitcode 9 python3 perf/sanitize.py
    compute-sanitizer --tool racecheck --error-exitcode 9 python3 perf/sanitize.py [forward backward varlen kvcache]

Each case runs once on random inputs (never zeros) of odd sizes, so that every kernel
family meets partial tiles: the wgmma and mma.sync forwards (plain, causal, a light
variant), the wgmma and mma.sync backwards, varlen forward and backward, and the
contiguous and paged KV-cache decode. Each case's result is also compared with the
float64 oracle, so a kernel that the sanitizer slows into a different code path still
has to be right. Prints one line per case and exits non-zero when any case is wrong;
the sanitizer's own report (and exit code) says whether memory was touched out of
bounds, an API call failed, or shared memory raced.

Set NBFLASH_CACHE_DIR to one directory for both tools so the second run loads the
kernels the first one compiled."""

from __future__ import annotations

import sys

import cupy
import ml_dtypes
import numpy as np

import nbflash
from nbflash import reference, tuning

TOLERANCE = {np.float16: 3e-3, ml_dtypes.bfloat16: 1e-2}  # the issues' relative-error bounds
# (gradients get 4x that: tests/helpers.py's GRAD_ROUNDINGS)


def rand(rng, shape, dtype):
    return cupy.asarray(rng.standard_normal(shape).astype(dtype))


def host(x):
    return cupy.asnumpy(x).astype(np.float64)


def relative_error(got, want):
    """Normwise, as tests/helpers.py measures."""
    return float(np.linalg.norm(host(got) - want) / max(np.linalg.norm(want), 1e-30))


F16, BF16 = np.float16, ml_dtypes.bfloat16
# (wgmma, dtype, head_dim, causal, window): each kernel family and dtype once, partial tiles
# everywhere; few cases, since each is a compile and a sanitizer run
FORWARD = [(True, F16, 64, False, None), (True, BF16, 128, True, None), (True, F16, 64, True, (37, 0)),
           (False, BF16, 64, False, None), (False, F16, 128, True, None)]
BACKWARD = [(True, F16, 64, False), (True, BF16, 128, True), (False, F16, 128, True)]


def forward_cases(rng):
    for wgmma, dtype, head_dim, causal, window in FORWARD:
        tuning.set_wgmma(wgmma)
        q = rand(rng, (2, 77, 4, head_dim), dtype)
        k, v = (rand(rng, (2, 131, 2, head_dim), dtype) for _ in range(2))
        o = nbflash.attention(q, k, v, causal=causal, window=window)
        want = reference.attention(host(q), host(k), host(v), causal=causal, window=window)
        key = nbflash.forward_spec(q, k, v, causal=causal, window=window).key
        yield f"forward {key}", relative_error(o, want), TOLERANCE[dtype]


def backward_cases(rng):
    for wgmma, dtype, head_dim, causal in BACKWARD:
        tuning.set_wgmma(wgmma)
        q = rand(rng, (1, 93, 4, head_dim), dtype)
        k, v = (rand(rng, (1, 70, 2, head_dim), dtype) for _ in range(2))
        do = rand(rng, q.shape, dtype)
        o, lse = nbflash.attention(q, k, v, causal=causal, return_lse=True)
        grads = nbflash.attention_backward(do, q, k, v, o, lse, causal=causal)
        want = reference.attention_backward(host(do), host(q), host(k), host(v), causal=causal)
        key = nbflash.backward_spec(q, k, v, causal=causal).key
        for name, got, ref in zip("dq dk dv".split(), grads, want):
            yield f"backward {key} {name}", relative_error(got, ref), 4 * TOLERANCE[dtype]


def varlen_cases(rng):
    tuning.set_wgmma(True)
    lengths_q, lengths_k = [1, 0, 70, 33], [5, 9, 130, 33]
    cu_q = cupy.asarray(np.concatenate([[0], np.cumsum(lengths_q)]).astype(np.int32))
    cu_k = cupy.asarray(np.concatenate([[0], np.cumsum(lengths_k)]).astype(np.int32))
    for dtype in (np.float16,):
        q = rand(rng, (sum(lengths_q), 4, 64), dtype)
        k, v = (rand(rng, (sum(lengths_k), 2, 64), dtype) for _ in range(2))
        do = rand(rng, q.shape, dtype)
        o, lse = nbflash.attention_varlen(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
        grads = nbflash.attention_varlen_backward(do, q, k, v, o, lse, cu_q, cu_k, causal=True)
        outs = [o, *grads]
        wants = [np.zeros(o.shape), *(np.zeros(g.shape) for g in grads)]
        bq, bk = cupy.asnumpy(cu_q), cupy.asnumpy(cu_k)
        for b in range(len(lengths_q)):
            sq, sk = slice(bq[b], bq[b + 1]), slice(bk[b], bk[b + 1])
            if bq[b] == bq[b + 1]:
                continue  # no queries: no output, and its keys get no gradient
            args = [host(x)[None] for x in (q[sq], k[sk], v[sk])]
            wants[0][sq] = reference.attention(*args, causal=True)[0]
            dq, dk, dv = reference.attention_backward(host(do[sq])[None], *args, causal=True)
            wants[1][sq], wants[2][sk], wants[3][sk] = dq[0], dk[0], dv[0]
        for name, got, want in zip(("o", "dq", "dk", "dv"), outs, wants):
            yield f"varlen {name}", relative_error(got, want), (1 if name == "o" else 4) * TOLERANCE[dtype]


def kvcache_cases(rng):
    batch, heads_q, heads_kv, head_dim, block_size = 3, 8, 2, 128, 16
    lengths = np.array([1, 40, 250], np.int32)
    for dtype in (np.float16,):
        q = rand(rng, (batch, 1, heads_q, head_dim), dtype)
        k_cache, v_cache = (rand(rng, (batch, 256, heads_kv, head_dim), dtype) for _ in range(2))
        seqlens = cupy.asarray(lengths)
        o = nbflash.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens)
        want = np.concatenate([reference.attention(host(q[b:b + 1]), host(k_cache[b:b + 1, :n]),
                                                   host(v_cache[b:b + 1, :n]), causal=True)
                               for b, n in enumerate(lengths)])
        yield "kvcache contiguous", relative_error(o, want), TOLERANCE[dtype]
        # the same cache cut into blocks and shuffled into a pool
        blocks = 256 // block_size
        order = rng.permutation(batch * blocks)
        pool_k, pool_v = (cupy.empty((batch * blocks, block_size, heads_kv, head_dim), dtype) for _ in range(2))
        pool_k[cupy.asarray(order)] = k_cache.reshape(batch * blocks, block_size, heads_kv, head_dim)
        pool_v[cupy.asarray(order)] = v_cache.reshape(batch * blocks, block_size, heads_kv, head_dim)
        table = cupy.asarray(order.reshape(batch, blocks).astype(np.int32))
        o = nbflash.attention_with_kvcache(q, pool_k, pool_v, cache_seqlens=seqlens, block_table=table)
        yield "kvcache paged", relative_error(o, want), TOLERANCE[dtype]


def main():
    families = {"forward": forward_cases, "backward": backward_cases, "varlen": varlen_cases,
                "kvcache": kvcache_cases}
    chosen = sys.argv[1:] or list(families)
    rng = np.random.default_rng(0)
    failed = 0
    for cases in (families[name] for name in chosen):
        for name, error, bound in cases(rng):
            ok = error <= bound
            failed += not ok
            print(f"{'ok ' if ok else 'BAD'} {error:9.2e} <= {bound:.0e}  {name}", flush=True)
    cupy.cuda.runtime.deviceSynchronize()
    print(f"{failed} case(s) wrong")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
