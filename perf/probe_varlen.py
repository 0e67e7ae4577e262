"""Probe: GPU time (launches queued behind a spin kernel, perf/bench_decode.gpu_timed)
of attention_varlen against dense attention on the same equal-length batch, to tell
kernel time from host time in bench_varlen's gap. fp16, 16 heads, 16k tokens.

    python perf/probe_varlen.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

import cupy  # noqa: E402
import numpy as np  # noqa: E402

import nbflash  # noqa: E402
from bench_decode import gpu_timed  # noqa: E402

HEADS = 16


def main():
    rng = cupy.random.default_rng()
    print(f"{'D':>3} {'causal':6} {'seqs':>4} {'varlen ms':>10} {'dense ms':>9} {'ratio':>6} {'varlen call':>11} {'dense call':>10}")
    for d in (64, 128):
        for n, seqs in ((4096, 4), (16384, 1)):
            q, k, v = (rng.standard_normal((n * seqs, HEADS, d), dtype=cupy.float32).astype(cupy.float16) for _ in range(3))
            out = cupy.empty_like(q)
            cu = cupy.asarray(np.arange(seqs + 1, dtype=np.int32) * n)
            shape = (seqs, n, HEADS, d)
            dq, dk, dv, do = (x.reshape(shape) for x in (q, k, v, out))
            for causal in (False, True):
                var = lambda: nbflash.attention_varlen(q, k, v, cu, cu, max_seqlen_q=n, max_seqlen_k=n,  # noqa: E731
                                                       causal=causal, out=out, check_seqlens=False)
                den = lambda: nbflash.attention(dq, dk, dv, causal=causal, out=do)  # noqa: E731
                tv, td = gpu_timed(var), gpu_timed(den)
                cv = nbflash.device.median_gpu_ms(var, 3, 10)
                cd = nbflash.device.median_gpu_ms(den, 3, 10)
                print(f"{d:3} {str(causal):6} {seqs:4} {tv:10.3f} {td:9.3f} {td / tv:6.2f} {cv:11.3f} {cd:10.3f}", flush=True)


if __name__ == "__main__":
    main()
