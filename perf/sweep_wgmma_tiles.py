"""Time wgmma forward tile configurations (kernels/forward_wgmma.py, NBFLASH_WGMMA=1)
side by side (fp16, B 4, H 16, N 4096) with torch SDPA flash as the yardstick, each
output checked against the default mma path's; winners go into
nbflash.tuning.WGMMA_TILES. A config is "head_dim=block_m,block_n,threads" with
block_m = 64 x threads / 128 (one warpgroup per 64 rows), block_n a multiple of 16.

    python perf/sweep_wgmma_tiles.py "64=128,128,256" "64=192,128,384" "128=128,128,256" "128=128,64,256"
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

import cupy  # noqa: E402

import nbflash  # noqa: E402
from bench_forward import cupy_time, torch_peers  # noqa: E402


def main():
    rng = cupy.random.default_rng()
    flash = torch_peers().get("sdpa_flash")
    print(f"{'spec':60} {'TFLOP/s':>8} {'flash':>8} {'ratio':>6} {'max|diff|':>9}")
    for config in sys.argv[1:]:
        d = int(config.split("=")[0])
        shape = (4, 4096, 16, d)
        q, k, v = (rng.standard_normal(shape, dtype=cupy.float32).astype(cupy.float16) for _ in range(3))
        out = cupy.empty_like(q)
        for causal in (False, True):
            nbflash.tuning.set_wgmma(False)
            ref = nbflash.attention(q, k, v, causal=causal).astype(cupy.float32)
            os.environ["NBFLASH_WGMMA_TILES"] = config
            nbflash.tuning.set_wgmma(True)
            spec = nbflash.forward_spec(q, k, v, causal=causal)
            flops = 4.0 * 4 * 16 * 4096 * 4096 * d / (2 if causal else 1)
            try:
                ms = cupy_time(lambda: nbflash.attention(q, k, v, causal=causal, out=out), 3, 20)
            except Exception as e:
                print(f"{spec.key:60} failed: {type(e).__name__}: {str(e)[:60]}")
                continue
            diff = float(cupy.abs(out.astype(cupy.float32) - ref).max())
            f_ms = flash(q, k, v, causal, 3, 20) if flash else None
            ratio = f"{f_ms / ms:.2f}" if f_ms else "-"
            f_tf = f"{flops / f_ms / 1e9:8.1f}" if f_ms else "       -"
            print(f"{spec.key:60} {flops / ms / 1e9:8.1f} {f_tf} {ratio:>6} {diff:9.1e}", flush=True)
    nbflash.tuning.set_wgmma(False)


if __name__ == "__main__":
    main()
