"""Time tensor-core backward tile configurations side by side (fp16, B 4, H 16, N 4096)
with torch SDPA flash's backward as the yardstick; the winners go into
nbflash.tuning.MMA_BWD_TILES.

    python perf/sweep_backward_tiles.py "64=32,128,256,1/64,64,128,1" "128=..." ...

Each argument is head_dim=dK/dV tiles (block_m, block_n, threads, kv_in_registers) /
dQ tiles (dq_block_m, dq_block_n, dq_threads, dq_in_registers), as read from
NBFLASH_MMA_BWD_TILES. The deterministic column times the separate dQ kernel.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

import cupy  # noqa: E402

import nbflash  # noqa: E402
from bench_backward import nbflash_time, torch_peers  # noqa: E402


def main():
    rng = cupy.random.default_rng()
    flash = torch_peers().get("sdpa_flash")
    flash_ms = {}
    print(f"{'spec':72} {'TFLOP/s':>8} {'determ':>8} {'flash':>8} {'ratio':>6}")
    for config in sys.argv[1:]:
        d = int(config.split("=")[0])
        os.environ["NBFLASH_MMA_BWD_TILES"] = config
        nbflash.plans.forget()  # attention_backward's memo would replay the previous config's kernels
        shape = (4, 4096, 16, d)
        q, k, v, do = (rng.standard_normal(shape, dtype=cupy.float32).astype(cupy.float16) for _ in range(4))
        for causal in (False, True):
            spec = nbflash.backward_spec(q, k, v, causal=causal)
            flops = 2.5 * 4.0 * 4 * 16 * 4096 * 4096 * d / (2 if causal else 1)
            out, lse = nbflash.attention(q, k, v, causal=causal, return_lse=True)
            grads = [cupy.full(shape, cupy.nan, dtype=cupy.float16) for _ in range(3)]
            try:
                ms = nbflash_time(do, q, k, v, out, lse, causal, grads, 10)
                ms_det = nbflash_time(do, q, k, v, out, lse, causal, grads, 10, True)
            except Exception as e:
                print(f"{spec.key:72} failed: {type(e).__name__}: {str(e)[:60]}")
                continue
            assert all(bool(cupy.isfinite(g).all()) for g in grads), spec.key
            if flash and (d, causal) not in flash_ms:
                flash_ms[d, causal] = flash(do, q, k, v, causal, 10)
            f_ms = flash_ms.get((d, causal))
            ratio = f"{f_ms / ms:.2f}" if f_ms else "-"
            f_tf = f"{flops / f_ms / 1e9:8.1f}" if f_ms else "       -"
            print(f"{spec.key:72} {flops / ms / 1e9:8.1f} {flops / ms_det / 1e9:8.1f} {f_tf} {ratio:>6}", flush=True)


if __name__ == "__main__":
    main()
