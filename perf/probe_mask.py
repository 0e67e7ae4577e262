"""Why the staged mask row of bench_forward --variants reads +1.8 ms over plain in a full
run and +0.34 ms when run alone (session 10, perf/NOTES.md): time the same mask call
(fp16, head_dim 128, B 4, H 16, N 4096, mma.sync kernel, as that row) at several points
of one process, with what the full bench runs before it (the 16k wgmma rows, the bias
row and its 6 GB of allocations) in between.

Per point: GPU ms (calls queued behind a spin kernel, nbflash.device.queued_gpu_ms),
call ms (events around one call), host us per call (wall time of 10 calls issued while
the GPU is busy), and CuPy's pool (used / held GB).

    python3 perf/probe_mask.py [--quick]

--quick: the first points only (plain, the mask BHNN, 1HNN and 11NN masks, fp16 biases),
in a fresh process.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import cupy  # noqa: E402
import numpy as np  # noqa: E402

import nbflash  # noqa: E402

B, N, H, D = 4, 4096, 16, 128
rng = cupy.random.default_rng()
pool = cupy.get_default_memory_pool()
rows = []


def fp16(shape):
    return rng.standard_normal(shape, dtype=cupy.float32).astype(cupy.float16)


def host_us(fn, calls=10):
    """Wall us per call of ``calls`` calls issued while a spin kernel holds the GPU."""
    kernel = cupy.RawKernel(nbflash.device._SPIN_SOURCE, "nbflash_spin")
    cycles = cupy.int64(int(30.0 * cupy.cuda.Device().attributes["ClockRate"]))
    fn()
    kernel((1,), (1,), (cycles,))
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    cupy.cuda.Stream.null.synchronize()
    return (t1 - t0) / calls * 1e6


def point(label, q, k, v, out, **kw):
    def call():
        nbflash.attention(q, k, v, out=out, **kw)

    ms = nbflash.device.queued_gpu_ms(call, 3, 5, 10)
    call_ms = nbflash.device.median_gpu_ms(call, 1, 10)
    us = host_us(call)
    spec = nbflash.forward_spec(q, k, v, **kw).key
    rows.append((label, ms, call_ms, us, pool.used_bytes() / 1e9, pool.total_bytes() / 1e9, spec))
    print(rows[-1], file=sys.stderr, flush=True)


def main():
    quick = "--quick" in sys.argv[1:]
    nbflash.tuning.set_wgmma(False)  # the bench's bias / mask rows and their baseline run mma.sync
    q, k, v = (fp16((B, N, H, D)) for _ in range(3))
    out = cupy.full_like(q, cupy.nan)
    mask = rng.random((B, H, N, N), dtype=cupy.float32) < 0.9
    point("1 plain (first)", q, k, v, out)
    point("1 mask (first)", q, k, v, out, mask=mask)
    point("1 mask (again)", q, k, v, out, mask=mask)
    small = rng.random((1, 1, N, N), dtype=cupy.float32) < 0.9  # 16 MB: stays in L2
    point("1 mask 11NN (L2-resident)", q, k, v, out, mask=small)
    hnn = rng.random((1, H, N, N), dtype=cupy.float32) < 0.9  # 268 MB
    point("1 mask 1HNN", q, k, v, out, mask=hnn)
    biasb = rng.standard_normal((1, 1, N, N), dtype=cupy.float32).astype(cupy.float16)
    point("1 bias fp16 11NN", q, k, v, out, bias=biasb)
    del small, hnn, biasb
    if quick:
        import cProfile
        import pstats

        profile = cProfile.Profile()
        profile.enable()
        for _ in range(50):
            nbflash.attention(q, k, v, out=out, mask=mask)
        profile.disable()
        cupy.cuda.Stream.null.synchronize()
        pstats.Stats(profile, stream=sys.stderr).sort_stats("tottime").print_stats(18)
        bias = rng.standard_normal((B, H, N, N), dtype=cupy.float32).astype(cupy.float16)
        point("1 bias fp16 BHNN", q, k, v, out, bias=bias)
        del bias
        return report(mask)

    # what the full bench runs first: the 16k wgmma rows (ALiBi slopes, softcap, window)
    nbflash.tuning.set_wgmma(True)
    q16, k16, v16 = (fp16((1, 16384, H, D)) for _ in range(3))
    o16 = cupy.empty_like(q16)
    slopes = cupy.asarray((2.0 ** (-8.0 * (np.arange(H) + 1) / H)).astype(np.float32))
    for kw in ({}, {"causal": True}, {"causal": True, "softcap": 30.0}, {"causal": True, "alibi_slopes": slopes},
               {"window": (1024, 0)}):
        for _ in range(20):
            nbflash.attention(q16, k16, v16, out=o16, **kw)
    cupy.cuda.Stream.null.synchronize()
    del q16, k16, v16, o16
    nbflash.tuning.set_wgmma(False)
    point("2 mask (after 16k rows)", q, k, v, out, mask=mask)
    point("2 plain (after 16k rows)", q, k, v, out)

    bias = rng.standard_normal((B, H, N, N), dtype=cupy.float32).astype(cupy.float16)
    point("3 bias", q, k, v, out, bias=bias)
    point("3 mask (after bias)", q, k, v, out, mask=mask)
    del bias
    point("4 mask (bias freed)", q, k, v, out, mask=mask)
    mask2 = rng.random((B, H, N, N), dtype=cupy.float32) < 0.9
    point("4 new mask", q, k, v, out, mask=mask2)
    pool.free_all_blocks()
    point("5 new mask, pool emptied", q, k, v, out, mask=mask2)
    mask3 = rng.random((B, H, N, N), dtype=cupy.float32) < 0.9
    point("5 fresh mask, pool emptied", q, k, v, out, mask=mask3)
    point("5 plain", q, k, v, out)
    report(mask)


def report(mask):
    gpu = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"{'point':30} {'GPU ms':>8} {'call ms':>8} {'host us':>8} {'pool used':>9} {'held GB':>8}  spec")
    for label, ms, call_ms, us, used, held, spec in rows:
        print(f"{label:30} {ms:8.3f} {call_ms:8.3f} {us:8.1f} {used:9.2f} {held:8.2f}  {spec}")
    print(f"# {gpu}; fp16 B{B} H{H} N{N} D{D}, mma.sync kernels; mask bytes {mask.nbytes / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
