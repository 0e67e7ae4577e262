"""Sweep the wgmma backward's tiles (kernels/backward_wgmma.py) on one GPU: for each
(head_dim, causal), every candidate (dK/dV tiles, dQ tiles) pair is timed through
nbflash.attention_backward (NBFLASH_WGMMA_BWD_TILES), and its gradients are compared
with the mma.sync family's on the same inputs (max |difference| / max |mma|).

    python perf/sweep_wgmma_bwd_tiles.py [--head-dims 64,128] [--seqlen 4096]

fp16, B = 16k tokens / seqlen, H 16. Prints TFLOP/s (2.5x forward FLOPs) per
candidate, SDPA flash's beside it when torch imports, and the table last."""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

import cupy  # noqa: E402

import nbflash  # noqa: E402
from bench_backward import nbflash_time, torch_peers  # noqa: E402
from bench_forward import HEADS, TOKENS  # noqa: E402

CANDIDATES = {  # head_dim: [((bm, bn, threads) dK/dV, (bm, bn, threads) dQ)]
    64: [((64, 128, 256), (128, 64, 256)), ((32, 128, 256), (128, 64, 256)), ((64, 64, 128), (128, 128, 256)),
         ((64, 128, 256), (64, 64, 128)), ((64, 192, 384), (192, 64, 384))],
    128: [((64, 128, 256), (128, 64, 256)), ((32, 128, 256), (128, 64, 256)), ((64, 64, 128), (128, 64, 256)),
          ((32, 128, 256), (64, 64, 128)), ((32, 192, 384), (128, 32, 256))],
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    n = args.seqlen
    batch = max(1, TOKENS // n)
    flash = torch_peers().get("sdpa_flash")
    rng = cupy.random.default_rng()
    lines = []
    for d in (int(x) for x in args.head_dims.split(",")):
        for causal in (False, True):
            shape = (batch, n, HEADS, d)
            q, k, v, do = (rng.standard_normal(shape, dtype=cupy.float32).astype(np.float16) for _ in range(4))
            out, lse = nbflash.attention(q, k, v, causal=causal, return_lse=True)
            flops = 2.5 * 4.0 * batch * HEADS * n * n * d / (2 if causal else 1)
            nbflash.tuning.set_wgmma(False)
            ref = nbflash.attention_backward(do, q, k, v, out, lse, causal=causal)
            mma_ms = nbflash_time(do, q, k, v, out, lse, causal, [cupy.empty_like(q) for _ in range(3)], args.repeats)
            nbflash.tuning.set_wgmma(True)
            flash_ms = flash(do, q, k, v, causal, args.repeats) if flash else None
            head = f"d{d} {'causal' if causal else 'full':6}"
            lines.append(f"{head} mma.sync {flops / mma_ms / 1e9:7.1f}" + (
                f"   sdpa_flash {flops / flash_ms / 1e9:7.1f}" if flash_ms else ""))
            print(lines[-1], flush=True)
            for dkdv, dq in CANDIDATES[d]:
                os.environ["NBFLASH_WGMMA_BWD_TILES"] = f"{d}={','.join(map(str, dkdv + dq))}"
                nbflash.plans.forget()
                grads = [cupy.full(shape, cupy.nan, dtype=cupy.float16) for _ in range(3)]
                try:
                    ms = nbflash_time(do, q, k, v, out, lse, causal, grads, args.repeats)
                except Exception as e:  # a candidate that does not fit
                    lines.append(f"{head} {dkdv} {dq} failed: {type(e).__name__}: {str(e)[:80]}")
                    print(lines[-1], flush=True)
                    continue
                errs = [float(cupy.abs(g.astype(cupy.float32) - r.astype(cupy.float32)).max()
                             / cupy.abs(r.astype(cupy.float32)).max()) for g, r in zip(grads, ref)]
                spec = nbflash.backward_spec(q, k, v, causal=causal)
                ratio = f" x{flash_ms / ms:5.2f} flash" if flash_ms else ""
                lines.append(f"{head} {dkdv} {dq} {flops / ms / 1e9:7.1f} TFLOP/s{ratio}  "
                             f"err dq/dk/dv {errs[0]:.1e}/{errs[1]:.1e}/{errs[2]:.1e}  {spec.key}")
                print(lines[-1], flush=True)
            os.environ.pop("NBFLASH_WGMMA_BWD_TILES", None)
            del q, k, v, do, out, lse
            cupy.get_default_memory_pool().free_all_blocks()
    print("\n".join(["", "# fp16 B%d N%d H%d, backward TFLOP/s" % (batch, n, HEADS)] + lines))


if __name__ == "__main__":
    main()
