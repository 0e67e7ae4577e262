"""Where kernels run: a CUDA GPU, or Numba's CUDA simulator on a machine without one.

This module must be imported before ``numba.cuda``: the simulator is chosen by an
environment variable that numba.cuda reads once, at its own import.
"""

from __future__ import annotations

import os
import sys


def _driver_sees_a_gpu() -> bool:
    """True when the CUDA driver loads and reports at least one device."""
    try:
        from cuda.bindings import driver
    except ImportError:
        return False
    try:
        (err,) = driver.cuInit(0)
        if err != driver.CUresult.CUDA_SUCCESS:
            return False
        err, count = driver.cuDeviceGetCount()
        return err == driver.CUresult.CUDA_SUCCESS and count > 0
    except Exception:  # a missing libcuda raises from inside the bindings
        return False


def _choose_backend() -> bool:
    """Turn the simulator on when there is no GPU and nobody chose otherwise.

    Returns True when kernels will run on the simulator.
    """
    explicit = os.environ.get("NUMBA_ENABLE_CUDASIM")
    if explicit is None and "numba.cuda" not in sys.modules and not _driver_sees_a_gpu():
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    # Small test grids are expected; keep Numba's occupancy warning for users' own kernels off ours.
    os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")
    from numba.cuda.core import config

    return bool(config.ENABLE_CUDASIM)


SIMULATOR: bool = _choose_backend()
"""True when kernels run on Numba's CUDA simulator (slow; meant for testing)."""

if SIMULATOR:
    from . import simulator as _simulator

    _simulator.install()


def cupy_or_none():
    """The cupy module when a GPU is in use and CuPy imports, else None."""
    if SIMULATOR:
        return None
    try:
        import cupy
    except ImportError:
        return None
    return cupy


def compute_capability() -> tuple[int, int]:
    """(major, minor) of the current GPU; the simulator counts as able to run every
    kernel (its intrinsics are emulated)."""
    if SIMULATOR:
        return (9, 0)
    import cupy

    dev = cupy.cuda.runtime.getDevice()  # ~0.1 µs; Numba's device lookup costs tens
    cc = _CAPABILITY.get(dev)
    if cc is None:
        cc = _CAPABILITY[dev] = divmod(int(cupy.cuda.Device(dev).compute_capability), 10)
    return cc


_CAPABILITY: dict = {}  # device ordinal -> (major, minor)


def max_shared_bytes() -> int:
    """Dynamic shared memory one block may opt in to on the current GPU (the
    simulator: an H100's 227 KB)."""
    if SIMULATOR:
        return 227 * 1024
    from numba import cuda

    dev = cuda.get_current_device()
    if dev.id not in _max_shared:
        try:
            _max_shared[dev.id] = int(dev.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        except AttributeError:  # a driver binding without the attribute: the static limit
            _max_shared[dev.id] = 48 * 1024
    return _max_shared[dev.id]


_max_shared: dict = {}


def describe() -> str:
    """One line naming the device kernels run on."""
    if SIMULATOR:
        return "Numba CUDA simulator (CPU; no GPU found)"
    from numba import cuda

    dev = cuda.get_current_device()
    cc = dev.compute_capability
    name = dev.name.decode() if isinstance(dev.name, bytes) else dev.name
    return f"{name} (sm_{cc[0]}{cc[1]})"


def median_gpu_ms(fn, warmup: int = 3, repeats: int = 20, calls: int = 1, before=None) -> float:
    """Median milliseconds of ``fn`` on CuPy's current stream, timed with CUDA events
    after ``warmup`` untimed calls (the self-check and perf/ share this). With
    ``calls`` > 1 each sample times that many calls issued back to back, divided by
    ``calls``: the host work of one call then overlaps the kernels of the one before,
    as in a training step, instead of the GPU waiting for it after every sync.
    ``before`` (untimed) runs ahead of each sample's first event (queued_gpu_ms's spin)."""
    import cupy
    import numpy as np

    for _ in range(warmup):
        fn()
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        start.record()
        for _ in range(calls):
            fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) / calls)
    return float(np.median(times))


_SPIN_SOURCE = r"""
extern "C" __global__ void nbflash_spin(long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) { }
}
"""


def queued_gpu_ms(fn, warmup: int = 3, repeats: int = 5, calls: int = 10, spin_ms: float = 30.0) -> float:
    """Median GPU milliseconds per call of ``fn``, with no host time in them: a spin
    kernel holds CuPy's current stream for ``spin_ms`` while ``calls`` calls queue behind
    it, so the CUDA events around them time the calls' kernels back to back. For calls
    whose host work would otherwise enter median_gpu_ms (the variants' unmemoized path,
    ~0.3 ms); ``fn`` must not synchronize, and its ``calls`` calls' host work must fit in
    the spin."""
    import cupy

    kernel = cupy.RawKernel(_SPIN_SOURCE, "nbflash_spin")
    cycles = cupy.int64(int(spin_ms * cupy.cuda.Device().attributes["ClockRate"]))
    return median_gpu_ms(fn, warmup, repeats, calls, before=lambda: kernel((1,), (1,), (cycles,)))
