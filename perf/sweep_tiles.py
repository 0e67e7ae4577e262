"""Time tensor-core tile configurations side by side (fp16, B 4, H 16, N 4096) with
torch SDPA flash as the yardstick; the winners go into nbflash.tuning.MMA_TILES (or
MMA_TILES_SM90). Times the mma.sync kernel: the wgmma one (nbflash's default on sm_90
where it applies) is turned off here; perf/sweep_wgmma_tiles.py times its tiles.

    python perf/sweep_tiles.py "64=128,64,128,2,0" "64=64,64,128,2,1" ...
    python perf/sweep_tiles.py "256=128,64,256,2,0" "256=128,32,256,2,0" "256=64,32,128,2,0"
    python perf/sweep_tiles.py --bias "128=128,32,128,2,0" "128=128,64,256,2,0"

--bias / --mask time the tiles with a (B, H, N, N) float16 bias or bool mask (staged
through shared memory, kernels/bias_tile.py; the spec key says so) instead.
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
    nbflash.tuning.set_wgmma(False)
    print(f"{'spec':60} {'TFLOP/s':>8} {'flash':>8} {'ratio':>6}")
    configs = [c for c in sys.argv[1:] if not c.startswith("--")]
    extra = {}
    if "--bias" in sys.argv:
        extra["bias"] = rng.standard_normal((4, 16, 4096, 4096), dtype=cupy.float32).astype(cupy.float16)
    if "--mask" in sys.argv:
        extra["mask"] = rng.random((4, 16, 4096, 4096), dtype=cupy.float32) < 0.9
    for config in configs:
        d = int(config.split("=")[0])
        nbflash.tuning.set_override(config)  # also drops attention's remembered dispatch
        shape = (4, 4096, 16, d)
        q, k, v = (rng.standard_normal(shape, dtype=cupy.float32).astype(cupy.float16) for _ in range(3))
        out = cupy.empty_like(q)
        for causal in (False, True):
            spec = nbflash.forward_spec(q, k, v, causal=causal, **extra)
            flops = 4.0 * 4 * 16 * 4096 * 4096 * d / (2 if causal else 1)
            try:
                ms = cupy_time(lambda: nbflash.attention(q, k, v, causal=causal, out=out, **extra), 3, 20)
            except Exception as e:
                print(f"{spec.key:60} failed: {type(e).__name__}: {str(e)[:60]}")
                continue
            ref = cupy.asarray(nbflash.attention(q[:1, :512], k[:1, :512], v[:1, :512], causal=causal))
            assert bool(cupy.isfinite(ref).all())
            f_ms = flash(q, k, v, causal, 3, 20) if flash else None
            ratio = f"{f_ms / ms:.2f}" if f_ms else "-"
            f_tf = f"{flops / f_ms / 1e9:8.1f}" if f_ms else "       -"
            print(f"{spec.key:60} {flops / ms / 1e9:8.1f} {f_tf} {ratio:>6}")


if __name__ == "__main__":
    main()
