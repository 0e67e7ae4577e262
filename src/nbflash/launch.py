"""Compiled-kernel cache and kernel launch on the caller's stream.

A kernel is built once per spec (nbflash.spec) and kept for the process. Device
arrays reach Numba as views built from their pointers and strides, with no stream
synchronization; the launch goes on CuPy's current stream.
"""

from __future__ import annotations

import threading

from numba import cuda

from . import device
from .spec import ForwardSpec

_kernels: dict[str, object] = {}
_lock = threading.Lock()


def forward_kernel(spec: ForwardSpec):
    """The compiled-on-first-use kernel for ``spec`` (one per process, thread safe)."""
    kernel = _kernels.get(spec.key)
    if kernel is None:
        with _lock:
            kernel = _kernels.get(spec.key)
            if kernel is None:
                kernel = _build(spec)
                _kernels[spec.key] = kernel
    return kernel


def _build(spec: ForwardSpec):
    if spec.kernel == "simt":
        from .kernels import forward_simt

        return forward_simt.build(spec)
    if spec.kernel == "mma":
        from .kernels import forward_mma

        return forward_mma.build(spec)
    raise ValueError(f"unknown kernel family in spec {spec.key}")


def numba_view(a):
    """A Numba device array over a CuPy array's memory (no copy, no sync); on the
    simulator, a fake device array over the NumPy array itself, so strided views are
    read and written in place."""
    if device.SIMULATOR:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        return FakeCUDAArray(a)
    interface = {
        "shape": tuple(a.shape),
        "strides": tuple(a.strides),
        "typestr": a.dtype.str,
        "data": (a.data.ptr, False),
        "version": 3,
    }
    return cuda.from_cuda_array_interface(interface, owner=a, sync=False)


def current_stream():
    """CuPy's current stream as a Numba stream (0 on the simulator)."""
    if device.SIMULATOR:
        return 0
    import cupy

    ptr = cupy.cuda.get_current_stream().ptr
    return cuda.external_stream(ptr) if ptr else cuda.default_stream()


def launch(kernel, grid, threads, args):
    kernel[grid, threads, current_stream()](*args)
