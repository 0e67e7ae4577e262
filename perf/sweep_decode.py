"""Time the tensor-core decode kernel over split counts and (threads, stages) on the
issue's cases (fp16, heads 32/8, head_dim 128, contiguous cache), TB/s of K+V read;
the winners go into nbflash.tuning (DECODE_MMA_*). GPU time of the decode and combine
kernels (launches queued behind a spin kernel: no host time, see bench_decode.gpu_timed).

    python perf/sweep_decode.py [--tiles 128,3 64,4 ...] [--splits 1,2,4,8,16,32,64]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

import cupy  # noqa: E402

import nbflash  # noqa: E402
from nbflash import api_kvcache  # noqa: E402
from bench_decode import HEAD_DIM, HEADS_KV, HEADS_Q, gpu_timed, prepared  # noqa: E402

CASES = ((8, 32768), (64, 4096), (1, 131072))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", nargs="*", default=["128,3", "128,2", "256,2", "64,4"])
    ap.add_argument("--splits", default="0,1,2,4,8,16,32,64")
    args = ap.parse_args()
    rng = cupy.random.default_rng()
    print(f"{'batch':>5} {'cache':>7} {'tiles':>6} {'splits':>6} {'ms':>8} {'TB/s':>6}  spec")
    for batch, cache in CASES:
        q = rng.standard_normal((batch, 1, HEADS_Q, HEAD_DIM), dtype=cupy.float32).astype(cupy.float16)
        kc, vc = (rng.standard_normal((batch, cache, HEADS_KV, HEAD_DIM), dtype=cupy.float32).astype(cupy.float16)
                  for _ in range(2))
        lens = cupy.full((batch,), cache, cupy.int32)
        out = cupy.full(q.shape, cupy.nan, cupy.float16)
        for tiles in args.tiles:
            os.environ["NBFLASH_DECODE_MMA_TILES"] = tiles
            for splits in (int(s) for s in args.splits.split(",")):
                try:
                    nbflash.attention_with_kvcache(q, kc, vc, cache_seqlens=lens, num_splits=splits, out=out)
                    ms = gpu_timed(prepared(q, kc, vc, lens, out, num_splits=splits))
                except Exception as e:
                    print(f"{batch:5} {cache:7} {tiles:>6} {splits:6} failed: {type(e).__name__}: {str(e)[:70]}")
                    continue
                assert bool(cupy.isfinite(out).all())
                spec, chosen = api_kvcache.kvcache_plan(q, kc, vc, cache_seqlens=lens, num_splits=splits)
                tb = (kc.nbytes + vc.nbytes) / (ms * 1e-3) / 1e12
                print(f"{batch:5} {cache:7} {tiles:>6} {chosen:6} {ms:8.3f} {tb:6.2f}  {getattr(spec, 'key', '')}",
                      flush=True)
        del q, kc, vc
        cupy.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
