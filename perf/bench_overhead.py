"""Host overhead per call on a tiny problem (batch 1, heads 8, seqlen 128, head_dim 64,
fp16), where launch cost, not the GPU, decides throughput (decoding, small layers).

For each way of running the same attention, microseconds per call:
- host us: wall time per call of the calling thread, timed in chunks of 50 calls while
  a spin kernel holds the GPU busy (the calls' kernels queue behind it), so GPU time
  never enters; median over chunks (the five main ways' chunks interleaved, so host
  drift hits them alike). "cpu us": the thread's CPU time alike.
- warm us: the next chunk of 50 calls inside the same hold, right after the timed one:
  the host no longer coming back from the wait of the previous synchronization
  (caches, branch predictors, clocks), i.e. the steady state of a loop of calls. On
  the H100 the Python-only rows read about 2x in "host us" what they read here (memo
  key 1.99 against 1.02 us with the GPU free), so both columns are kept.
- free us: the same chunks with the GPU free; wall us: an unbroken loop plus one final
  synchronization (bounded below by the GPU time per call).
- syncs: whether one call behind a 50 ms spin kernel waited for it (nothing in a call
  path may synchronize).
Ways: nbflash.attention, a plan (allocating, and writing into a given out), the
plan's launch captured as a CUDA graph and replayed (plan.capture), Numba's
own launch of the same compiled kernel, the parts of a call (the prepared driver
launch through CuPy's launchKernel and through ctypes, the parameters as one packed
buffer, CUkernel and CUfunction handles, an empty kernel's launch as the driver's
floor, CuPy's allocation, the memo key), and torch SDPA when torch imports (a
yardstick, never a dependency). The kernel's own GPU time: CUDA events around 200
back-to-back calls queued behind a spin kernel. Then the first call in a fresh process
with an empty disk cache (cold: compiles) and with the cache filled (warm).

    python perf/bench_overhead.py [--quick] [--calls N] [--out perf/results]
    python perf/bench_overhead.py --stub     (no GPU needed: the stubbed-driver breakdown)

--stub runs perf/stub_host_path.py: the same hot paths with libcuda replaced by a no-op
and real cupy.ndarray objects over unowned memory, on any machine, and prints each
path's per-step breakdown (type checks, key, lookup, overlap check, stream, output
allocation, the prepared launch), so that where the host time goes shows without a GPU.

Writes <out>/<gpu-name>-overhead.json and prints a table last. Targets (issue 6):
attention <= 10 us, plan <= 5 us of host time, warm first call < 1 s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
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


CHUNK = 50  # calls per timed chunk
HOLD_US_PER_CALL = 200  # the GPU is held busy this long per call of a chunk

SPIN = r"""
extern "C" __global__ void nbflash_bench_spin(unsigned long long ns) {
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < ns);
}
extern "C" __global__ void nbflash_bench_empty() {}
"""


class Gpu:
    """A spin kernel that holds CuPy's current stream busy for a given time: work
    launched behind it queues, so the host side of a call is timed apart from the GPU."""

    def __init__(self):
        import cupy
        import numpy as np

        module = cupy.RawModule(code=SPIN)
        self._spin = module.get_function("nbflash_bench_spin")
        self.empty = module.get_function("nbflash_bench_empty")
        self._u64 = np.uint64
        self.stream = cupy.cuda.get_current_stream()
        self.hold(1000)
        self.stream.synchronize()

    def hold(self, us):
        self._spin((1,), (1,), (self._u64(int(us * 1000)),))

    def busy(self):
        return not self.stream.done

    def sync(self):
        self.stream.synchronize()


def _chunk(fn, n):
    """(wall us per call of the first n calls, their thread CPU us per call, wall us
    per call of the n calls after them: the warm chunk)."""
    c0, t0 = time.thread_time(), time.perf_counter()
    for _ in range(n):
        fn()
    t1, c1 = time.perf_counter(), time.thread_time()
    for _ in range(n):
        fn()
    t2 = time.perf_counter()
    return (t1 - t0) / n * 1e6, (c1 - c0) / n * 1e6, (t2 - t1) / n * 1e6


def host_per_call(fn, calls, gpu):
    """Host time per call with the GPU held busy through each timed chunk: (median
    wall us per call over chunks, median calling-thread CPU us per call, whether the
    GPU was still busy after every chunk, median wall us of the warm chunks). A call
    that synchronized would wait out the hold: the times and the flag would show it."""
    for _ in range(20):
        fn()
    gpu.sync()
    walls, cpus, warms, held = [], [], [], True
    done = 0
    while done < calls:
        n = min(CHUNK, calls - done)
        gpu.hold(2 * n * HOLD_US_PER_CALL)
        wall, cpu, warm = _chunk(fn, n)
        held = held and gpu.busy()
        gpu.sync()
        walls.append(wall)
        cpus.append(cpu)
        warms.append(warm)
        done += n
    return statistics.median(walls), statistics.median(cpus), held, statistics.median(warms)


def host_per_call_interleaved(fns, calls, gpu):
    """host_per_call for several ways at once, their chunks interleaved (chunk i of
    every way, then chunk i + 1, ...), so that drift of the host (clocks, other
    processes) hits every way alike and rows compare fairly: {way: (host us, cpu us,
    held)}."""
    for fn in fns.values():
        for _ in range(20):
            fn()
    gpu.sync()
    walls = {way: [] for way in fns}
    cpus = {way: [] for way in fns}
    warms = {way: [] for way in fns}
    held = {way: True for way in fns}
    done = 0
    while done < calls:
        n = min(CHUNK, calls - done)
        for way, fn in fns.items():
            gpu.hold(2 * n * HOLD_US_PER_CALL)
            wall, cpu, warm = _chunk(fn, n)
            held[way] = held[way] and gpu.busy()
            gpu.sync()
            walls[way].append(wall)
            cpus[way].append(cpu)
            warms[way].append(warm)
        done += n
    return {way: (statistics.median(walls[way]), statistics.median(cpus[way]), held[way],
                  statistics.median(warms[way])) for way in fns}


def free_per_call(fn, calls, gpu):
    """(host us per call in chunks with the GPU free, wall us per call of an unbroken
    loop and one final sync: bounded below by the GPU time per call)."""
    host = 0.0
    done = 0
    while done < calls:
        n = min(CHUNK, calls - done)
        start = time.perf_counter()
        for _ in range(n):
            fn()
        host += time.perf_counter() - start
        gpu.sync()
        done += n
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    gpu.sync()
    return host / calls * 1e6, (time.perf_counter() - start) / calls * 1e6


def kernel_gpu_us(fn, gpu, calls=200):
    """GPU microseconds per call of fn launched back to back: CUDA events around
    ``calls`` calls queued behind a spin kernel, so the host never starves the GPU."""
    import cupy

    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    for _ in range(10):
        fn()
    gpu.hold(calls * HOLD_US_PER_CALL)
    start.record()
    for _ in range(calls):
        fn()
    stop.record()
    held = gpu.busy()
    stop.synchronize()
    return cupy.cuda.get_elapsed_time(start, stop) * 1e3 / calls, held


def syncs(fn, gpu):
    """True when a call waits for the GPU: one call behind a 50 ms spin."""
    fn()
    gpu.sync()
    gpu.hold(50_000)
    start = time.perf_counter()
    fn()
    took = time.perf_counter() - start
    busy = gpu.busy()
    gpu.sync()
    return took > 0.025 or not busy


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
    ap.add_argument("--stub", action="store_true",
                    help="no GPU: time the hot paths with the driver stubbed, step by step (perf/stub_host_path.py)")
    ap.add_argument("--quick", action="store_true", help="fewer calls per row (1000)")
    ap.add_argument("--calls", type=int, default=None, help="calls per row (default 3000, --quick 1000)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    if args.stub:
        sys.path.insert(0, HERE)
        import stub_host_path

        stub_host_path.main()  # re-executes this command with the fake libcuda first
        return
    calls = args.calls or (1000 if args.quick else 3000)

    import cupy

    import nbflash
    from nbflash import api, launch

    plan_module = nbflash.plans
    gpu_name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    gpu = Gpu()
    rng = cupy.random.default_rng(1)
    q, k, v = (rng.standard_normal(SHAPE, dtype=cupy.float32).astype(cupy.float16) for _ in range(3))
    out = cupy.empty_like(q)
    spec = nbflash.forward_spec(q, k, v)
    rows, results = [], {}

    def optional(way, make):
        """A row whose setup or run may fail on some driver: reported, never fatal."""
        try:
            fn = make()
            if fn is not None:
                row(way, fn)
        except Exception as error:
            gpu.sync()
            print(f"# row {way!r} left out: {type(error).__name__}: {error}", file=sys.stderr)

    def row(way, fn, peer=None, timed=None):
        host, cpu, held, warm = timed if timed is not None else host_per_call(fn, calls, gpu)
        free, wall = free_per_call(fn, calls, gpu)
        synced = syncs(fn, gpu)
        results[way] = (host, cpu, warm, free, wall, held, synced)
        rows.append({"way": way, "host_us": host, "thread_cpu_us": cpu, "host_us_warm": warm,
                     "host_us_gpu_free": free, "wall_us": wall,
                     "gpu_held_through_chunks": held, "syncs": synced, "spec": spec.key, "gpu": gpu_name,
                     "peer": peer, "shape_bshd": SHAPE, "dtype": "fp16", "calls": calls})
        print(json.dumps(rows[-1]), file=sys.stderr)

    # The same answer every way (a fast path that launched nothing would show here)
    want = nbflash.attention(q, k, v)
    plan = nbflash.plan(q, k, v)
    got = plan(q, k, v)
    gpu.sync()
    assert bool(cupy.array_equal(want, got)), "plan and attention disagree"

    # plan.capture: the same launch as a CUDA graph on fixed buffers, replayed
    graph_out = cupy.empty_like(q)
    graph = plan.capture(q, k, v, out=graph_out)
    graph()
    gpu.sync()
    assert bool(cupy.array_equal(want, graph_out)), "the captured graph and attention disagree"

    main = {
        "nbflash.attention": lambda: nbflash.attention(q, k, v),
        "nbflash.attention(out=)": lambda: nbflash.attention(q, k, v, out=out),
        "plan(q, k, v)": lambda: plan(q, k, v),
        "plan(q, k, v, out=)": lambda: plan(q, k, v, out=out),
        "plan.capture(...) replay": graph,
    }
    main_times = host_per_call_interleaved(main, calls, gpu)  # the rows the targets read: side by side
    for way, fn in main.items():
        row(way, fn, timed=main_times[way])

    # The backward of the same problem (delta, dK/dV/dQ and dQ-convert kernels): a
    # repeated call through attention_backward's memo (backward_plans.py), and the same
    # call validated and dispatched in full (the memo turned off for the row)
    o_lse, lse = nbflash.attention(q, k, v, return_lse=True)
    do = rng.standard_normal(SHAPE, dtype=cupy.float32).astype(cupy.float16)
    grads = [cupy.empty_like(x) for x in (q, k, v)]
    backward = lambda: nbflash.attention_backward(do, q, k, v, o_lse, lse)  # noqa: E731
    backward_into = lambda: nbflash.attention_backward(  # noqa: E731
        do, q, k, v, o_lse, lse, dq=grads[0], dk=grads[1], dv=grads[2])
    first = backward()
    gpu.sync()
    memo_entries = len(nbflash.backward_plans._memo)
    row("attention_backward", backward)
    row("attention_backward(dq=, dk=, dv=)", backward_into)
    replayed = nbflash.backward_plans.memoized_backward
    nbflash.backward_plans.memoized_backward = lambda *a: None
    try:
        row("attention_backward, memo off", backward)
    finally:
        nbflash.backward_plans.memoized_backward = replayed
    again = backward()
    gpu.sync()
    assert memo_entries >= 1, "the backward memo remembered nothing"
    for x, y in zip(first, again):  # the atomic dQ may differ in its last bits; dk, dv may not
        assert bool(cupy.allclose(x.astype(cupy.float32), y.astype(cupy.float32), rtol=1e-2, atol=1e-3))
    assert all(bool(cupy.array_equal(x, y)) for x, y in zip(first[1:], again[1:])), "memo and validated disagree"

    # Numba's own launch of the same kernel's arguments (typing every argument per call).
    # Numba's launch cannot raise a kernel's dynamic shared-memory limit past 48 KB, so
    # this row launches the mma kernel with tiles under it (the host work is the same:
    # one argument list; the GPU is held busy either way).
    problem, views = api._validate(*(nbflash.arrays.intake(x, n) for x, n in ((q, "q"), (k, "k"), (v, "v"))), "bshd")
    numba_spec = dataclasses.replace(spec, kernel="mma", block_m=64, block_n=32, threads=128, stages=2,
                                     q_in_registers=True)
    kernel, grid, kargs, shared = api.forward_launch_args(problem, numba_spec, views, out, None, 1 / 8)
    assert shared <= 48 * 1024, f"{numba_spec.key}: {shared} bytes of shared memory"
    numba_args = [a.numba() if isinstance(a, launch.DeviceArg) else a for a in kargs]
    numba_launch = kernel[grid, numba_spec.threads, launch.current_stream(), shared]
    row("numba kernel[...](...)", lambda: numba_launch(*numba_args))

    # Where a call's host time goes: its parts alone, and the driver call in other forms
    stream_ptr = cupy.cuda.get_current_stream().ptr
    block = (numba_spec.threads, 1, 1)
    fast = launch.launcher_for(kernel, kargs, shared)
    if fast is not None:
        ptrs = [a.ptr for a in kargs[:4]]
        row("nbflash Launcher (packs all)", lambda: fast(grid, block, shared, stream_ptr, kargs))
        go = fast.bind(kargs).fixed(grid, block, shared, varying=4)
        row(f"part: prepared launch ({fast._driver.kind})", lambda: go(stream_ptr, *ptrs))
        if fast._driver.kind == "cupy":
            def ctypes_go():
                slow = launch.Launcher(fast.handle, fast.layout, fast.device, fast.name, driver=launch._Driver("ctypes"))
                go_c = slow.bind(kargs).fixed(grid, block, shared, varying=4)
                return lambda: go_c(stream_ptr, *ptrs)

            optional("part: prepared launch (ctypes)", ctypes_go)

        def handle_kinds():
            # a disk-cache load gives a CUkernel, a compile a CUfunction (this process's
            # launcher has either, depending on whether the disk cache held the kernel)
            from cuda.bindings import driver

            sig = launch.signature_of(kargs)
            cc = launch._compute_capability(fast.device)
            loaded = launch._disk_load(launch._disk_key(numba_spec.key, sig, cc), fast.layout)
            if loaded is None:
                raise LookupError("kernel not in the disk cache")
            handles = {"CUkernel": loaded[0]}
            err, function = driver.cuKernelGetFunction(driver.CUkernel(loaded[0]))
            if err == driver.CUresult.CUDA_SUCCESS:
                handles["CUfunction"] = int(function)
            return handles

        try:
            handles = handle_kinds()
        except Exception as error:
            handles = {}
            print(f"# handle kinds not compared: {type(error).__name__}: {error}", file=sys.stderr)
        for kind_name, handle in handles.items():
            def go_for(handle=handle):
                kind = "kernel" if kind_name == "CUkernel" else "function"
                go_h = launch.Launcher(handle, fast.layout, fast.device, fast.name, handle_kind=kind).bind(
                    kargs).fixed(grid, block, shared, varying=4)
                return lambda: go_h(stream_ptr, *ptrs)

            optional(f"part: prepared launch, {kind_name}", go_for)
        print(f"# the launcher's own handle: {fast.handle_kind}", file=sys.stderr)
    from cupy_backends.cuda.api.driver import launchKernel

    empty = gpu.empty.kernel.ptr
    optional("floor: empty kernel, no params",
             lambda: lambda: launchKernel(empty, 1, 1, 1, 32, 1, 1, 0, stream_ptr, 0, 0))
    if fast is not None:  # the same empty kernel with a parameter block of 64 bytes and of the forward's size
        import ctypes

        kept = []

        def empty_with_block(nbytes):
            words = nbytes // 8
            module = cupy.RawModule(code="struct Block { unsigned long long w[%d]; };\n"
                                         'extern "C" __global__ void nbflash_bench_block(Block b) {}' % words)
            handle = module.get_function("nbflash_bench_block").kernel.ptr
            buffer = (ctypes.c_uint64 * words)()
            extra = (ctypes.c_uint64 * 6)()
            extra[:] = [1, ctypes.addressof(buffer), 2, ctypes.addressof(extra) + 5 * 8, 0, nbytes]
            kept.append((module, buffer, extra))  # alive while timed
            address = ctypes.addressof(extra)
            return lambda: launchKernel(handle, 1, 1, 1, 32, 1, 1, 0, stream_ptr, 0, address)

        for nbytes in (64, fast.layout.size // 8 * 8):
            optional(f"floor: empty kernel, {nbytes}-byte params", lambda nbytes=nbytes: empty_with_block(nbytes))
    fast_c = launch.fast_launch()
    if fast_c is not None:  # the same empty kernel through the C extension: one call, and a loop in C
        c_go = fast_c.PreparedLaunch(empty, (1, 1, 1), (32, 1, 1), 0, b"", (), print)
        optional("floor: empty kernel, C PreparedLaunch", lambda: lambda: c_go(stream_ptr))
        # a row's figure is per CHUNK launches
        optional(f"floor: empty kernel, C loop (x{CHUNK}: divide)", lambda: lambda: c_go.repeat(CHUNK, stream_ptr))
    row("part: get_current_stream", lambda: cupy.cuda.get_current_stream().ptr)
    row("part: cupy.ndarray (alloc)", lambda: cupy.ndarray(SHAPE, cupy.float16))
    row("part: memo key", lambda: plan_module._memo_key(q, k, v, False, None, "bshd", False, None))

    # Serving with packed sequences: the same tokens as one sequence of attention_varlen,
    # lengths trusted (check_seqlens=False: no host copy; repeats take the varlen memo)
    qp, kp, vp, op = (x.reshape(SHAPE[1:]) for x in (q, k, v, out))
    cu = cupy.asarray([0, SHAPE[1]], dtype=cupy.int32)
    var_want = nbflash.attention_varlen(qp, kp, vp, cu, cu)
    gpu.sync()
    # varlen runs the mma.sync kernel, attention on sm_90 the wgmma one: equal to rounding
    diff = float(cupy.abs(var_want.astype(cupy.float32) - want[0].astype(cupy.float32)).max())
    assert diff <= 1e-2, f"varlen and attention disagree by {diff}"
    row("attention_varlen(check_seqlens=False, out=)", lambda: nbflash.attention_varlen(
        qp, kp, vp, cu, cu, max_seqlen_q=SHAPE[1], out=op, check_seqlens=False))
    row("attention_varlen(checked: host copy)", lambda: nbflash.attention_varlen(qp, kp, vp, cu, cu, out=op))

    try:
        import torch
        import torch.nn.functional as F

        tq, tk, tv = (torch.from_dlpack(x).permute(0, 2, 1, 3) for x in (q, k, v))
        row("torch SDPA", lambda: F.scaled_dot_product_attention(tq, tk, tv), peer="torch SDPA (default backend)")
    except ImportError:
        print("# torch not importable: no SDPA yardstick", file=sys.stderr)

    gpu_us, gpu_held = kernel_gpu_us(lambda: plan(q, k, v, out=out), gpu)

    with tempfile.TemporaryDirectory() as cache:
        cold = first_call(cache)
        warm = first_call(cache)
    for name, r in (("cold first call", cold), ("warm first call", warm)):
        rows.append({"way": name, "first_call_s": r["first_call_s"], "import_s": r["import_s"],
                     "compile_seconds": r["compile_seconds"], "spec": spec.key, "gpu": gpu_name})

    os.makedirs(args.out, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-")
    with open(os.path.join(args.out, f"{tag}-overhead.json"), "w") as f:
        json.dump({"gpu": gpu_name, "spec": spec.key, "kernel_gpu_us": gpu_us, "kernel_gpu_us_method":
                   "CUDA events around 200 back-to-back plan(out=) calls queued behind a spin kernel",
                   "launch_driver": fast._driver.kind if fast is not None else "numba",
                   "launch_handle": fast.handle_kind if fast is not None else None,
                   "rows": rows, "memo_entries": len(plan_module._memo), "fast_launchers": sum(
                       1 for x in launch._launchers.values() if x is not launch._NUMBA)}, f, indent=1)

    print(f"\n{gpu_name}  {spec.key}  B1 H8 N128 D64 fp16  ({calls} calls a row)")
    print(f"kernel GPU time {gpu_us:.2f} us per call (back to back behind a spin kernel"
          f"{'' if gpu_held else '; WARNING: the spin ended before the last launch'})")
    print("host us: wall time per call in chunks of %d with the GPU held busy (median of chunks); cpu: the "
          "calling thread's CPU time; warm: the next chunk in the same hold (a loop's steady state); free: "
          "chunks with the GPU free; wall: unbroken loop + one sync" % CHUNK)
    print(f"{'way':36} {'host us':>8} {'cpu us':>8} {'warm us':>8} {'free us':>8} {'wall us':>8}  syncs")
    for way, (host, cpu, warm_us, free, wall, held, synced) in results.items():  # (warm: the first call's)
        flag = "YES" if synced else "no"
        if not held:
            flag += " (GPU went idle in a chunk)"
        print(f"{way:36} {host:8.2f} {cpu:8.2f} {warm_us:8.2f} {free:8.2f} {wall:8.2f}  {flag}")
    for name, r in (("cold first call", cold), ("warm first call", warm)):
        print(f"{name:36} {r['first_call_s']:8.3f}s  (import {r['import_s']:.2f}s; {sorted(r['compile_seconds'])})")
    a, ao = results["nbflash.attention"][0], results["nbflash.attention(out=)"][0]
    p, g = results["plan(q, k, v, out=)"][0], results["plan.capture(...) replay"][0]
    aw, pw = results["nbflash.attention"][2], results["plan(q, k, v, out=)"][2]
    yes = lambda ok: "yes" if ok else "NO"  # noqa: E731
    print(f"targets: attention {a:.1f} us (out= {ao:.1f}; warm {aw:.1f}) <= 10: {yes(a <= 10)}; plan(out=) "
          f"{p:.1f} us (warm {pw:.1f}) <= 5: {yes(p <= 5)} (graph replay {g:.1f} us: {yes(g <= 5)}); warm first "
          f"call {warm['first_call_s']:.2f} s < 1: {yes(warm['first_call_s'] < 1)}")
    print(f"launcher handle: {fast.handle_kind if fast is not None else 'numba'} (a disk-loaded kernel launches "
          f"through its CUfunction); the main five rows were timed interleaved")


if __name__ == "__main__":
    main()
