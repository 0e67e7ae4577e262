"""Host time of cuLaunchKernel against the number of kernel parameters, and with the
parameters handed over as one buffer (CU_LAUNCH_PARAM_BUFFER_POINTER) instead of an
array of per-parameter pointers (issue 6: a plain attention kernel declares ~120
parameters, 49 of them variant and cu_seqlens members it never reads).

    python perf/probe_launch_params.py

Empty kernels taking 1, 4 and 9 four-dimensional arrays plus scalars (13 parameters per
array) launch from one packed parameter block, through a void* per parameter
(kernelParams) and through the block whole ("extra": nbflash.launch's way since this
probe, Bound.fixed); neither packs anything per call. Prints host microseconds per launch as
perf/bench_overhead.py measures them: with the GPU held busy by a spin kernel (the state
a model's loop is in; the two ways interleaved chunk by chunk) and with it free."""

from __future__ import annotations

import ctypes
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import cupy  # noqa: E402
import numpy as np  # noqa: E402
from cupy_backends.cuda.api.driver import launchKernel  # noqa: E402
from numba import cuda  # noqa: E402

from nbflash import launch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from bench_overhead import Gpu, free_per_call, host_per_call_interleaved  # noqa: E402


def kernel_of(arrays):
    names = ", ".join([f"a{i}" for i in range(arrays)] + ["s", "g"])
    source = f"def empty({names}):\n    if s > 1e30:\n        a0[0, 0, 0, 0] = g\n"
    namespace = {}
    exec(source, namespace)  # noqa: S102
    return cuda.jit(namespace["empty"])


def pointer_array(layout, buffer):
    """cuLaunchKernel's kernelParams for a packed block: a void* to each parameter."""
    base = ctypes.addressof(buffer)
    return (ctypes.c_void_p * len(layout.param_offsets))(*[base + o for o in layout.param_offsets])


def main():
    gpu = Gpu()
    stream = gpu.stream
    x = cupy.zeros((2, 2, 2, 2), cupy.float32)
    print(f"{'params':>7} {'arrays':>7} {'ptrs busy':>10} {'buffer busy':>12} {'ptrs free':>10} {'buffer free':>12}")
    for arrays in (1, 4, 9):
        kernel = kernel_of(arrays)
        views = [launch.numba_view(x)] * arrays + [np.float32(1), np.int64(2)]
        launch.launch(kernel, (1,), 32, views, 0, stream.ptr)
        stream.synchronize()
        launcher = next(v for k, v in launch._launchers.items() if k[0] == id(kernel))
        bound = launcher.bind(views)
        go = bound.fixed((1, 1, 1), (32, 1, 1), 0, varying=0)  # the shipped path: the block through extra
        pointers = pointer_array(launcher.layout, bound._buffer)
        pointers_addr = ctypes.addressof(pointers)

        def by_pointers():
            launchKernel(launcher.handle, 1, 1, 1, 32, 1, 1, 0, stream.ptr, pointers_addr, 0)

        def by_buffer():
            go(stream.ptr)

        busy = host_per_call_interleaved({"ptrs": by_pointers, "buffer": by_buffer}, 2000, gpu)
        free = [free_per_call(fn, 2000, gpu)[0] for fn in (by_pointers, by_buffer)]
        print(f"{len(launcher.layout.param_sizes):7d} {arrays:7d} {busy['ptrs'][0]:10.2f} {busy['buffer'][0]:12.2f}"
              f" {free[0]:10.2f} {free[1]:12.2f}", flush=True)


if __name__ == "__main__":
    main()
