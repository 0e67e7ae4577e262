"""Where a sliding window's forward time goes (issue 7: window (1024, 0) at 16k should run
>= 8x faster than causal). Times nbflash.attention at fp16, head_dim 128, 16 heads, one
16k sequence, for windows (W, 0) of several widths beside plain causal and full, and fits
time = a + b x (key tiles the CTAs visit) over the windows: b is the cost of one key tile
on the whole GPU, a what stays when the window shrinks. Prints per row the CTAs' key tiles
(summed, from the kernel's own tile bounds), GPU ms (calls queued behind a spin kernel,
nbflash.device.queued_gpu_ms), call ms (events around one call: a window call's host path
included) and GPU us per (CTA, key tile) for one SM.

    python3 perf/probe_window.py [--windows 128,1024] [--profile W]

--profile W runs only that window a few times (a target for Nsight Compute)."""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import cupy  # noqa: E402

import nbflash  # noqa: E402

N, H, D = 16384, 16, 128


def tiles_visited(spec, window):
    """Sum over CTAs of the key tiles the forward_wgmma loop visits (its window_key_range)."""
    bm, bn = spec.block_m, spec.block_n
    total = 0
    for row0 in range(0, N, bm):
        if window is None:
            first, end = 0, N if not spec.causal else min(N, row0 + bm)
        else:
            left, right = window
            first = max(0, row0 - left) if left >= 0 else 0
            end = min(N, row0 + bm - 1 + right + 1) if right >= 0 else N
        total += (end + bn - 1) // bn - first // bn
    return total * H


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--windows", default="128,256,512,1024,2048,4096",
                    help="left widths W of the windows (W, 0), comma-separated (the fit needs two)")
    args = ap.parse_args()
    rng = cupy.random.default_rng()
    q, k, v = (rng.standard_normal((1, N, H, D), dtype=cupy.float32).astype(cupy.float16) for _ in range(3))
    out = cupy.full_like(q, cupy.nan)
    if args.profile is not None:
        for _ in range(4):
            nbflash.attention(q, k, v, window=(args.profile, 0), out=out)
        cupy.cuda.runtime.deviceSynchronize()
        return
    sms = cupy.cuda.runtime.getDeviceProperties(0)["multiProcessorCount"]
    cases = [("full", {}, None), ("causal", {"causal": True}, None)]
    cases += [(f"window({w},0)", {"window": (w, 0)}, (w, 0)) for w in map(int, args.windows.split(","))]
    rows = []
    for name, kw, window in cases:
        spec = nbflash.forward_spec(q, k, v, **kw)
        fn = lambda: nbflash.attention(q, k, v, out=out, **kw)  # noqa: E731
        ms = nbflash.device.queued_gpu_ms(fn, 3, 5, 10)
        call_ms = nbflash.device.median_gpu_ms(fn, 1, args.repeats)
        tiles = tiles_visited(spec, window if window else ((-1, 0) if kw.get("causal") else None))
        rows.append((name, spec.key, tiles, ms, call_ms))
    print(f"{'case':16} {'CTA key tiles':>13} {'GPU ms':>8} {'call ms':>8} {'us / tile / SM':>15}  spec")
    for name, key, tiles, ms, call_ms in rows:
        print(f"{name:16} {tiles:13d} {ms:8.3f} {call_ms:8.3f} {ms * 1e3 * sms / tiles:15.2f}  {key}")
    for col, what in ((3, "GPU"), (4, "call")):
        w = [(r[2], r[col]) for r in rows if r[0].startswith("window")]
        if len(w) < 2:
            continue
        b, a = np.polyfit([t for t, _ in w], [m for _, m in w], 1)
        print(f"# windows, {what} ms = {a:.3f} + {b * 1e3:.4f} us x tiles (per SM: {b * 1e3 * sms:.2f} us a tile)")
    print(f"# gpu {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}, {sms} SMs")


if __name__ == "__main__":
    main()
