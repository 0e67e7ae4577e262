"""Host overhead per call on a tiny problem (batch 1, heads 8, seqlen 128, head_dim 64,
fp16), where launch cost, not the GPU, decides throughput (decoding, small layers).

For each way of running the same attention: wall-clock microseconds per call over
--calls calls with no synchronization inside the loop ("host us": what the calling
thread spends), and including one synchronization at the end ("wall us": bounded
below by the GPU time when the GPU is the bottleneck). Ways: nbflash.attention, a
plan (allocating, and writing into a given out), Numba's own launch of the same
compiled kernel, and torch SDPA when torch imports (a yardstick, never a dependency).
Then the first call in a fresh process with an empty disk cache (cold: compiles) and
with the cache filled (warm), each in a subprocess.

    python perf/bench_overhead.py [--quick] [--calls 2000] [--out perf/results]

Writes <out>/<gpu-name>-overhead.json and prints a table last. Targets (issue 6):
attention <= 10 us, plan <= 5 us, warm first call < 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "..", "src")
sys.path.insert(0, SRC)

SHAPE = (1, 128, 8, 64)  # (batch, seqlen, heads, head_dim), bshd

FIRST_CALL = r"""
import json, sys, time
t0 = time.perf_counter()
import cupy
import nbflash
from nbflash import launch
t1 = time.perf_counter()
rng = cupy.random.default_rng(0)
q, k, v = (rng.standard_normal(%r, dtype=cupy.float32).astype(cupy.float16) for _ in range(3))
cupy.cuda.Device().synchronize()
t2 = time.perf_counter()
out = nbflash.attention(q, k, v, causal=True)
cupy.cuda.Device().synchronize()
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "first_call_s": t3 - t2, "compile_seconds": launch.compile_seconds}))
"""


CHUNK = 100  # calls between synchronizations when timing host cost


def per_call(fn, calls, sync):
    """(host us per call, wall us per call incl. one final sync), after warm-up.

    Host time is summed over chunks of CHUNK calls with a synchronization between
    chunks (not timed): once calls are cheaper than the kernel, an unbroken loop
    fills the driver's launch queue and then measures the GPU, not the host."""
    for _ in range(20):
        fn()
    sync()
    host = 0.0
    done = 0
    while done < calls:
        n = min(CHUNK, calls - done)
        start = time.perf_counter()
        for _ in range(n):
            fn()
        host += time.perf_counter() - start
        sync()
        done += n
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    wall = time.perf_counter() - start
    return host / calls * 1e6, wall / calls * 1e6


def first_call(cache_dir):
    env = dict(os.environ, NBFLASH_CACHE_DIR=cache_dir)
    env["PYTHONPATH"] = os.pathsep.join([SRC, env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", FIRST_CALL % (SHAPE,)], env=env,
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="(the default size already runs in well under 2 minutes)")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()

    import cupy

    import nbflash
    from nbflash import api, launch

    plan_module = nbflash.plans
    gpu = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    sync = cupy.cuda.get_current_stream().synchronize
    rng = cupy.random.default_rng(1)
    q, k, v = (rng.standard_normal(SHAPE, dtype=cupy.float32).astype(cupy.float16) for _ in range(3))
    out = cupy.empty_like(q)
    spec = nbflash.forward_spec(q, k, v)
    rows, results = [], {}

    def row(way, fn, peer=None):
        host, wall = per_call(fn, args.calls, sync)
        results[way] = (host, wall)
        rows.append({"way": way, "host_us": host, "wall_us": wall, "spec": spec.key, "gpu": gpu,
                     "peer": peer, "shape_bshd": SHAPE, "dtype": "fp16", "calls": args.calls})
        print(json.dumps(rows[-1]), file=sys.stderr)

    # The same answer every way (a fast path that launched nothing would show here)
    want = nbflash.attention(q, k, v)
    plan = nbflash.plan(q, k, v)
    got = plan(q, k, v)
    sync()
    assert bool(cupy.array_equal(want, got)), "plan and attention disagree"

    row("nbflash.attention", lambda: nbflash.attention(q, k, v))
    row("nbflash.attention(out=)", lambda: nbflash.attention(q, k, v, out=out))
    row("plan(q, k, v)", lambda: plan(q, k, v))
    row("plan(q, k, v, out=)", lambda: plan(q, k, v, out=out))

    # Numba's own launch of the very same compiled kernel (typing every argument per call)
    problem, views = api._validate(*(nbflash.arrays.intake(x, n) for x, n in ((q, "q"), (k, "k"), (v, "v"))), "bshd")
    kernel, grid, kargs, shared = api.forward_launch_args(problem, spec, views, out, None, 1 / 8)
    numba_args = [a.numba() if isinstance(a, launch.DeviceArg) else a for a in kargs]
    numba_stream = launch.current_stream()
    numba_launch = kernel[grid, spec.threads, numba_stream, shared]
    row("numba kernel[...](...)", lambda: numba_launch(*numba_args))
    fast = launch.launcher_for(kernel, kargs, shared)
    if fast is not None:
        stream_ptr = cupy.cuda.get_current_stream().ptr
        block = (spec.threads, 1, 1)
        row("nbflash launcher alone", lambda: fast(grid, block, shared, stream_ptr, kargs))

    # Where a plan call's host time goes: its parts alone
    bound = fast.bind(kargs).fixed(grid, (spec.threads, 1, 1), shared) if fast is not None else None
    if bound is not None:
        stream_ptr = cupy.cuda.get_current_stream().ptr
        ptrs = [a.ptr for a in kargs if hasattr(a, "ptr")]  # every array argument, cu_seqlens included
        row("part: prepared launch (go)", lambda: bound(stream_ptr, *ptrs))
    row("part: get_current_stream", lambda: cupy.cuda.get_current_stream().ptr)
    row("part: cupy.ndarray (alloc)", lambda: cupy.ndarray(SHAPE, cupy.float16))
    row("part: memo key", lambda: (q.shape, q.strides, k.shape, k.strides, v.shape, v.strides, q.dtype,
                                   k.dtype, v.dtype, q.data.device_id, q.data.ptr))

    try:
        import torch
        import torch.nn.functional as F

        tq, tk, tv = (torch.from_dlpack(x).permute(0, 2, 1, 3) for x in (q, k, v))
        row("torch SDPA", lambda: F.scaled_dot_product_attention(tq, tk, tv), peer="torch SDPA (default backend)")
    except ImportError:
        print("# torch not importable: no SDPA yardstick", file=sys.stderr)

    gpu_us = nbflash.device.median_gpu_ms(lambda: plan(q, k, v, out=out), 10, 50) * 1e3

    with tempfile.TemporaryDirectory() as cache:
        cold = first_call(cache)
        warm = first_call(cache)
    for name, r in (("cold first call", cold), ("warm first call", warm)):
        rows.append({"way": name, "first_call_s": r["first_call_s"], "import_s": r["import_s"],
                     "compile_seconds": r["compile_seconds"], "spec": spec.key, "gpu": gpu})

    os.makedirs(args.out, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-")
    with open(os.path.join(args.out, f"{tag}-overhead.json"), "w") as f:
        json.dump({"gpu": gpu, "spec": spec.key, "kernel_gpu_us": gpu_us, "rows": rows,
                   "memo_entries": len(plan_module._memo), "fast_launchers": sum(
                       1 for x in launch._launchers.values() if x is not launch._NUMBA)}, f, indent=1)

    print(f"\n{gpu}  {spec.key}  B1 H8 N128 D64 fp16  kernel GPU time {gpu_us:.1f} us  ({args.calls} calls)")
    print(f"{'way':28} {'host us/call':>13} {'wall us/call':>13}")
    for way, (host, wall) in results.items():
        print(f"{way:28} {host:13.2f} {wall:13.2f}")
    for name, r in (("cold first call", cold), ("warm first call", warm)):
        print(f"{name:28} {r['first_call_s']:12.3f}s  (import {r['import_s']:.2f}s; {sorted(r['compile_seconds'])})")
    a, p = results["nbflash.attention"][0], results["plan(q, k, v, out=)"][0]
    print(f"targets: attention {a:.1f} us <= 10: {'yes' if a <= 10 else 'NO'}; plan {p:.1f} us <= 5: "
          f"{'yes' if p <= 5 else 'NO'}; warm first call {warm['first_call_s']:.2f} s < 1: "
          f"{'yes' if warm['first_call_s'] < 1 else 'NO'}")


if __name__ == "__main__":
    main()
