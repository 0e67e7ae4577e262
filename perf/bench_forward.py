"""Forward attention throughput: nbflash against the peers present, in one run.

TFLOP/s = 4 * B * H * Nq * Nk * D / time, halved for causal. CUDA events around each
call after warm-up, median of --repeats runs, fresh random normal inputs (never zeros).
Peers: torch SDPA's flash, cuDNN and efficient backends when torch imports (optional),
and a naive CuPy attention (materialized scores) where it fits in memory.

    python perf/bench_forward.py [--quick] [--out perf/results]
    python perf/bench_forward.py --variants [--out perf/results]
    python perf/bench_forward.py --quick --wgmma [--out perf/results]
    python perf/bench_forward.py --quick --wgmma --head-dims 192,256 --tag d192-256

Writes <out>/<gpu-name>-forward.json and a PNG plot, and prints a table last.
--variants (issue 7) times the attention variants instead, fp16, head_dim 128, 16
heads, 16k tokens: softcap, ALiBi and a sliding window (1024, 0) against plain causal
attention at seqlen 16384 (on sm_90 all of them the wgmma kernel), and a (B, H, N, N)
float16 bias and bool mask and dropout against plain attention at seqlen 4096 on the
kernel family that runs them ("full" for wgmma, "full mma" for mma.sync, NBFLASH_WGMMA=0;
the "mma" rows force mma.sync); each row names its
kernel; writes <gpu-name>-forward-variants.json. Its "ms" is GPU time per call with 10
calls queued behind a spin kernel (nbflash.device.queued_gpu_ms): a call with a variant
argument takes the unmemoized host path (~0.3 ms), which a sync per call would add to a
0.3-0.7 ms window kernel; "call_ms" keeps the per-call event time (host included).
--wgmma times the Hopper wgmma kernel (kernels/forward_wgmma.py, nbflash's default on
sm_90) as "nbflash_wgmma" beside the mma.sync kernel ("nbflash", NBFLASH_WGMMA=0) in
every row, checks one output against the other, and writes <gpu-name>-forward-wgmma.json.
--head-dims picks the head dims (64,128 by default; --quick at B 4, H 16, N 4096 is the
issue-3 anchor, e.g. --head-dims 192,256); --tag keeps such a run's files apart.
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

TOKENS = 16384
HEADS = 16


def cupy_time(fn, warmup, repeats):
    return nbflash.device.median_gpu_ms(fn, warmup, repeats)


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

    def make(backend):
        def run(q, k, v, causal, warmup, repeats):
            # torch reads the same CuPy buffers through DLPack, as (B, H, N, D) views
            tq, tk, tv = (torch.from_dlpack(x).permute(0, 2, 1, 3) for x in (q, k, v))
            if q.dtype == ml_dtypes.bfloat16:
                tq, tk, tv = (x.view(torch.bfloat16) for x in (tq, tk, tv))
            with sdpa_kernel(backend):
                fn = lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)  # noqa: E731
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


def naive_cupy(q, k, v, causal, warmup, repeats):
    """What a CuPy user writes: matmul, max, exp, sum, matmul (materialized N x N)."""
    b, n, h, d = q.shape
    if b * h * n * n * 4 * 3 > 20e9:
        return None
    qh, kh, vh = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    mask = cupy.triu(cupy.ones((n, n), bool), 1) if causal else None

    def fn():
        s = cupy.matmul(qh, kh.transpose(0, 1, 3, 2)).astype(cupy.float32) * (1 / math.sqrt(d))
        if mask is not None:
            s[..., mask] = -cupy.inf
        s -= s.max(axis=-1, keepdims=True)
        p = cupy.exp(s)
        p /= p.sum(axis=-1, keepdims=True)
        return cupy.matmul(p.astype(q.dtype), vh)

    return cupy_time(fn, warmup, repeats)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="seqlen 4096 only")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--dtypes", default="fp16,bf16")
    ap.add_argument("--variants", action="store_true", help="the attention variants (issue 7) instead")
    ap.add_argument("--variant-head-dim", type=int, default=128, help="--variants: the head_dim (128 by default)")
    ap.add_argument("--wgmma", action="store_true", help="the wgmma kernel beside the mma.sync one")
    ap.add_argument("--tag", default="", help="appended to the result file names (e.g. d256: <gpu>-forward-d256.json)")
    ap.add_argument("--rows", default="", help="--variants: only the rows of these names, separated by ';' "
                    "(with the baselines they name), e.g. 'causal+softcap;window(1024,0)'")
    args = ap.parse_args()
    if args.variants:
        return bench_variants(args)
    if args.wgmma:
        nbflash.tuning.set_wgmma(False)  # "nbflash": the mma.sync kernel; "nbflash_wgmma" turns it on per row

    dtypes = {"fp16": np.float16, "bf16": ml_dtypes.bfloat16}
    seqlens = [4096] if args.quick else [512, 1024, 2048, 4096, 8192, 16384]
    head_dims = [int(x) for x in args.head_dims.split(",")]
    peers = torch_peers()
    gpu = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    rng = cupy.random.default_rng()
    rows = []
    for dname in args.dtypes.split(","):
        dtype = dtypes[dname]
        for d in head_dims:
            for n in seqlens:
                batch = max(1, TOKENS // n)
                for causal in (False, True):
                    shape = (batch, n, HEADS, d)
                    q, k, v = (rng.standard_normal(shape, dtype=cupy.float32).astype(dtype) for _ in range(3))
                    out = cupy.full(shape, cupy.nan, dtype=cupy.float32).astype(dtype)
                    spec = nbflash.forward_spec(q, k, v, causal=causal)
                    flops = 4.0 * batch * HEADS * n * n * d / (2 if causal else 1)
                    times = {"nbflash": cupy_time(lambda: nbflash.attention(q, k, v, causal=causal, out=out), 3, args.repeats)}
                    extra = {}
                    if args.wgmma:
                        extra = wgmma_row(q, k, v, causal, out, args.repeats)
                        times["nbflash_wgmma"] = extra.pop("ms")
                    for name, run in peers.items():
                        try:
                            times[name] = run(q, k, v, causal, 3, args.repeats)
                        except Exception as e:  # a backend may refuse a shape
                            times[name] = None
                            print(f"# {name} failed: {type(e).__name__}: {str(e)[:80]}", file=sys.stderr)
                    if d == 64 and dname == "fp16":
                        times["naive_cupy"] = naive_cupy(q, k, v, causal, 1, 5)
                    row = {
                        "gpu": gpu, "dtype": dname, "batch": batch, "heads": HEADS, "seqlen": n,
                        "head_dim": d, "causal": causal, "spec": spec.key,
                        "ms": times,
                        "tflops": {k_: (flops / (t * 1e-3) / 1e12 if t else None) for k_, t in times.items()},
                        **extra,
                    }
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr)

    os.makedirs(args.out, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-")
    what = ("forward-wgmma" if args.wgmma else "forward") + (f"-{args.tag}" if args.tag else "")
    with open(os.path.join(args.out, f"{tag}-{what}.json"), "w") as f:
        json.dump(rows, f, indent=1)
    try:
        plot(rows, os.path.join(args.out, f"{tag}-{what}.png"))
    except Exception as e:
        print(f"# plot skipped: {e}", file=sys.stderr)

    names = ["nbflash"] + (["nbflash_wgmma"] if args.wgmma else []) + list(peers) + ["naive_cupy"]
    print(f"{'dtype':5} {'D':>3} {'N':>6} {'causal':6} " + " ".join(f"{n:>14}" for n in names) + "  ratio_vs_flash")
    for r in rows:
        t = r["tflops"]
        cells = " ".join(f"{t[n]:14.1f}" if t.get(n) else f"{'-':>14}" for n in names)
        ratio = t["nbflash"] / t["sdpa_flash"] if t.get("sdpa_flash") else float("nan")
        line = f"{r['dtype']:5} {r['head_dim']:>3} {r['seqlen']:>6} {str(r['causal']):6} {cells}  {ratio:.2f}"
        if args.wgmma:
            wg = t["nbflash_wgmma"] / t["sdpa_flash"] if t.get("sdpa_flash") and t.get("nbflash_wgmma") else float("nan")
            line += f"  wgmma {wg:.2f} (max|wgmma - mma| {r['wgmma_max_diff']:.1e})"
        print(line)
    print(f"# gpu: {gpu}; TFLOP/s; spec keys in the JSON")


def wgmma_row(q, k, v, causal, out, repeats):
    """Time the wgmma kernel on the same inputs (NBFLASH_WGMMA=1 for this call only) and
    compare its output with the default path's (already in ``out``)."""
    ref = out.astype(cupy.float32)
    nbflash.tuning.set_wgmma(True)
    try:
        spec = nbflash.forward_spec(q, k, v, causal=causal)
        got = cupy.full_like(out, cupy.nan)
        nbflash.attention(q, k, v, causal=causal, out=got)
        diff = float(cupy.nanmax(cupy.abs(got.astype(cupy.float32) - ref)))
        if bool(cupy.isnan(got.astype(cupy.float32)).any()):
            diff = float("nan")
        ms = cupy_time(lambda: nbflash.attention(q, k, v, causal=causal, out=got), 3, repeats)
    finally:
        nbflash.tuning.set_wgmma(False)
    return {"ms": ms, "wgmma_spec": spec.key, "wgmma_max_diff": diff}


BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}  # bytes/s of HBM, for the bias/mask targets


def visible_pairs(n, causal, window=None):
    """(query, key) pairs a seqlen-n square problem computes."""
    i = np.arange(n)
    hi = i if causal else np.full(n, n - 1)
    lo = np.zeros(n, dtype=np.int64)
    if window is not None:
        left, right = window
        if left >= 0:
            lo = np.maximum(lo, i - left)
        if right >= 0:
            hi = np.minimum(hi, i + right)
    return float(np.maximum(hi - lo + 1, 0).sum())


def visited_tiles(n, block_m, block_n, causal, window=None):
    """Key tiles (block_m x block_n score blocks) a seqlen-n square problem visits: per
    query tile, from the first to the last key tile some row of it sees (the kernels'
    skipping, window_key_range); the tile-count bound on causal / window."""
    tiles = 0
    for row0 in range(0, n, block_m):
        last_row = min(n, row0 + block_m) - 1
        first, end = 0, (last_row + 1 if causal else n)
        if window is not None:
            left, right = window
            first = max(0, row0 - left) if left >= 0 else 0
            end = min(end, last_row + right + 1) if right >= 0 else end
        if end > first:
            tiles += (end + block_n - 1) // block_n - first // block_n
    return tiles


def off_16_bytes(a):
    """``a``'s values in a buffer one element past a 16-byte boundary (contiguous)."""
    buf = cupy.empty(a.size + 1, a.dtype)
    view = buf[1:].reshape(a.shape)
    view[...] = a
    return view


def bench_variants(args):
    """Rows (name, seqlen, causal, variant kwargs, baseline row name); the table
    prints TFLOP/s over the visible pairs and the time ratio to the baseline."""
    d, dtype = args.variant_head_dim, np.float16
    gpu = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    rng = cupy.random.default_rng()
    slopes = (2.0 ** (-8.0 * (np.arange(HEADS) + 1) / HEADS)).astype(np.float32)  # ALiBi's geometric slopes
    inputs = {}

    def qkv(n):
        if n not in inputs:
            inputs.clear()  # one size at a time on the GPU
            shape = (max(1, TOKENS // n), n, HEADS, d)
            inputs[n] = [rng.standard_normal(shape, dtype=cupy.float32).astype(dtype) for _ in range(3)]
        return inputs[n]

    big = 4096
    b_big = max(1, TOKENS // big)
    plan = [
        ("full 16k", 16384, False, {}, None),
        ("causal", 16384, True, {}, None),
        ("causal+softcap", 16384, True, {"softcap": 30.0}, "causal"),
        ("causal+alibi", 16384, True, {"alibi_slopes": cupy.asarray(slopes)}, "causal"),
        ("causal+softcap+alibi", 16384, True, {"softcap": 30.0, "alibi_slopes": cupy.asarray(slopes)}, "causal"),
        ("window(1024,0)", 16384, False, {"window": (1024, 0)}, "causal"),
        ("full", big, False, {}, None),
        # a row's baseline is the plain row of the kernel family that runs it: a staged 16-bit
        # bias / mask runs the wgmma kernel on sm_90 where tuning.wgmma_fwd_scores(head_dim) is on
        # (baseline "full"), else mma.sync ("full mma"), as do the per-element reads and dropout
        ("full mma", big, False, {"wgmma": False}, None),
        ("bias fp16 BHNN", big, False, {"bias": "bias"}, "full mma"),
        ("mask BHNN", big, False, {"mask": "mask"}, "full mma"),
        ("bias fp16 BHNN mma", big, False, {"bias": "bias", "wgmma": False}, "full mma"),
        ("mask BHNN mma", big, False, {"mask": "mask", "wgmma": False}, "full mma"),
        # the same bytes one element off 16 bytes: read per element, not staged (kernels/bias_tile.py)
        ("bias fp16 BHNN per-elem", big, False, {"bias": "bias", "unaligned": True}, "full mma"),
        ("mask BHNN per-elem", big, False, {"mask": "mask", "unaligned": True}, "full mma"),
        ("dropout 0.1", big, False, {"dropout_p": 0.1, "seed": 1234}, "full mma"),
    ]
    if args.rows:
        wanted = set(args.rows.split(";"))
        wanted |= {base for name, _, _, _, base in plan if name in wanted and base}
        plan = [row for row in plan if row[0] in wanted]
    default_wgmma = nbflash.tuning.wgmma_enabled()
    rows, by_name = [], {}
    for name, n, causal, kwargs, base in plan:
        q, k, v = qkv(n)
        batch = q.shape[0]
        extra_bytes = 0
        unaligned = kwargs.pop("unaligned", False)
        nbflash.tuning.set_wgmma(kwargs.pop("wgmma", default_wgmma))
        if kwargs.get("bias") == "bias":
            kwargs = {"bias": rng.standard_normal((b_big, HEADS, n, n), dtype=cupy.float32).astype(dtype)}
            extra_bytes = kwargs["bias"].nbytes
        if kwargs.get("mask") == "mask":
            kwargs = {"mask": rng.random((b_big, HEADS, n, n), dtype=cupy.float32) < 0.9}
            extra_bytes = kwargs["mask"].nbytes
        if unaligned:
            kwargs = {key: off_16_bytes(a) for key, a in kwargs.items()}
        out = cupy.empty_like(q)
        spec = nbflash.forward_spec(q, k, v, causal=causal, **kwargs)
        if base == "full mma" and spec.kernel == "wgmma":
            base = "full"
        def call():
            nbflash.attention(q, k, v, causal=causal, out=out, **kwargs)

        ms = nbflash.device.queued_gpu_ms(call, 3, max(5, args.repeats // 2), 10)
        call_ms = cupy_time(call, 1, args.repeats)
        pairs = visible_pairs(n, causal, kwargs.get("window"))
        row = {"gpu": gpu, "name": name, "dtype": "fp16", "batch": batch, "heads": HEADS, "seqlen": n,
               "head_dim": d, "causal": causal, "spec": spec.key, "kernel": spec.kernel, "block_m": spec.block_m,
               "block_n": spec.block_n, "ms": ms, "call_ms": call_ms,
               "tflops": 4.0 * batch * HEADS * pairs * d / (ms * 1e-3) / 1e12, "baseline": base}
        if base is not None:
            row["ratio_time_to_baseline"] = ms / by_name[base]["ms"]
        if extra_bytes:
            bw = next((b for key, b in BANDWIDTH.items() if key in gpu), None)
            row["extra_bytes"] = extra_bytes
            row["extra_ms_at_bandwidth"] = extra_bytes / bw * 1e3 if bw else None
        del kwargs
        by_name[name] = row
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)

    os.makedirs(args.out, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-")
    what = "forward-variants" + (f"-{args.tag}" if args.tag else "")
    with open(os.path.join(args.out, f"{tag}-{what}.json"), "w") as f:
        json.dump(rows, f, indent=1)
    nbflash.tuning.set_wgmma(default_wgmma)
    print(f"{'variant':24} {'kernel':6} {'N':>6} {'ms':>9} {'call ms':>9} {'TFLOP/s':>8} {'x base time':>11}  target")
    for r in rows:
        ratio = r.get("ratio_time_to_baseline")
        target = ""
        if r["name"].startswith("causal+"):
            target = "<= 1.10x causal"
        elif r["name"].startswith("window"):
            bm, bn = r["block_m"], r["block_n"]
            target = (f"causal/window = {1 / ratio:.1f}x, full/window = "
                      f"{by_name['full 16k']['ms'] / r['ms'] if 'full 16k' in by_name else float('nan'):.1f}x "
                      f"(>= 8x; visible pairs: causal/window = "
                      f"{visible_pairs(16384, True) / visible_pairs(16384, False, (1024, 0)):.1f}x, "
                      f"m{bm}n{bn} tiles visited: "
                      f"{visited_tiles(16384, bm, bn, True) / visited_tiles(16384, bm, bn, False, (1024, 0)):.1f}x)")
        elif "extra_ms_at_bandwidth" in r and r["extra_ms_at_bandwidth"]:
            target = f"+{r['ms'] - by_name[r['baseline']]['ms']:.2f} ms vs {r['extra_ms_at_bandwidth']:.2f} ms of bytes"
        cell = f"{ratio:11.2f}" if ratio is not None else f"{'-':>11}"
        print(f"{r['name']:24} {r['kernel']:6} {r['seqlen']:>6} {r['ms']:9.3f} {r['call_ms']:9.3f} {r['tflops']:8.1f} "
              f"{cell}  {target}")
    print(f"# gpu: {gpu}; fp16 d{d} H{HEADS}, {TOKENS} tokens; ms: GPU time queued behind a spin kernel; call ms: "
          f"events around one call (host included); TFLOP/s over visible pairs; spec keys in the JSON")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["dtype"], r["head_dim"], r["causal"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.5), squeeze=False)
    for ax, (dname, d, causal) in zip(axes[0], groups):
        sel = [r for r in rows if (r["dtype"], r["head_dim"], r["causal"]) == (dname, d, causal)]
        for name in sel[0]["tflops"]:
            xs = [r["seqlen"] for r in sel if r["tflops"].get(name)]
            ys = [r["tflops"][name] for r in sel if r["tflops"].get(name)]
            if xs:
                ax.plot(xs, ys, marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{dname} d{d} {'causal' if causal else 'full'}")
        ax.set_xlabel("seqlen")
        ax.set_ylabel("TFLOP/s")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
