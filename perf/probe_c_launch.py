"""A/B of the C prepared launch (nbflash._fastlaunch) against CuPy's binding, in one
process, on bench_overhead's tiny case (B1 H8 N128 D64 fp16): the answer first (the C
launch, the Python launch and the float64 oracle), then host us per call with the
GPU held busy, every row's chunks interleaved (bench_overhead.host_per_call_interleaved).

    python perf/probe_c_launch.py [--calls N] [--out DIR]

Needs the extension built in place (cc -O2 -shared -fPIC -I<python include> -o
src/nbflash/_fastlaunch<EXT_SUFFIX> src/nbflash/_fastlaunch.c) or installed by pip.
Prints a table last and writes DIR/<gpu>-c-launch.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))
sys.path.insert(0, HERE)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    import cupy
    import numpy as np

    import bench_overhead as bo
    import nbflash
    from nbflash import launch, plans

    assert launch.fast_launch() is not None, "nbflash._fastlaunch is not built here"
    hot_c = plans._hot_run
    assert hot_c is not None, "the C hot path is off"
    gpu_name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    gpu = bo.Gpu()
    rng = cupy.random.default_rng(7)
    q, k, v = (rng.standard_normal(bo.SHAPE, dtype=cupy.float32).astype(cupy.float16) for _ in range(3))
    spec = nbflash.forward_spec(q, k, v)

    def made_with(kind):
        """(plan, memo) whose prepared launches go through the driver ``kind``."""
        launch._driver = launch._Driver(kind)
        launch._launchers.clear()
        plans.forget()
        plan = nbflash.plan(q, k, v)
        nbflash.attention(q, k, v)  # validated, remembered
        nbflash.attention(q, k, v, out=cupy.empty_like(q))
        go = next(iter(plans._memo.values())).go
        assert (type(go).__name__ == "PreparedLaunch") == (kind == "c"), (kind, type(go))
        return plan, dict(plans._memo)

    plan_c, memo_c = made_with("c")
    plan_py, memo_py = made_with("cupy")

    # the answer: C launch == Python launch == validated launch, and close to the oracle
    results = {}
    for name, plan, memo, hot in (("c", plan_c, memo_c, hot_c), ("cupy", plan_py, memo_py, None)):
        plans._memo = memo
        plans._hot_run = hot
        out = cupy.full_like(q, np.nan)
        plan(q, k, v, out=out)
        results[name + " plan"] = out
        results[name + " attention"] = nbflash.attention(q, k, v)
    plans._memo = {}
    plans._hot_run = hot_c
    validated = nbflash.attention(q, k, v, causal=False)
    gpu.sync()
    for name, got in results.items():
        assert bool(cupy.array_equal(got, validated)), f"{name} differs from the validated launch"
    ref = nbflash.reference.attention(q.get(), k.get(), v.get())
    err = float(np.abs(results["c plan"].get().astype(np.float64) - ref).max())
    assert err < 2e-3, f"C-launched plan is off the oracle by {err}"
    print(f"# answers agree bit for bit; max error against the float64 oracle {err:.2e}", file=sys.stderr)

    out = cupy.empty_like(q)

    def under(memo, hot, call):
        """call() with the memo and the hot path (C run, or None: the Python one) given."""
        def fn():
            plans._memo = memo
            plans._hot_run = hot
            return call()
        return fn

    empty = gpu.empty.kernel.ptr
    sp = cupy.cuda.get_current_stream().ptr
    from cupy_backends.cuda.api.driver import launchKernel

    c_empty = launch.fast_launch().PreparedLaunch(empty, (1, 1, 1), (32, 1, 1), 0, b"", (), print)
    # [c]: the C hot path and C launch (the default); [py+c]: the Python hot path, C launch;
    # [py]: the Python hot path and CuPy's launchKernel (before this change)
    ways = {}
    for tag, memo, hot, plan in (("c", memo_c, hot_c, plan_c), ("py+c", memo_c, None, plan_c),
                                 ("py", memo_py, None, plan_py)):
        ways[f"attention [{tag}]"] = under(memo, hot, lambda: nbflash.attention(q, k, v))
        ways[f"attention(out=) [{tag}]"] = under(memo, hot, lambda: nbflash.attention(q, k, v, out=out))
        ways[f"plan(q, k, v) [{tag}]"] = under(memo, hot, lambda plan=plan: plan(q, k, v))
        ways[f"plan(out=) [{tag}]"] = under(memo, hot, lambda plan=plan: plan(q, k, v, out=out))
    ways.update({
        "floor: empty kernel [cupy launchKernel]": lambda: launchKernel(empty, 1, 1, 1, 32, 1, 1, 0, sp, 0, 0),
        "floor: empty kernel [c]": lambda: c_empty(sp),
        f"floor: empty kernel, C loop x{bo.CHUNK} (per launch)": lambda: c_empty.repeat(bo.CHUNK, sp),
        "part: cupy.ndarray (alloc)": lambda: cupy.ndarray(bo.SHAPE, cupy.float16),
    })
    timed = bo.host_per_call_interleaved(ways, args.calls, gpu)
    rows = []
    for way, (host, cpu, held, warm) in timed.items():
        if "C loop" in way:
            host, cpu, warm = host / bo.CHUNK, cpu / bo.CHUNK, warm / bo.CHUNK
        rows.append({"way": way, "host_us": host, "thread_cpu_us": cpu, "host_us_warm": warm,
                     "gpu_held_through_chunks": held, "spec": spec.key, "gpu": gpu_name, "shape_bshd": bo.SHAPE})
    os.makedirs(args.out, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-")
    with open(os.path.join(args.out, f"{tag}-c-launch.json"), "w") as f:
        json.dump({"gpu": gpu_name, "spec": spec.key, "calls": args.calls, "rows": rows}, f, indent=1)
    print(f"\n{gpu_name}  {spec.key}  B1 H8 N128 D64 fp16, {args.calls} calls a row, GPU held busy, interleaved")
    print(f"{'way':48} {'host us':>8} {'cpu us':>8} {'warm us':>8}  held")
    for r in rows:
        print(f"{r['way']:48} {r['host_us']:8.2f} {r['thread_cpu_us']:8.2f} {r['host_us_warm']:8.2f}  "
              f"{'yes' if r['gpu_held_through_chunks'] else 'NO'}")


if __name__ == "__main__":
    main()
