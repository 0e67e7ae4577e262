"""A target for Nsight Compute: a few backward calls of nbflash (or of torch SDPA's
flash backend with --peer) at the bench's size, fp16 B 4 H 16 N 4096, so that

    ncu --clock-control none --kernel-name regex:dkdv --launch-skip 2 --launch-count 1 \
        --set full --import-source no -o prof python3 perf/profile_backward.py --head-dim 64

profiles one warm launch of the kernel named. Random normal inputs, never zeros."""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import cupy  # noqa: E402

import nbflash  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--peer", action="store_true", help="torch SDPA flash instead of nbflash")
    args = ap.parse_args()
    shape = (4, 4096, 16, args.head_dim)
    if args.peer:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
        q, k, v = (torch.randn(shape[0], shape[2], shape[1], shape[3], device="cuda", dtype=torch.float16,
                               requires_grad=True) for _ in range(3))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=args.causal)
            do = torch.randn_like(o)
            for _ in range(args.calls):
                torch.autograd.grad(o, (q, k, v), do, retain_graph=True)
        torch.cuda.synchronize()
        return
    rng = cupy.random.default_rng()
    q, k, v, do = (rng.standard_normal(shape, dtype=cupy.float32).astype(np.float16) for _ in range(4))
    out, lse = nbflash.attention(q, k, v, causal=args.causal, return_lse=True)
    grads = [cupy.empty_like(q) for _ in range(3)]
    for _ in range(args.calls):
        nbflash.attention_backward(do, q, k, v, out, lse, causal=args.causal, dq=grads[0], dk=grads[1], dv=grads[2])
    cupy.cuda.Device().synchronize()


if __name__ == "__main__":
    main()
