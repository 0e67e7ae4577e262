"""Variable-length forward throughput: attention_varlen against the dense work it replaces.

Two cases, fp16, head_dim 64 and 128, causal off and on:
  equal  B sequences of N tokens packed (total B*N) against nbflash.attention on the
         dense (B, N, H, D) batch: the same FLOPs, so the ratio is the cost of varlen.
  mixed  sequences of mixed lengths (fixed seed) packed, against one dense call per
         sequence (what a user without varlen writes), timed as one loop.
TFLOP/s = 2 * H * (visible query-key pairs) * (D + Dv) / time; the pairs are counted
exactly per sequence (bottom-right causal), random normal inputs. "varlen" and "dense"
are GPU time: 10 calls queued behind a spin kernel (bench_decode.gpu_timed), so host
work does not enter; "varlen_call" is one whole varlen call between CUDA events
(nbflash.device.median_gpu_ms, host time included), as are the peers.
"varlen" passes device cu_seqlens, max_seqlen_q and check_seqlens=False (no host copy:
FlashAttention's serving path); "varlen_checked" (a whole call) checks them (the default), so
cu_seqlens are copied to the host (one small device->host copy per call). Peers when they import:
torch SDPA flash on the dense batch (equal case), flash_attn_varlen_func (both).

    python perf/bench_varlen.py [--quick] [--out perf/results]

Writes <out>/<gpu-name>-varlen.json and prints a table last. Target (issue 5):
varlen within 10% of the equivalent dense batch (ratio >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import numpy as np

HERE = os.path.dirname(__file__)
sys.path.insert(0, os.path.join(HERE, "..", "src"))
sys.path.insert(0, HERE)

import cupy  # noqa: E402

import nbflash  # noqa: E402
from bench_decode import gpu_timed  # noqa: E402

HEADS = 16
TOKENS = 16384
MIXED_LENGTHS_SEED = 5


def timed(fn, repeats):
    return nbflash.device.median_gpu_ms(fn, 3, repeats)


def visible_pairs(seqlens_q, seqlens_k, causal):
    total = 0
    for nq, nk in zip(seqlens_q, seqlens_k):
        if not causal:
            total += nq * nk
        else:  # query i sees keys 0 .. i + nk - nq
            i = np.arange(nq)
            total += int(np.clip(i + nk - nq + 1, 0, nk).sum())
    return total


def cu(lengths):
    return cupy.asarray(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))


def sdpa_flash_dense():
    """torch SDPA's flash backend on (B, N, H, D) CuPy buffers, or None without torch."""
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except Exception:
        return None

    def run(q, k, v, causal, repeats):
        tq, tk, tv = (torch.from_dlpack(x).permute(0, 2, 1, 3) for x in (q, k, v))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return timed(lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal), repeats)

    return run


def flash_attn_varlen():
    """flash_attn.flash_attn_varlen_func on the packed CuPy buffers, or None."""
    try:
        import torch
        from flash_attn import flash_attn_varlen_func
    except Exception:
        return None

    def run(q, k, v, cu_q, cu_k, max_q, max_k, causal, repeats):
        tq, tk, tv, tcq, tck = (torch.from_dlpack(x) for x in (q, k, v, cu_q, cu_k))
        return timed(lambda: flash_attn_varlen_func(tq, tk, tv, tcq, tck, max_q, max_k, causal=causal), repeats)

    return run


def mixed_lengths(rng, tokens):
    """Lengths from 64 to 4096 until about ``tokens`` tokens (the serving mix: a few long
    prompts among many short ones)."""
    lengths = []
    while sum(lengths) < tokens:
        lengths.append(int(min(4096, max(64, rng.lognormal(6.5, 1.0)))))
    return lengths


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="equal lengths N 4096 only, one mixed batch")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--head-dims", default="64,128")
    args = ap.parse_args()

    gpu = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    rng = cupy.random.default_rng()
    sdpa, fa_varlen = sdpa_flash_dense(), flash_attn_varlen()
    equal_ns = [4096] if args.quick else [1024, 4096, 16384]
    cases = [("equal", [n] * max(1, TOKENS // n)) for n in equal_ns]
    cases.append(("mixed", mixed_lengths(np.random.default_rng(MIXED_LENGTHS_SEED), TOKENS)))
    rows = []
    for d in (int(x) for x in args.head_dims.split(",")):
        for case, lengths in cases:
            total = sum(lengths)
            q, k, v = (rng.standard_normal((total, HEADS, d), dtype=cupy.float32).astype(cupy.float16) for _ in range(3))
            out = cupy.empty_like(q)
            cu_seqlens, max_len = cu(lengths), max(lengths)
            for causal in (False, True):
                spec = nbflash.forward_spec_varlen(q, k, v, causal=causal)
                flops = 2.0 * HEADS * visible_pairs(lengths, lengths, causal) * (d + d)
                run_varlen = lambda: nbflash.attention_varlen(  # noqa: E731
                    q, k, v, cu_seqlens, cu_seqlens, max_seqlen_q=max_len, max_seqlen_k=max_len, causal=causal, out=out,
                    check_seqlens=False)
                times = {
                    "varlen": gpu_timed(run_varlen),
                    "varlen_call": timed(run_varlen, args.repeats),
                    "varlen_checked": timed(lambda: nbflash.attention_varlen(
                        q, k, v, cu_seqlens, cu_seqlens, causal=causal, out=out), args.repeats),
                }
                if case == "equal":
                    shape = (len(lengths), lengths[0], HEADS, d)
                    dq, dk, dv = (x.reshape(shape) for x in (q, k, v))
                    dense_out = out.reshape(shape)
                    dense_spec = nbflash.forward_spec(dq, dk, dv, causal=causal).key
                    times["dense"] = gpu_timed(lambda: nbflash.attention(dq, dk, dv, causal=causal, out=dense_out))
                    if sdpa is not None:
                        times["sdpa_flash_dense"] = sdpa(dq, dk, dv, causal, args.repeats)
                else:
                    starts = np.concatenate([[0], np.cumsum(lengths)])
                    pieces = [tuple(x[None, a:b] for x in (q, k, v, out)) for a, b in zip(starts[:-1], starts[1:])]
                    dense_spec = sorted({nbflash.forward_spec(*p[:3], causal=causal).key for p in pieces})

                    def loop():
                        for pq, pk, pv, po in pieces:
                            nbflash.attention(pq, pk, pv, causal=causal, out=po)

                    times["dense"] = gpu_timed(loop)
                if fa_varlen is not None:
                    try:
                        times["flash_attn_varlen"] = fa_varlen(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, causal, args.repeats)
                    except Exception as e:
                        print(f"# flash_attn_varlen failed: {type(e).__name__}: {str(e)[:80]}", file=sys.stderr)
                tflops = {name: flops / (t * 1e-3) / 1e12 for name, t in times.items()}
                row = {
                    "gpu": gpu, "dtype": "fp16", "case": case, "batch": len(lengths), "tokens": total,
                    "max_seqlen": max_len, "heads": HEADS, "head_dim": d, "causal": causal,
                    "spec": spec.key, "dense_spec": dense_spec, "lengths": lengths if case == "mixed" else None,
                    "ms": times, "tflops": tflops, "ratio_vs_dense": times["dense"] / times["varlen"],
                }
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)

    os.makedirs(args.out, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-")
    with open(os.path.join(args.out, f"{tag}-varlen.json"), "w") as f:
        json.dump(rows, f, indent=1)

    names = ["varlen", "varlen_call", "varlen_checked", "dense", "sdpa_flash_dense", "flash_attn_varlen"]
    print(f"{'case':5} {'D':>3} {'causal':6} {'batch':>5} {'tokens':>6} " + " ".join(f"{n:>17}" for n in names) + "  varlen/dense")
    for r in rows:
        t = r["tflops"]
        cells = " ".join(f"{t[n]:17.1f}" if t.get(n) else f"{'-':>17}" for n in names)
        print(f"{r['case']:5} {r['head_dim']:>3} {str(r['causal']):6} {r['batch']:>5} {r['tokens']:>6} {cells}  {r['ratio_vs_dense']:.2f}")
    print(f"# gpu: {gpu}; fp16, {HEADS} heads, TFLOP/s; varlen and dense: GPU time (launches queued behind a "
          f"spin kernel); varlen_call, varlen_checked and the peers: one whole call between events (host "
          f"time included); dense = one dense batch (equal) or one call per sequence (mixed); target "
          f"varlen/dense >= 0.90; spec keys in the JSON")


if __name__ == "__main__":
    main()
