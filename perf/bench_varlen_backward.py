"""Variable-length backward throughput: attention_varlen_backward against the dense work
it replaces.

Two cases, fp16, 16 heads, causal off and on (head_dim 64 and 128; --quick: 128):
  equal  B sequences of N tokens packed (total B*N) against attention_backward on the
         dense (B, N, H, D) batch: the same FLOPs, so the ratio is the cost of varlen.
  mixed  sequences of mixed lengths (fixed seed, bench_varlen's mix) packed, against one
         dense attention_backward per sequence (what the per-sequence loop did before
         the varlen kernels, and what a user without varlen writes), timed as one loop.
TFLOP/s = 2.5 x the forward's FLOPs (2 * H * visible query-key pairs * (D + Dv), pairs
counted exactly per sequence, bottom-right causal) / time, as bench_backward.

"varlen" and "dense" are GPU time: 10 calls queued behind a spin kernel
(bench_decode.gpu_timed), so host work does not enter. attention_varlen_backward reads
cu_seqlens on the host (a device->host copy that would wait for the spin kernel), so
"varlen" times its launches with the lengths read once beforehand (api_varlen's
_backward_varlen: delta, dK/dV and dQ, one launch each); "varlen_call" is one whole
attention_varlen_backward call between CUDA events (nbflash.device.median_gpu_ms,
host time and the cu_seqlens copy included), "dense_call" the same for the dense
batch or the per-sequence loop. Peer when it imports: flash_attn_varlen_func's
backward (torch autograd through its saved forward), a whole call.

    python perf/bench_varlen_backward.py [--quick] [--out perf/results]

Writes <out>/<gpu-name>-varlen-backward.json and prints a table last. Target (issue 5):
varlen within 10% of the equivalent dense batch (ratio >= 0.9), and above the
per-sequence loop on mixed lengths.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import replace

import numpy as np

HERE = os.path.dirname(__file__)
sys.path.insert(0, os.path.join(HERE, "..", "src"))
sys.path.insert(0, HERE)

import cupy  # noqa: E402

import nbflash  # noqa: E402
from bench_decode import gpu_timed  # noqa: E402
from bench_varlen import HEADS, TOKENS, MIXED_LENGTHS_SEED, mixed_lengths, visible_pairs  # noqa: E402
from nbflash import api_varlen, arrays, variants  # noqa: E402
from nbflash.api_backward import choose_backward_spec  # noqa: E402


def timed(fn, repeats):
    return nbflash.device.median_gpu_ms(fn, 3, repeats)


def prepared_varlen_backward(do, q, k, v, out, lse, grads, lengths, causal):
    """attention_varlen_backward's launches with everything the host reads done once:
    a function that runs delta, dK/dV and dQ on the packed batch (GPU work only)."""
    ops = [arrays.intake(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v"))]
    problem, views = api_varlen._validate_3d(ops)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    seqlens = api_varlen._Seqlens(cupy.asarray(cu), cupy.asarray(cu), len(lengths), max(lengths))
    grad_views = [g[None] for g in grads]
    spec = choose_backward_spec(problem, causal, False, [*views, do[None], *grad_views])
    assert spec.module == "backward_mma", spec.key
    scale = 1.0 / np.sqrt(q.shape[2])

    def run():
        api_varlen._backward_varlen(spec, problem, views, do, out, lse, grad_views, seqlens, max(lengths), scale,
                                    False, variants.NO_VARIANTS)

    return run, replace(spec, varlen=True).key


def flash_attn_varlen_backward():
    """flash_attn_varlen_func's backward on the packed CuPy buffers, or None."""
    try:
        import torch
        from flash_attn import flash_attn_varlen_func
    except Exception:
        return None

    def run(q, k, v, do, cu_q, max_len, causal, repeats):
        tq, tk, tv = (torch.from_dlpack(x).detach().requires_grad_() for x in (q, k, v))
        tcu, tdo = torch.from_dlpack(cu_q), torch.from_dlpack(do)
        out = flash_attn_varlen_func(tq, tk, tv, tcu, tcu, max_len, max_len, causal=causal)
        return timed(lambda: torch.autograd.grad(out, (tq, tk, tv), tdo, retain_graph=True), repeats)

    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="head_dim 128, equal lengths N 4096, one mixed batch")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--head-dims", default=None, help="default 64,128 (128 with --quick)")
    args = ap.parse_args()

    gpu = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    rng = cupy.random.default_rng()
    fa = flash_attn_varlen_backward()
    head_dims = args.head_dims or ("128" if args.quick else "64,128")
    equal_ns = [4096] if args.quick else [1024, 4096, 16384]
    cases = [("equal", [n] * max(1, TOKENS // n)) for n in equal_ns]
    cases.append(("mixed", mixed_lengths(np.random.default_rng(MIXED_LENGTHS_SEED), TOKENS)))
    rows = []
    for d in (int(x) for x in head_dims.split(",")):
        for case, lengths in cases:
            total = sum(lengths)
            q, k, v, do = (rng.standard_normal((total, HEADS, d), dtype=cupy.float32).astype(cupy.float16)
                           for _ in range(4))
            grads = [cupy.empty_like(x) for x in (q, k, v)]
            cu_seqlens, max_len = cupy.asarray(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)), max(lengths)
            starts = np.concatenate([[0], np.cumsum(lengths)])
            for causal in (False, True):
                out, lse = nbflash.attention_varlen(q, k, v, cu_seqlens, cu_seqlens, causal=causal, return_lse=True)
                run_varlen, spec = prepared_varlen_backward(do, q, k, v, out, lse, grads, lengths, causal)
                flops = 2.5 * 2.0 * HEADS * visible_pairs(lengths, lengths, causal) * (d + d)
                times = {
                    "varlen": gpu_timed(run_varlen),
                    "varlen_call": timed(lambda: nbflash.attention_varlen_backward(
                        do, q, k, v, out, lse, cu_seqlens, cu_seqlens, causal=causal,
                        dq=grads[0], dk=grads[1], dv=grads[2]), args.repeats),
                }
                if case == "equal":
                    shape = (len(lengths), lengths[0], HEADS, d)
                    dense = [x.reshape(shape) for x in (do, q, k, v)]
                    dense_out, dense_lse = nbflash.attention(*dense[1:], causal=causal, return_lse=True)
                    dense_grads = [g.reshape(shape) for g in grads]

                    def dense_call():
                        nbflash.attention_backward(*dense[:1], *dense[1:], dense_out, dense_lse, causal=causal,
                                                   dq=dense_grads[0], dk=dense_grads[1], dv=dense_grads[2])
                    dense_spec = nbflash.backward_spec(*dense[1:], causal=causal).key
                else:
                    pieces = [(slice(a, b), (do, q, k, v, out), lse[:, a:b]) for a, b in zip(starts[:-1], starts[1:])]

                    def dense_call():
                        for rows_, arrays_, piece_lse in pieces:
                            pdo, pq, pk, pv, po = (x[rows_] for x in arrays_)
                            nbflash.attention_backward(pdo, pq, pk, pv, po, piece_lse, causal=causal,
                                                       dq=grads[0][rows_], dk=grads[1][rows_], dv=grads[2][rows_])
                    dense_spec = sorted({nbflash.backward_spec(q[r], k[r], v[r], causal=causal).key
                                         for r, _, _ in pieces})
                times["dense"] = gpu_timed(dense_call)
                times["dense_call"] = timed(dense_call, args.repeats)
                if fa is not None:
                    try:
                        times["flash_attn_varlen"] = fa(q, k, v, do, cu_seqlens, max_len, causal, args.repeats)
                    except Exception as e:
                        print(f"# flash_attn_varlen backward failed: {type(e).__name__}: {str(e)[:80]}",
                              file=sys.stderr)
                tflops = {name: flops / (t * 1e-3) / 1e12 for name, t in times.items()}
                row = {
                    "gpu": gpu, "dtype": "fp16", "case": case, "batch": len(lengths), "tokens": total,
                    "max_seqlen": max_len, "heads": HEADS, "head_dim": d, "causal": causal,
                    "spec": spec, "dense_spec": dense_spec, "lengths": lengths if case == "mixed" else None,
                    "ms": times, "tflops": tflops, "ratio_vs_dense": times["dense"] / times["varlen"],
                }
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)

    os.makedirs(args.out, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-")
    with open(os.path.join(args.out, f"{tag}-varlen-backward.json"), "w") as f:
        json.dump(rows, f, indent=1)

    names = ["varlen", "varlen_call", "dense", "dense_call", "flash_attn_varlen"]
    print(f"{'case':5} {'D':>3} {'causal':6} {'batch':>5} {'tokens':>6} " + " ".join(f"{n:>17}" for n in names)
          + "  varlen/dense")
    for r in rows:
        t = r["tflops"]
        cells = " ".join(f"{t[n]:17.1f}" if t.get(n) else f"{'-':>17}" for n in names)
        print(f"{r['case']:5} {r['head_dim']:>3} {str(r['causal']):6} {r['batch']:>5} {r['tokens']:>6} {cells}  "
              f"{r['ratio_vs_dense']:.2f}")
    print(f"# gpu: {gpu}; fp16 backward, {HEADS} heads, TFLOP/s (2.5x forward FLOPs); varlen and dense: GPU time "
          f"(launches queued behind a spin kernel); *_call and the peer: one whole call between events (host "
          f"time included); dense = one dense batch (equal) or one attention_backward per sequence (mixed); "
          f"target varlen/dense >= 0.90; spec keys in the JSON")


if __name__ == "__main__":
    main()
