"""Compiled-kernel cache and kernel launch on the caller's stream.

A kernel is built once per spec (nbflash.spec) and kept for the process. Device
arrays reach Numba as views built from their pointers and strides, with no stream
synchronization; the launch goes on CuPy's current stream.
"""

from __future__ import annotations

import importlib
import threading

from numba import cuda

from . import device

_kernels: dict[str, object] = {}
_lock = threading.Lock()


def compiled(spec):
    """The compiled-on-first-use kernel for ``spec`` (one per process, thread safe).

    ``spec`` is any frozen spec with a readable ``key`` and a ``module`` naming the
    module of nbflash.kernels that builds it: ``module.build(spec)`` returns the
    kernel, ``module.shared_bytes(spec)`` (when defined) its dynamic shared memory.
    """
    kernel = _kernels.get(spec.key)
    if kernel is None:
        with _lock:
            kernel = _kernels.get(spec.key)
            if kernel is None:
                kernel = _kernel_module(spec).build(spec)
                _kernels[spec.key] = kernel
    return kernel


def _kernel_module(spec):
    return importlib.import_module(f".kernels.{spec.module}", __package__)


def shared_bytes(spec) -> int:
    """Dynamic shared memory a spec's kernel is launched with (0 when static)."""
    size = getattr(_kernel_module(spec), "shared_bytes", None)
    return size(spec) if size is not None else 0


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


_STATIC_SHARED_LIMIT = 48 * 1024
_raised_shared_limit: set[int] = set()


def _allow_dynamic_shared(kernel, args, nbytes):
    """Kernels asking for more than 48 KB of dynamic shared memory must opt in
    (cudaFuncAttributeMaxDynamicSharedMemorySize), once per compiled overload."""
    compiled = kernel._compile_for_args(*args)
    if id(compiled) in _raised_shared_limit:
        return
    from cuda.bindings import driver

    cufunc = compiled._codelibrary.get_cufunc()
    attr = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    (err,) = driver.cuKernelSetAttribute(attr, nbytes, cufunc.handle, cufunc.device.id)
    if err != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"could not allow {nbytes} bytes of shared memory: {err}")
    _raised_shared_limit.add(id(compiled))


def launch(kernel, grid, threads, args, shared_bytes=0):
    if shared_bytes > _STATIC_SHARED_LIMIT and not device.SIMULATOR:
        _allow_dynamic_shared(kernel, args, shared_bytes)
    kernel[grid, threads, current_stream(), shared_bytes](*args)
