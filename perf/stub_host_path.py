"""Python-side host cost per call of nbflash's hot paths, with the CUDA driver stubbed:
runs on a machine without a GPU (no CuPy arrays either), so it shows what nbflash's
own Python costs per call, apart from the driver's cuLaunchKernel and CuPy.

The driver is a no-op libcuda.so.1 (cuLaunchKernel returns at once) built with the
C compiler into a temporary folder and put first on LD_LIBRARY_PATH, so the real
foreign-call machinery (CuPy's Cython launchKernel, cuda.bindings, ctypes) is what
gets timed. Arrays are real cupy.ndarray objects over unowned (never touched) memory,
so CuPy's own attribute reads (shape and strides build tuples) are in the times; only
CuPy's allocator is a Python stand-in (cupy.cuda.set_allocator) and its current
stream a constant. Without CuPy a plain Python class stands in for the arrays
(cheaper attribute reads than CuPy's).

    python perf/stub_host_path.py          (needs cc; about 30 s)

Prints a table of microseconds per call (best of 15 interleaved rounds of 20k calls).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import timeit

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "..", "src")

FAKE_LIBCUDA = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <string.h>
typedef int CUresult;
static long calls;
static unsigned long long last[11];
static unsigned char block[4096];
static size_t block_size;
static int record_blocks;
void fake_record_blocks(int on) { record_blocks = on; }
CUresult cuInit(unsigned int f) { return 0; }
CUresult cuDriverGetVersion(int *v) { *v = 13000; return 0; }
CUresult cuLaunchKernel(void *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned shared, void *stream, void **params, void **extra) {
  unsigned long long v[11] = {(unsigned long long)f, gx, gy, gz, bx, by, bz, shared,
                              (unsigned long long)stream, (unsigned long long)params, (unsigned long long)extra};
  for (int i = 0; i < 11; i++) last[i] = v[i];
  /* the parameter block as handed over (extra: BUFFER_POINTER, buffer, BUFFER_SIZE, &size, END),
     where a test asked for it (timing rows pass made-up extra addresses) */
  block_size = 0;
  if (record_blocks && extra && extra[0] == (void *)1 && extra[2] == (void *)2 && *(size_t *)extra[3] <= sizeof(block)) {
    block_size = *(size_t *)extra[3];
    memcpy(block, extra[1], block_size);
  }
  __atomic_add_fetch(&calls, 1, __ATOMIC_SEQ_CST);  /* callers may launch from several threads */
  return f == (void *)0xDEAD ? 201 : 0;
}
long fake_calls(void) { return calls; }
size_t fake_block(unsigned char *out) { memcpy(out, block, block_size); return block_size; }
unsigned long long fake_last(int i) { return last[i]; }
CUresult cuGetErrorName(int e, const char **s) { *s = "CUDA_ERROR_FAKE"; return 0; }
CUresult cuGetErrorString(int e, const char **s) { *s = "fake"; return 0; }
CUresult cuGetProcAddress_v2(const char *sym, void **pfn, int v, uint64_t fl, int *status) {
  *pfn = dlsym(RTLD_DEFAULT, sym); if (status) *status = *pfn ? 0 : 1; return *pfn ? 0 : 500;
}
CUresult cuGetProcAddress(const char *sym, void **pfn, int v, uint64_t fl) {
  return cuGetProcAddress_v2(sym, pfn, v, fl, 0);
}
"""


def reexec_with_fake_driver():
    folder = tempfile.mkdtemp(prefix="nbflash-fakecuda-")
    src = os.path.join(folder, "fake.c")
    with open(src, "w") as f:
        f.write(FAKE_LIBCUDA)
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", os.path.join(folder, "libcuda.so.1"), src, "-ldl"],
                   check=True)
    env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join([folder, os.environ.get("LD_LIBRARY_PATH", "")]),
               NBFLASH_STUB_DRIVER="1", NUMBA_ENABLE_CUDASIM="1")
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


class FakeMemory:
    __slots__ = ("ptr", "device_id")

    def __init__(self, ptr, device_id=0):
        self.ptr = ptr
        self.device_id = device_id


class FakeArray:
    """What the hot paths read of a cupy.ndarray."""

    __slots__ = ("shape", "strides", "dtype", "data", "size", "itemsize", "ndim", "_c_contiguous")
    _next = [0x7F0000000000]

    def __init__(self, shape, dtype):
        import numpy as np

        self.dtype = dtype = np.dtype(dtype)
        self.shape = shape = tuple(shape)
        strides, step = [], dtype.itemsize
        for n in reversed(shape):
            strides.insert(0, step)
            step *= n
        self.strides = tuple(strides)
        self.size = step // dtype.itemsize
        self.itemsize = dtype.itemsize
        self.ndim = len(shape)
        self._c_contiguous = True
        self._next[0] += (step + 255) // 256 * 256
        self.data = FakeMemory(self._next[0])


class FakeStream:
    ptr = 0x5151


def real_cupy_arrays():
    """A maker of cupy.ndarray objects over unowned device addresses (never read or
    written: the driver is stubbed), with CuPy's allocator a Python stand-in; None
    where CuPy does not import."""
    try:
        import cupy
        from cupy.cuda import memory
    except Exception:
        return None
    next_ptr = [0x7E0000000000]

    def alloc(size):
        next_ptr[0] += (size + 255) // 256 * 256
        return memory.MemoryPointer(memory.UnownedMemory(next_ptr[0], max(size, 1), None, device_id=0), 0)

    cupy.cuda.set_allocator(alloc)
    return cupy.ndarray


def main():
    if os.environ.get("NBFLASH_STUB_DRIVER") != "1":
        reexec_with_fake_driver()
    sys.path.insert(0, SRC)
    import ctypes
    import types

    import numpy as np

    import nbflash
    from nbflash import launch, plans

    nbflash.device.SIMULATOR = False  # the fast paths from here on; nothing is ever launched for real
    launch.device.SIMULATOR = False
    Array = real_cupy_arrays() or FakeArray
    plans._ndarray_type = Array
    if hasattr(plans, "_resolve_empty"):  # an older tree allocates with Array itself
        plans._empty = plans._resolve_empty(Array) if Array.__module__.startswith("cupy") else Array
    plans._get_current_stream = lambda: FakeStream
    lib = ctypes.CDLL("libcuda.so.1")
    lib.fake_calls.restype = ctypes.c_long

    B, S, H, D = 1, 128, 8, 64
    f16 = np.dtype(np.float16)
    q, k, v, out = (Array((B, S, H, D), f16) for _ in range(4))

    def arg(a, dtype=None):
        dtype = dtype or a.dtype
        return launch.DeviceArg(a.data.ptr, a.shape, a.strides, dtype, a.size, 0, a)

    lse_dummy, seqlens = Array((1, 1, 1), np.float32), Array((1,), np.int32)
    u16 = np.dtype(np.uint16)
    args = [arg(a, u16) for a in (q, k, v, out)] + [arg(lse_dummy), np.float32(0.125), 1, arg(seqlens), arg(seqlens)]
    layout = launch.ParamLayout(launch.signature_of(args))
    launcher = launch.Launcher(0x1234, layout, 0, "stub")
    grid, block = (1, H, B), (128, 1, 1)
    go = launcher.bind(args).fixed(grid, block, 0, varying=4)  # as plans._prepare without lse
    problem = types.SimpleNamespace(out_shape=lambda: (B, S, H, D), lse_shape=lambda: (B, H, S), dtype=f16)
    extents = [plans._extent(a) for a in (q, k, v, out)]
    prepared = plans._Prepared(go, problem, False, tuple(args[4:]), extents, None, None, 0)
    for o in (None, out):
        key = plans._memo_key(q, k, v, False, None, "bshd", False, o)
        prepared_for = prepared
        plans._memo[key] = prepared_for
    plan = plans.AttentionPlan.__new__(plans.AttentionPlan)
    plan.dtype, plan.device, plan._aligned, plan.return_lse = f16, 0, True, False
    plan._lock = None
    plan._entries = {}
    for o in (None, out):
        if hasattr(plans, "_call_key"):
            plan._entries[plans._call_key(q, k, v, o)] = prepared
        else:  # an older tree (for before / after timings)
            plan._entries[(q.shape, q.strides, k.shape, k.strides, v.shape, v.strides,
                           None if o is None else (o.shape, o.strides))] = prepared

    # attention_varlen(check_seqlens=False) repeats: the varlen memo (one sequence of S tokens)
    qv, kv, vv, ov_ = (Array((S, H, D), f16) for _ in range(4))
    cu = Array((2,), np.int32)
    vargs = [arg(a, u16) for a in (qv, kv, vv, ov_)] + [arg(lse_dummy), np.float32(0.125), 1, arg(cu), arg(cu)]
    vlauncher = launch.Launcher(0x1234, launch.ParamLayout(launch.signature_of(vargs)), 0, "stub-varlen")
    vgo = vlauncher.bind(vargs).fixed((1, H, 1), block, 0, varying=7)
    vproblem = types.SimpleNamespace(out_shape=lambda: (S, H, D), lse_shape=lambda: (H, S), dtype=f16)
    ventry = plans._Prepared(vgo, vproblem, False, tuple(vargs[4:]), [plans._extent(a) for a in (qv, kv, vv, ov_)],
                             None, None, 0)
    varlen_rows = []
    if hasattr(plans, "varlen_key"):
        for o in (None, ov_):
            plans._varlen_memo[plans.varlen_key(qv, kv, vv, cu, cu, S, None, False, None, False, o)] = (
                ventry, vargs[4].ptr)
        varlen_rows = [
            ("attention_varlen(check_seqlens=False)", lambda: nbflash.attention_varlen(
                qv, kv, vv, cu, cu, max_seqlen_q=S, check_seqlens=False)),
            ("attention_varlen(check_seqlens=False, out=)", lambda: nbflash.attention_varlen(
                qv, kv, vv, cu, cu, max_seqlen_q=S, out=ov_, check_seqlens=False)),
        ]

    # a captured graph's replay: cudaGraphLaunch is the runtime's (not stubbed here), so
    # this row is the Python around it alone
    plans._graph_launch = lambda graph_exec, stream: None
    graph = plans.AttentionGraph.__new__(plans.AttentionGraph)
    graph._exec, graph._launch_args, graph._result = 1, None, out

    before = lib.fake_calls()
    assert nbflash.attention(q, k, v).shape == out.shape
    assert plan(q, k, v, out=out) is out
    assert lib.fake_calls() == before + 2, "the stubbed driver was not reached"
    for _, fn in varlen_rows:
        before = lib.fake_calls()
        fn()
        assert lib.fake_calls() == before + 1, "the varlen memo did not reach the stubbed driver"

    ptrs = [a.ptr for a in args[:4]]
    sp = FakeStream.ptr
    rows = [
        ("nbflash.attention(q, k, v)", lambda: nbflash.attention(q, k, v)),
        ("nbflash.attention(..., out=)", lambda: nbflash.attention(q, k, v, out=out)),
        ("plan(q, k, v)", lambda: plan(q, k, v)),
        ("plan(q, k, v, out=)", lambda: plan(q, k, v, out=out)),
        ("plan.capture replay (graph launch stubbed)", graph),
        *varlen_rows,
        ("part: prepared launch go()", lambda: go(sp, *ptrs)),
        ("part: Launcher (packs all args)", lambda: launcher(grid, block, 0, sp, args)),
        *([("part: driver call alone", driver_call(launch))] if hasattr(launch._get_driver(), "kind") else []),
        (f"part: {Array.__name__} alloc (Python allocator)", lambda: Array((B, S, H, D), f16)),
        ("part: memo key", lambda: plans._memo_key(q, k, v, False, None, "bshd", False, None)),
    ]
    rows += breakdown_rows(plans, nd=Array, q=q, k=k, v=v, out=out, go=go, entry=prepared, f16=f16,
                           shape=(B, S, H, D), driver=launch._get_driver())
    n, rounds = 20_000, 15
    print(f"driver: {getattr(launch._get_driver(), 'kind', 'ctypes (old)')}; stubbed libcuda; arrays: "
          f"{Array.__module__}.{Array.__name__}; best of {rounds} rounds of {n} calls, the ways "
          f"interleaved; the calling thread's CPU time (a busy machine's other work stays out)")
    best = {name: float("inf") for name, _ in rows}
    for _ in range(rounds):  # interleaved, so that drift of a shared machine hits every way alike
        for name, fn in rows:
            best[name] = min(best[name], timeit.Timer(fn, timer=time.thread_time).timeit(number=n) / n * 1e6)
    print(f"{'way':44} {'us/call':>8}")
    for name, _ in rows:
        print(f"{name:44} {best[name]:8.3f}")
    print_breakdown(best)


BREAKDOWN = {  # the steps of each hot path, in order (rows of breakdown_rows)
    "nbflash.attention(q, k, v)": ["step: attention() frame + variant args", "step: type checks", "step: data / ptr reads",
                                   "step: key tuple (no out)", "step: memo lookup (no out)",
                                   "step: current stream (stubbed)", "step: output alloc (fast)", "step: out.data.ptr",
                                   "step: go(): lock, 4 ptr stores, driver"],
    "plan(q, k, v, out=)": ["step: plan() frame", "step: type checks", "step: data / ptr reads",
                            "step: key tuple (with out)", "step: plan lookup (with out)", "step: overlap check",
                            "step: current stream (stubbed)", "step: go(): lock, 4 ptr stores, driver"],
}


def breakdown_rows(plans, *, nd, q, k, v, out, go, entry, f16, shape, driver):
    """Each step of the two main hot paths alone, written as the code does it
    (plans.memoized_attention, AttentionPlan.run): a breakdown whose sum can be set
    against the whole call (the rest: what the steps share, e.g. local variables)."""
    import nbflash

    qm, km, vm, om = q.data, k.data, v.data, out.data
    qp, kp, vp, op = qm.ptr, km.ptr, vm.ptr, om.ptr
    key = (q.shape, q._c_contiguous or q.strides, k.shape, k._c_contiguous or k.strides, v.shape,
           v._c_contiguous or v.strides, q.dtype, k.dtype, v.dtype, qm.device_id, km.device_id, vm.device_id,
           not ((qp | kp | vp) & 15))
    memo_key = ("bshd", False, None, False) + key
    out_key = key + (out.shape, out._c_contiguous or out.strides, out.dtype, om.device_id)
    memo = {memo_key: entry}
    entries = {out_key: entry}
    ov = entry.ov or (1, 0, 1, 0, 1, 0)
    stream = plans._get_current_stream
    empty = plans._empty if getattr(plans, "_empty", None) is not None else nd
    bound_go = go
    sp = stream().ptr

    def frame(q, k, v, *, causal=False, scale=None, layout="bshd", return_lse=False, out=None, stream=None,
              window=None, softcap=0.0, alibi_slopes=None, bias=None, mask=None, dropout_p=0.0, seed=None,
              return_dropout_mask=False):
        if (window is None and alibi_slopes is None and bias is None and mask is None and seed is None
                and return_dropout_mask is False and not nbflash.device.SIMULATOR
                and (softcap is None or (type(softcap) in (float, int) and softcap == 0))
                and type(dropout_p) in (float, int) and dropout_p == 0):
            return None

    class Plan:
        def run(self, q, k, v, out=None, stream=None):
            return None

        __call__ = run

    plan = Plan()

    def type_checks():
        return (type(q) is not nd or type(k) is not nd or type(v) is not nd or type(False) is not bool
                or type(False) is not bool or type("bshd") is not str or not (None is None))

    def ptr_reads():
        a, b, c = q.data, k.data, v.data
        return a.ptr, b.ptr, c.ptr

    def key_no_out():
        return ("bshd", False, None, False, q.shape, q._c_contiguous or q.strides, k.shape,
                k._c_contiguous or k.strides, v.shape, v._c_contiguous or v.strides, q.dtype, k.dtype, v.dtype,
                qm.device_id, km.device_id, vm.device_id, not ((qp | kp | vp) & 15))

    def key_out():
        return (q.shape, q._c_contiguous or q.strides, k.shape, k._c_contiguous or k.strides, v.shape,
                v._c_contiguous or v.strides, q.dtype, k.dtype, v.dtype, qm.device_id, km.device_id, vm.device_id,
                not ((qp | kp | vp) & 15), out.shape, out._c_contiguous or out.strides, out.dtype, om.device_id)

    lookup_key = tuple(memo_key)  # equal, not identical: the lookup compares as the real one does
    lookup_out_key = tuple(out_key)
    return [
        ("step: attention() frame + variant args", lambda: frame(q, k, v)),
        ("step: plan() frame", lambda: plan(q, k, v, out=out)),
        ("step: type checks", type_checks),
        ("step: data / ptr reads", ptr_reads),
        ("step: key tuple (no out)", key_no_out),
        ("step: key tuple (with out)", key_out),
        ("step: memo lookup (no out)", lambda: memo.get(lookup_key)),
        ("step: plan lookup (with out)", lambda: entries.get(lookup_out_key)),
        ("step: overlap check", lambda: ov[0] <= qp - op <= ov[1] or ov[2] <= kp - op <= ov[3]
         or ov[4] <= vp - op <= ov[5]),
        ("step: current stream (stubbed)", lambda: stream().ptr),
        ("step: output alloc (fast)", lambda: empty(shape, f16)),
        ("step: output alloc (cupy.ndarray)", lambda: nd(shape, f16)),
        ("step: out.data.ptr", lambda: out.data.ptr),
        ("step: go(): lock, 4 ptr stores, driver", lambda: bound_go(sp, qp, kp, vp, op)),
    ]


def print_breakdown(best):
    """Per hot path: its steps (us), their sum, and the whole call."""
    for way, steps in BREAKDOWN.items():
        if way not in best or any(s not in best for s in steps):
            continue
        print(f"\nbreakdown of {way}: {best[way]:.3f} us per call")
        for s in steps:
            print(f"  {s[6:]:42} {best[s]:7.3f}")
        total = sum(best[s] for s in steps)
        print(f"  {'sum of the steps':42} {total:7.3f}  (the rest, {best[way] - total:+.3f}: shared locals, "
              f"the timing loop's own call)")


def driver_call(launch):
    d = launch._get_driver()
    return lambda: d.launch_kernel(0x1234, 1, 8, 1, 128, 1, 1, 0, 0x5151, 0x1000)


if __name__ == "__main__":
    main()
