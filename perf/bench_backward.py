"""Backward attention throughput: nbflash.attention_backward against the peers
present, in one run.

TFLOP/s = 2.5 x the forward's FLOPs (4 * B * H * Nq * Nk * D, halved for causal) /
time: the backward's five matmuls (S recomputed, dP, dV, dK, dQ) against the forward's
two. The timed call is the backward alone, given the forward's out and lse (nbflash:
delta, dK/dV and dQ kernels; torch: autograd.grad through SDPA's saved forward). CUDA
events around CALLS_PER_SAMPLE calls issued back to back (per call: the host work of
one call overlaps the kernels of the one before, as in a training step; a sync after
every call would add each library's host latency, ~0.3 ms for nbflash's backward, to
its GPU time), after warm-up, median of --repeats samples (fewer when one call takes
long), fresh random normal inputs (never zeros). Peers: torch SDPA's flash, cuDNN and
efficient backends when torch imports (optional).

    python perf/bench_backward.py [--quick] [--out perf/results]
    python perf/bench_backward.py --variants [--out perf/results]
    python perf/bench_backward.py --quick --mma   (the mma.sync family beside the default)

Writes <out>/<gpu-name>-backward.json and a PNG plot, and prints a table last.
--variants (issue 7): fp16, head_dim 128, 16 heads, one 16k-token sequence; the
backward of plain causal attention, with softcap, with ALiBi, and with a sliding
window (1024, 0), each timed and printed with its ratio to plain causal; writes
<out>/<gpu-name>-backward-variants.json. Its "ms" is GPU time per call, 4 calls queued
behind a spin kernel (nbflash.device.queued_gpu_ms: a variant call's ~0.35 ms of
unmemoized host work stays out); "call_ms" the bench's usual 4 back-to-back calls.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

import cupy  # noqa: E402
import ml_dtypes  # noqa: E402

import nbflash  # noqa: E402
from bench_forward import BANDWIDTH, HEADS, TOKENS, plot  # noqa: E402

TIME_PER_CASE_S = 3.0  # cap on timed work per (config, implementation)
CALLS_PER_SAMPLE = 4


def repeats_for(one_call_ms, wanted):
    """Fewer repeats for slow calls so an unattended full run stays bounded."""
    return int(max(5, min(wanted, TIME_PER_CASE_S * 1e3 / max(one_call_ms, 1e-3))))


def nbflash_time(do, q, k, v, out, lse, causal, grads, repeats, deterministic=False, queued=False, **variants):
    """Milliseconds per call, CALLS_PER_SAMPLE calls back to back; with ``queued``, GPU
    time alone (the calls queued behind a spin kernel: nbflash.device.queued_gpu_ms)."""
    dq, dk, dv = grads
    fn = lambda: nbflash.attention_backward(  # noqa: E731
        do, q, k, v, out, lse, causal=causal, deterministic=deterministic, dq=dq, dk=dk, dv=dv, **variants)
    if queued:
        return nbflash.device.queued_gpu_ms(fn, 1, 5, CALLS_PER_SAMPLE)
    one = nbflash.device.median_gpu_ms(fn, 1, 1)  # also compiles
    return nbflash.device.median_gpu_ms(fn, 2, repeats_for(one * CALLS_PER_SAMPLE, repeats), CALLS_PER_SAMPLE)


def torch_peers():
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except Exception:
        return {}
    backends = {
        "sdpa_flash": SDPBackend.FLASH_ATTENTION,
        "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    }

    def as_torch(x):
        # torch reads the same CuPy buffers through DLPack, as (B, H, N, D) views
        t = torch.from_dlpack(x).permute(0, 2, 1, 3)
        return t.view(torch.bfloat16) if x.dtype == ml_dtypes.bfloat16 else t

    def make(backend):
        def run(do, q, k, v, causal, repeats):
            tq, tk, tv = (as_torch(x).detach().requires_grad_() for x in (q, k, v))
            tdo = as_torch(do)
            with sdpa_kernel(backend):
                o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
                fn = lambda: torch.autograd.grad(o, (tq, tk, tv), tdo, retain_graph=True)  # noqa: E731
                fn()
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                stop.record()
                stop.synchronize()
                for _ in range(2):
                    fn()
                times = []
                for _ in range(repeats_for(start.elapsed_time(stop) * CALLS_PER_SAMPLE, repeats)):
                    start.record()
                    for _ in range(CALLS_PER_SAMPLE):
                        fn()
                    stop.record()
                    stop.synchronize()
                    times.append(start.elapsed_time(stop) / CALLS_PER_SAMPLE)
            return float(np.median(times))

        return run

    return {name: make(b) for name, b in backends.items()}


VARIANT_CASES = [  # (name, causal, variant arguments)
    ("plain causal", True, {}),
    ("softcap 30", True, {"softcap": 30.0}),
    ("alibi", True, {"alibi_slopes": "slopes"}),
    ("window (1024, 0)", False, {"window": (1024, 0)}),
]
# (name, variant arguments) at seqlen 4096, not causal, as bench_forward's bias / mask rows,
# for each backward family (on sm_90 the wgmma backward stages a 16-bit bias or a mask; a
# bias with a mask at head_dim 128 does not fit it and runs mma.sync): each family's rows
# against its own plain row
READ_CASES = [
    ("plain N4096", {}),
    ("bias fp16 BHNN", {"bias": "bias"}),
    ("mask BHNN", {"mask": "mask"}),
]


def variants_main(args):
    """The --variants table: each variant's backward time against plain causal's."""
    seqlen, d, dtype = 16384, 128, np.float16
    batch = max(1, TOKENS // seqlen)
    gpu = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    rng = cupy.random.default_rng()
    shape = (batch, seqlen, HEADS, d)
    q, k, v, do = (rng.standard_normal(shape, dtype=cupy.float32).astype(dtype) for _ in range(4))
    grads = [cupy.full(shape, cupy.nan, dtype=cupy.float32).astype(dtype) for _ in range(3)]
    slopes = cupy.asarray(2.0 ** (-8.0 * (np.arange(HEADS) + 1) / HEADS), dtype=cupy.float32)
    rows = []
    for name, causal, variants in [] if args.reads_only else VARIANT_CASES:
        variants = {key: (slopes if val == "slopes" else val) for key, val in variants.items()}
        try:  # the variant forward's out and lse (nbflash.attention with the variants)
            out, lse = nbflash.attention(q, k, v, causal=causal, return_lse=True, **variants)
            forward = "variant"
        except TypeError:  # a forward without variants: its out and lse time the same kernels
            out, lse = nbflash.attention(q, k, v, causal=causal, return_lse=True)
            forward = "plain"
        spec = nbflash.backward_spec(q, k, v, causal=causal, **variants)
        call_ms = nbflash_time(do, q, k, v, out, lse, causal, grads, args.repeats, **variants)
        ms = nbflash_time(do, q, k, v, out, lse, causal, grads, args.repeats, queued=True, **variants)
        rows.append({"gpu": gpu, "case": name, "dtype": "fp16", "batch": batch, "heads": HEADS, "seqlen": seqlen,
                     "head_dim": d, "causal": causal, "spec": spec.key, "ms": ms, "call_ms": call_ms,
                     "forward": forward})
        print(json.dumps(rows[-1]), file=sys.stderr)
        del out, lse
    for r in rows:
        r["ratio_to_plain_causal"] = r["ms"] / rows[0]["ms"]
    del q, k, v, do, grads
    rows += read_rows(args, gpu, rng, dtype, d)
    os.makedirs(args.out, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-")
    what = "backward-variants" + ("-reads" if args.reads_only else "")
    with open(os.path.join(args.out, f"{tag}-{what}.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(f"{'case':18} {'ms':>9} {'call ms':>9} {'x plain causal':>15}  spec")
    for r in rows:
        if "ratio_to_plain_causal" in r:
            print(f"{r['case']:18} {r['ms']:9.2f} {r['call_ms']:9.2f} {r['ratio_to_plain_causal']:15.3f}  {r['spec']}")
    print(f"# gpu: {gpu}; backward of fp16 d{d} H{HEADS} {batch}x{seqlen} tokens; targets: softcap and alibi "
          f"<= 1.10x, window (1024, 0) <= 1/8 of plain causal")
    print(f"{'case':26} {'ms':>9} {'call ms':>9} {'extra ms':>9} {'bytes ms':>9}  spec")
    for r in rows:
        if "ratio_to_plain_causal" not in r:
            print(f"{r['case']:26} {r['ms']:9.2f} {r['call_ms']:9.2f} {r.get('extra_ms', 0.0):9.2f} "
                  f"{r.get('extra_ms_at_bandwidth') or float('nan'):9.2f}  {r['spec']}")
    print("# bias / mask rows: fp16 d128 H16 4x4096, not causal; extra ms over the same family's plain backward "
          "against the bias / mask bytes read once at HBM bandwidth (the target)")


def read_rows(args, gpu, rng, dtype, d):
    """READ_CASES: the bias / mask backward against the plain mma.sync backward (GPU ms,
    queued), their extra time beside their bytes at memory bandwidth."""
    n = 4096
    batch = max(1, TOKENS // n)
    shape = (batch, n, HEADS, d)
    q, k, v, do = (rng.standard_normal(shape, dtype=cupy.float32).astype(dtype) for _ in range(4))
    grads = [cupy.full(shape, cupy.nan, dtype=cupy.float32).astype(dtype) for _ in range(3)]
    default_wgmma = nbflash.tuning.wgmma_enabled()
    bw = next((b for key, b in BANDWIDTH.items() if key in gpu), None)
    rows = []
    try:
        for family in [f for f in (["wgmma"] if default_wgmma else []) + ["mma"] if f in args.read_families.split(",")]:
            nbflash.tuning.set_wgmma(family == "wgmma")
            base = None
            for name, variants in READ_CASES:
                if variants.get("bias") == "bias":
                    variants = {"bias": rng.standard_normal((batch, HEADS, n, n), dtype=cupy.float32).astype(dtype)}
                if variants.get("mask") == "mask":
                    variants = {"mask": rng.random((batch, HEADS, n, n), dtype=cupy.float32) < 0.9}
                out, lse = nbflash.attention(q, k, v, return_lse=True, **variants)
                spec = nbflash.backward_spec(q, k, v, **variants)
                call_ms = nbflash_time(do, q, k, v, out, lse, False, grads, args.repeats, **variants)
                ms = nbflash_time(do, q, k, v, out, lse, False, grads, args.repeats, queued=True, **variants)
                row = {"gpu": gpu, "case": f"{name} ({family})", "dtype": "fp16", "batch": batch, "heads": HEADS,
                       "seqlen": n, "head_dim": d, "causal": False, "spec": spec.key, "ms": ms, "call_ms": call_ms}
                if base is None:
                    base = ms
                else:
                    extra = sum(a.nbytes for a in variants.values())
                    row.update(extra_ms=ms - base, extra_bytes=extra,
                               extra_ms_at_bandwidth=extra / bw * 1e3 if bw else None)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
                del out, lse, variants
    finally:
        nbflash.tuning.set_wgmma(default_wgmma)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="seqlen 4096, fp16 only")
    ap.add_argument("--variants", action="store_true", help="the variants' cost at 16k tokens (issue 7)")
    ap.add_argument("--reads-only", action="store_true", help="--variants: only the bias / mask rows")
    ap.add_argument("--read-families", default="wgmma,mma", help="--variants: the bias / mask rows' backward families")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--dtypes", default=None, help="default fp16,bf16 (fp16 with --quick)")
    ap.add_argument("--mma", action="store_true",
                    help="also time the mma.sync family (NBFLASH_WGMMA=0) where the wgmma one is the default")
    args = ap.parse_args()
    if args.variants:
        variants_main(args)
        return

    dtypes = {"fp16": np.float16, "bf16": ml_dtypes.bfloat16}
    dtype_names = (args.dtypes or ("fp16" if args.quick else "fp16,bf16")).split(",")
    seqlens = [4096] if args.quick else [512, 1024, 2048, 4096, 8192, 16384]
    head_dims = [int(x) for x in args.head_dims.split(",")]
    peers = torch_peers()
    gpu = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    rng = cupy.random.default_rng()
    rows = []
    for dname in dtype_names:
        dtype = dtypes[dname]
        for d in head_dims:
            for n in seqlens:
                batch = max(1, TOKENS // n)
                for causal in (False, True):
                    shape = (batch, n, HEADS, d)
                    q, k, v, do = (rng.standard_normal(shape, dtype=cupy.float32).astype(dtype) for _ in range(4))
                    out, lse = nbflash.attention(q, k, v, causal=causal, return_lse=True)
                    grads = [cupy.full(shape, cupy.nan, dtype=cupy.float32).astype(dtype) for _ in range(3)]
                    spec = nbflash.backward_spec(q, k, v, causal=causal)
                    flops = 2.5 * 4.0 * batch * HEADS * n * n * d / (2 if causal else 1)
                    times = {
                        "nbflash": nbflash_time(do, q, k, v, out, lse, causal, grads, args.repeats),
                        "nbflash_determ": nbflash_time(do, q, k, v, out, lse, causal, grads, args.repeats, True),
                    }
                    if args.mma:
                        nbflash.tuning.set_wgmma(False)
                        times["nbflash_mma"] = nbflash_time(do, q, k, v, out, lse, causal, grads, args.repeats)
                        nbflash.tuning.set_wgmma(True)
                    for name, run in peers.items():
                        try:
                            times[name] = run(do, q, k, v, causal, args.repeats)
                        except Exception as e:  # a backend may refuse a shape
                            times[name] = None
                            print(f"# {name} failed: {type(e).__name__}: {str(e)[:80]}", file=sys.stderr)
                    row = {
                        "gpu": gpu, "dtype": dname, "batch": batch, "heads": HEADS, "seqlen": n,
                        "head_dim": d, "causal": causal, "spec": spec.key, "flops": flops,
                        "ms": times,
                        "tflops": {k_: (flops / (t * 1e-3) / 1e12 if t else None) for k_, t in times.items()},
                    }
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr)
                    del q, k, v, do, out, lse, grads
                    cupy.get_default_memory_pool().free_all_blocks()

    os.makedirs(args.out, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-")
    suffix = "-quick" if args.quick else ""
    with open(os.path.join(args.out, f"{tag}-backward{suffix}.json"), "w") as f:
        json.dump(rows, f, indent=1)
    try:
        plot(rows, os.path.join(args.out, f"{tag}-backward{suffix}.png"))
    except Exception as e:
        print(f"# plot skipped: {e}", file=sys.stderr)

    names = ["nbflash", "nbflash_determ"] + (["nbflash_mma"] if args.mma else []) + list(peers)
    print(f"{'dtype':5} {'D':>3} {'N':>6} {'causal':6} " + " ".join(f"{n:>14}" for n in names) + "  ratio_vs_flash  spec")
    for r in rows:
        t = r["tflops"]
        cells = " ".join(f"{t[n]:14.1f}" if t.get(n) else f"{'-':>14}" for n in names)
        ratio = t["nbflash"] / t["sdpa_flash"] if t.get("sdpa_flash") else float("nan")
        print(f"{r['dtype']:5} {r['head_dim']:>3} {r['seqlen']:>6} {str(r['causal']):6} {cells}  {ratio:14.2f}  {r['spec']}")
    print(f"# gpu: {gpu}; backward TFLOP/s (2.5x forward FLOPs)")


if __name__ == "__main__":
    main()
