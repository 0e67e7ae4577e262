"""GPU time of each kernel of nbflash.attention_backward (delta preprocess, dK/dV, dQ)
at the bench's sizes: every launch the backward makes is bracketed by CUDA events
(launch.launch wrapped for this process), median over repeats. Shows which kernel
a backward speed-up has to come from.

    python perf/probe_backward_kernels.py [--head-dims 64,128] [--mma]

fp16, B = 16k tokens / 4096, H 16, N 4096, causal and not; --mma also times the
mma.sync family (NBFLASH_WGMMA=0). Prints one line per kernel: ms and its share."""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

import cupy  # noqa: E402

import nbflash  # noqa: E402
from bench_forward import HEADS, TOKENS  # noqa: E402
from nbflash import launch  # noqa: E402

_records = []
_plain_launch = launch.launch


def _timed_launch(kernel, grid, threads, args, shared_bytes=0, stream=None):
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    _plain_launch(kernel, grid, threads, args, shared_bytes, stream)
    stop.record()
    name = launch._spec_keys.get(id(kernel), getattr(kernel, "__name__", "kernel"))
    _records.append((str(name), start, stop))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--mma", action="store_true")
    args = ap.parse_args()
    launch.launch = _timed_launch
    n = 4096
    batch = max(1, TOKENS // n)
    rng = cupy.random.default_rng()
    families = [True, False] if args.mma else [True]
    for d in (int(x) for x in args.head_dims.split(",")):
        for causal in (False, True):
            shape = (batch, n, HEADS, d)
            q, k, v, do = (rng.standard_normal(shape, dtype=cupy.float32).astype(np.float16) for _ in range(4))
            out, lse = nbflash.attention(q, k, v, causal=causal, return_lse=True)
            grads = [cupy.empty_like(q) for _ in range(3)]
            for wgmma in families:
                nbflash.tuning.set_wgmma(wgmma)
                for _ in range(2):
                    nbflash.attention_backward(do, q, k, v, out, lse, causal=causal, dq=grads[0], dk=grads[1],
                                               dv=grads[2])
                cupy.cuda.Device().synchronize()
                _records.clear()
                for _ in range(args.repeats):
                    nbflash.attention_backward(do, q, k, v, out, lse, causal=causal, dq=grads[0], dk=grads[1],
                                               dv=grads[2])
                cupy.cuda.Device().synchronize()
                times = defaultdict(list)
                for name, start, stop in _records:
                    times[name].append(cupy.cuda.get_elapsed_time(start, stop))
                med = {name: float(np.median(t)) for name, t in times.items()}
                total = sum(med.values())
                print(f"d{d} {'causal' if causal else 'full'} {'wgmma' if wgmma else 'mma.sync'}: "
                      f"{total:.3f} ms", flush=True)
                for name, ms in med.items():
                    print(f"    {ms:7.3f} ms {100 * ms / total:5.1f}%  {name}", flush=True)
            nbflash.tuning.set_wgmma(True)
            del q, k, v, do, out, lse, grads
            cupy.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
