"""Self-check: ``python -m nbflash`` runs attention on random data, compares it with
the float64 oracle and prints the device, the shape, the errors, the time and TFLOP/s.
Exits non-zero when the check fails."""

from __future__ import annotations

import sys
import time

import numpy as np

import nbflash
from nbflash import arrays, device, launch

TOLERANCE = {"fp16": 3e-3, "bf16": 1e-2, "fp32": 2e-5, "fp64": 1e-12}


def main() -> int:
    rng = np.random.default_rng()
    if device.SIMULATOR:
        print("No GPU found: running a small case on Numba's CUDA simulator (slow, for testing).")
        batch, heads, seqlen, head_dim, dtype, causal = 1, 2, 48, 16, np.float32, True
    else:
        batch, heads, seqlen, head_dim, dtype, causal = 2, 8, 1024, 64, np.float16, True
    shape = (batch, seqlen, heads, head_dim)
    q, k, v = (rng.standard_normal(shape).astype(dtype) for _ in range(3))
    spec = nbflash.forward_spec(q, k, v, causal=causal)

    if device.SIMULATOR:
        t0 = time.perf_counter()
        out = nbflash.attention(q, k, v, causal=causal)
        seconds = time.perf_counter() - t0
        timing = f"{seconds:.2f} s wall (simulator)"
    else:
        import cupy

        dq, dk, dv = (cupy.asarray(x) for x in (q, k, v))
        out_dev = cupy.full(shape, np.nan, dtype)
        seconds = device.median_gpu_ms(lambda: nbflash.attention(dq, dk, dv, causal=causal, out=out_dev)) / 1e3
        out = out_dev.get()
        flops = 4.0 * batch * heads * seqlen * seqlen * head_dim / (2 if causal else 1)
        timing = f"{seconds * 1e3:.3f} ms median, {flops / seconds / 1e12:.1f} TFLOP/s"

    ref = nbflash.reference.attention(q, k, v, causal=causal)
    err = np.abs(out.astype(np.float64) - ref)
    rel = float(np.linalg.norm(err) / np.linalg.norm(ref)) if np.isfinite(err).all() else float("inf")
    tol = TOLERANCE[arrays.short_name(np.dtype(dtype))]
    ok = rel <= tol
    print(f"device : {device.describe()}")
    print(f"shape  : q/k/v {shape} (bshd), {np.dtype(dtype).name}, causal={causal}")
    print(f"kernel : {spec.key}")
    print(f"launch : {launch.describe_host_path()}")
    print(f"error  : max abs {float(err.max()):.3e}, relative {rel:.3e} (limit {tol:.0e})")
    print(f"time   : {timing}")
    print("check  : " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
