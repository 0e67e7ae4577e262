"""Tensor-core backward kernels (kernels/backward_mma.py) against torch SDPA's backward.

Times launch_backward itself (dK/dV kernel plus dQ: atomics and conversion, or the
separate deterministic kernel), given q, k, v, dO, lse and delta; the public
attention_backward adds the delta preprocessing on top. TFLOP/s = 2.5 x the forward's
4 * B * H * Nq * Nk * D (halved for causal), as FlashAttention counts the backward.
CUDA events after warm-up, median of --repeats runs, random normal inputs (never zeros).
Peers (when torch imports; optional): SDPA flash and cuDNN backward on the same data,
timed as autograd.grad of a retained graph (their forward is not in the time).

    python perf/bench_backward_mma.py [--quick] [--out perf/results]

Writes <out>/<gpu-name>-backward-mma.json and prints a table last. Tiles can be
overridden with NBFLASH_MMA_BWD_TILES (see nbflash.tuning) for sweeps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import cupy  # noqa: E402
import ml_dtypes  # noqa: E402

import nbflash  # noqa: E402
from nbflash import arrays, device  # noqa: E402
from nbflash.kernels import backward_mma  # noqa: E402

BATCH = 4
HEADS = 16


def torch_peers():
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except Exception:
        return {}
    backends = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}

    def make(backend):
        def run(q, k, v, do, causal, warmup, repeats):
            tdtype = torch.float16 if q.dtype == np.float16 else torch.bfloat16
            leaves = [torch.from_dlpack(x.view(np.uint16)).view(tdtype).permute(0, 2, 1, 3).clone().requires_grad_()
                      for x in (q, k, v)]
            tdo = torch.from_dlpack(do.view(np.uint16)).view(tdtype).permute(0, 2, 1, 3)
            with sdpa_kernel(backend):
                out = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=causal)
                fn = lambda: torch.autograd.grad(out, leaves, tdo, retain_graph=True)  # noqa: E731
                for _ in range(warmup):
                    fn()
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                times = []
                for _ in range(repeats):
                    start.record()
                    fn()
                    stop.record()
                    stop.synchronize()
                    times.append(start.elapsed_time(stop))
            return float(np.median(times))

        return run

    return {name: make(b) for name, b in backends.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="seqlen 4096, fp16 only")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--dtypes", default="fp16,bf16")
    args = ap.parse_args()

    dtypes = {"fp16": np.float16, "bf16": ml_dtypes.bfloat16}
    seqlens = [4096] if args.quick else [1024, 2048, 4096, 8192]
    dnames = ["fp16"] if args.quick else args.dtypes.split(",")
    head_dims = [int(x) for x in args.head_dims.split(",")]
    peers = torch_peers()
    gpu = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    rng = cupy.random.default_rng()
    rows = []
    for dname in dnames:
        dtype = dtypes[dname]
        for d in head_dims:
            for n in seqlens:
                for causal in (False, True):
                    shape = (BATCH, n, HEADS, d)
                    q, k, v, do = (rng.standard_normal(shape, dtype=cupy.float32).astype(dtype) for _ in range(4))
                    out, lse = nbflash.attention(q, k, v, causal=causal, return_lse=True)
                    delta = (do.astype(cupy.float32) * out.astype(cupy.float32)).sum(-1).transpose(0, 2, 1).copy()
                    grads = [cupy.empty(shape, dtype) for _ in range(3)]
                    spec = backward_mma.choose_spec(dname, d, causal, simulator=False)
                    bits = [arrays.kernel_view(x, raw_bits=True) for x in (q, k, v, do)]
                    outs = [arrays.kernel_view(x, raw_bits=True) for x in grads]
                    scale = 1 / math.sqrt(d)
                    flops = 2.5 * 4.0 * BATCH * HEADS * n * n * d / (2 if causal else 1)
                    times = {}
                    for mode, deterministic in (("nbflash", False), ("nbflash_det", True)):
                        times[mode] = device.median_gpu_ms(
                            lambda: backward_mma.launch_backward(spec, *bits, lse, delta, *outs, scale, 1, deterministic),
                            3, args.repeats)
                    for name, run in peers.items():
                        try:
                            times[name] = run(q, k, v, do, causal, 3, args.repeats)
                        except Exception as e:  # a backend may refuse a shape
                            times[name] = None
                            print(f"# {name} failed: {type(e).__name__}: {str(e)[:80]}", file=sys.stderr)
                    row = {
                        "gpu": gpu, "dtype": dname, "batch": BATCH, "heads": HEADS, "seqlen": n,
                        "head_dim": d, "causal": causal, "spec": spec.key, "ms": times,
                        "tflops": {k_: (flops / (t * 1e-3) / 1e12 if t else None) for k_, t in times.items()},
                    }
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr)

    os.makedirs(args.out, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-")
    with open(os.path.join(args.out, f"{tag}-backward-mma.json"), "w") as f:
        json.dump(rows, f, indent=1)

    names = ["nbflash", "nbflash_det"] + list(peers)
    print(f"{'dtype':5} {'D':>3} {'N':>6} {'causal':6} " + " ".join(f"{n:>12}" for n in names) + "  ratio_vs_flash")
    for r in rows:
        t = r["tflops"]
        cells = " ".join(f"{t[n]:12.1f}" if t.get(n) else f"{'-':>12}" for n in names)
        ratio = t["nbflash"] / t["sdpa_flash"] if t.get("sdpa_flash") else float("nan")
        print(f"{r['dtype']:5} {r['head_dim']:>3} {r['seqlen']:>6} {str(r['causal']):6} {cells}  {ratio:.2f}")
    print(f"# gpu: {gpu}; backward TFLOP/s (2.5x forward FLOPs); spec keys in the JSON")


if __name__ == "__main__":
    main()
