"""Compiled-kernel cache (memory and disk) and the low-overhead kernel launcher.

A kernel is built once per spec (nbflash.spec). On a GPU, the first launch of a
kernel for an argument-type signature compiles it through Numba (or loads its cubin
from the disk cache) and keeps the driver handle; every later launch packs the
arguments straight into a parameter buffer in Numba's kernel ABI and makes one
cuLaunchKernel call on the caller's stream, with no synchronization and none of
Numba's per-call typing. The simulator keeps Numba's own launch path.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time

from numba import cuda

from . import device

log = logging.getLogger("nbflash")

_kernels: dict[str, object] = {}
_spec_keys: dict[int, str] = {}  # id(kernel) -> spec key, for the disk cache
_lock = threading.Lock()

compile_seconds: dict[str, float] = {}
"""Seconds spent making each specialization launchable, keyed by
"<spec key> <argument signature>": a Numba compile, or a disk-cache load (the key then
ends in " [disk]")."""


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
                _spec_keys[id(kernel)] = spec.key
                _kernels[spec.key] = kernel
    return kernel


def _kernel_module(spec):
    return importlib.import_module(f".kernels.{spec.module}", __package__)


def shared_bytes(spec) -> int:
    """Dynamic shared memory a spec's kernel is launched with (0 when static)."""
    size = getattr(_kernel_module(spec), "shared_bytes", None)
    return size(spec) if size is not None else 0


# ---------------------------------------------------------------------------
# Kernel arguments
# ---------------------------------------------------------------------------


class DeviceArg:
    """A device array handed to a kernel: pointer, shape, byte strides, dtype.

    What :func:`numba_view` returns on a GPU. It costs a few attribute reads, where
    a Numba device array costs tens of microseconds; it still exposes
    ``__cuda_array_interface__`` (without a stream, so Numba never synchronizes), so
    Numba's own launch accepts it too.
    """

    __slots__ = ("ptr", "shape", "strides", "dtype", "size", "device", "owner")

    def __init__(self, ptr, shape, strides, dtype, size, device_id, owner):
        self.ptr = ptr
        self.shape = shape
        self.strides = strides
        self.dtype = dtype
        self.size = size
        self.device = device_id
        self.owner = owner  # keeps the memory alive while the argument is

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def __cuda_array_interface__(self):
        return {
            "shape": self.shape,
            "strides": self.strides,
            "typestr": self.dtype.str,
            "data": (self.ptr, False),
            "version": 3,
        }

    def numba(self):
        """The equivalent Numba device array (for Numba's launch path)."""
        return cuda.from_cuda_array_interface(self.__cuda_array_interface__, owner=self.owner, sync=False)


def numba_view(a):
    """A kernel argument over a device array's memory (no copy, no sync).

    On a GPU: a :class:`DeviceArg` over a CuPy array (or any object exposing
    ``__cuda_array_interface__``). On the simulator: a fake device array over the
    NumPy array itself, so strided views are read and written in place.
    """
    if device.SIMULATOR:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        return FakeCUDAArray(a)
    if isinstance(a, DeviceArg):
        return a
    mem = getattr(a, "data", None)
    if mem is not None and hasattr(mem, "device_id"):  # CuPy
        return DeviceArg(mem.ptr, a.shape, a.strides, a.dtype, a.size, mem.device_id, a)
    import numpy as np

    iface = a.__cuda_array_interface__
    dtype = np.dtype(iface["typestr"])
    shape = tuple(iface["shape"])
    strides = iface.get("strides")
    if strides is None:
        strides, step = [], dtype.itemsize
        for n in reversed(shape):
            strides.insert(0, step)
            step *= n
    size = 1
    for n in shape:
        size *= n
    return DeviceArg(iface["data"][0] or 0, shape, tuple(strides), dtype, size, -1, a)


_layouts: dict[tuple, str] = {}


def array_layout(shape, strides, itemsize) -> str:
    """Numba's layout letter for a device array ("C", "F" or "A"), by the rules of
    numba.cuda's DeviceNDArray typing (broadcast arrays are "A")."""
    key = (shape, strides, itemsize)
    layout = _layouts.get(key)
    if layout is None:
        layout = _compute_layout(shape, strides, itemsize)
        if len(_layouts) > 4096:
            _layouts.clear()
        _layouts[key] = layout
    return layout


def _compute_layout(shape, strides, itemsize) -> str:
    size = 1
    for n in shape:
        size *= n
    if not shape or size == 0:
        return "C"
    if 0 in strides:
        return "A"
    step = itemsize
    c_contig = True
    for n, s in zip(reversed(shape), reversed(strides)):
        if n != 1:
            if s != step:
                c_contig = False
                break
            step *= n
    if c_contig:
        return "C"
    step = itemsize
    for n, s in zip(shape, strides):
        if n != 1:
            if s != step:
                return "A"
            step *= n
    return "F"


# Scalar argument types of the fast path: Python / NumPy type -> (Numba type name,
# struct code of the value in its 8-byte parameter slot). Numba types Python ints as
# int64, floats as float64; float16 travels as its 16 bits.
_SCALAR_CODES = {
    bool: ("boolean", "?"),
    int: ("int64", "q"),
    float: ("float64", "d"),
}


def _numpy_scalar_codes():
    import numpy as np

    table = {
        np.bool_: ("boolean", "?"),
        np.int8: ("int8", "b"), np.uint8: ("uint8", "B"),
        np.int16: ("int16", "h"), np.uint16: ("uint16", "H"),
        np.int32: ("int32", "i"), np.uint32: ("uint32", "I"),
        np.int64: ("int64", "q"), np.uint64: ("uint64", "Q"),
        np.float16: ("float16", "e"), np.float32: ("float32", "f"), np.float64: ("float64", "d"),
    }
    _SCALAR_CODES.update(table)


_numpy_scalar_codes()


def signature_of(args):
    """The argument-type signature of ``args`` (hashable), or None when an argument
    is of a kind the fast launcher does not pack (Numba's path then handles it).

    Arrays give (dtype, ndim, layout); scalars their Python / NumPy type."""
    sig = []
    for a in args:
        if type(a) is DeviceArg:
            sig.append((a.dtype, len(a.shape), array_layout(a.shape, a.strides, a.dtype.itemsize)))
        elif type(a) in _SCALAR_CODES:
            sig.append(type(a))
        else:
            return None
    return tuple(sig)


def signature_text(sig) -> str:
    """A readable form of a signature, e.g. "u2[4A],u2[4A],f4,i8"."""
    parts = []
    for item in sig:
        if isinstance(item, tuple):
            dtype, ndim, layout = item
            parts.append(f"{dtype.kind}{dtype.itemsize}[{ndim}{layout}]")
        else:
            parts.append(_SCALAR_CODES[item][0])
    return ",".join(parts)


def numba_types(sig):
    """The Numba argument types a signature compiles to."""
    from numba.cuda import types
    from numba.cuda.np import numpy_support

    out = []
    for item in sig:
        if isinstance(item, tuple):
            dtype, ndim, layout = item
            out.append(types.Array(numpy_support.from_dtype(dtype), ndim, layout))
        else:
            out.append(getattr(types, _SCALAR_CODES[item][0]))
    return tuple(out)


# ---------------------------------------------------------------------------
# Parameter layout: Numba's kernel ABI, packed as the kernel's parameter block
# ---------------------------------------------------------------------------

_SLOT = 8
_PARAM_BYTES = {"?": 1, "b": 1, "B": 1, "h": 2, "H": 2, "e": 2, "i": 4, "I": 4, "f": 4, "q": 8, "Q": 8, "d": 8}
# cuLaunchKernel's ``extra``: the whole parameter block as one buffer
_CU_LAUNCH_PARAM_END, _CU_LAUNCH_PARAM_BUFFER_POINTER, _CU_LAUNCH_PARAM_BUFFER_SIZE = 0, 1, 2


class ParamLayout:
    """How one signature's arguments become kernel parameters.

    Numba flattens every array argument into meminfo, parent, nitems, itemsize,
    data, shape[ndim], strides[ndim] (each a 64-bit parameter; meminfo and parent are
    null on a launch) and passes each scalar as its own C type; the kernel's PTX
    entry declares one parameter per flattened member. The parameters are packed as
    the kernel's parameter block (each at its natural alignment: ``param_offsets``,
    ``size`` bytes in all, checked against the driver's own offsets where it reports
    them) and handed to cuLaunchKernel whole, through ``extra``
    (CU_LAUNCH_PARAM_BUFFER_POINTER): with ~120 parameters that took 0.3-1.1 us less
    host time per launch on H100 hosts than a void* per parameter (perf/probe_launch_params.py).
    ``pack(buffer, args)`` fills the block in one struct call.
    """

    def __init__(self, sig):
        self.sig = sig
        fmt = ["<"]
        sizes, offsets = [], []  # bytes and offset of each kernel parameter, in order
        data_slots = []  # 8-byte word index of each array argument's data pointer
        exprs = []
        end = 0

        def place(nbytes):
            nonlocal end
            offset = -(-end // nbytes) * nbytes
            if offset > end:
                fmt.append(f"{offset - end}x")
            sizes.append(nbytes)
            offsets.append(offset)
            end = offset + nbytes
            return offset

        for i, item in enumerate(sig):
            if isinstance(item, tuple):
                dtype, ndim, _ = item
                first = place(_SLOT)
                for _ in range(4 + 2 * ndim):
                    place(_SLOT)
                fmt.append(f"16xqqQ{ndim}q{ndim}q")  # meminfo, parent: zero padding
                exprs.append(f"a{i}.size, {dtype.itemsize}, a{i}.ptr, *a{i}.shape, *a{i}.strides")
                data_slots.append(first // _SLOT + 4)
            else:
                code = _SCALAR_CODES[item][1]
                place(_PARAM_BYTES[code])
                fmt.append(code)
                exprs.append(f"a{i}")
        self.format = "".join(fmt)
        self.param_sizes = tuple(sizes)
        self.param_offsets = tuple(offsets)
        self.size = end
        self.data_slots = tuple(data_slots)
        self.words = max(-(-end // _SLOT), 1)
        import struct

        pack_into = struct.Struct(self.format).pack_into
        names = ", ".join(f"a{i}" for i in range(len(sig)))
        unpack = f"    {names}{',' if len(sig) == 1 else ''} = args\n" if sig else ""
        source = (
            "def pack(buffer, args):\n" + unpack
            + f"    pack_into(buffer, 0, {', '.join(exprs)})\n"
        )
        namespace = {"pack_into": pack_into}
        exec(source, namespace)  # noqa: S102 - generated from the signature above only
        self.pack = namespace["pack"]

    def new_buffer(self):
        """A zeroed parameter block (8-byte words) and the cuLaunchKernel ``extra``
        array that hands it over (buffer pointer, size, end; the size_t it points to
        lives in its last word); the array is None for a kernel without parameters."""
        import ctypes

        buffer = (ctypes.c_uint64 * self.words)()
        if not self.size:
            return buffer, None
        extra = (ctypes.c_uint64 * 6)()
        extra[:] = [_CU_LAUNCH_PARAM_BUFFER_POINTER, ctypes.addressof(buffer), _CU_LAUNCH_PARAM_BUFFER_SIZE,
                    ctypes.addressof(extra) + 5 * 8, _CU_LAUNCH_PARAM_END, self.size]
        return buffer, extra

    def block(self, buffer) -> bytes:
        """The parameter block's bytes as packed (what the kernel receives)."""
        return bytes(buffer)[: self.size]


def extra_address(extra) -> int:
    """The address cuLaunchKernel's ``extra`` takes (0: no parameters)."""
    import ctypes

    return ctypes.addressof(extra) if extra is not None else 0


# ---------------------------------------------------------------------------
# The CUDA driver, called directly
# ---------------------------------------------------------------------------

_extension = None


def _fastlaunch_module():
    """nbflash._fastlaunch where pip built it (it is optional: a C compiler at install),
    else None; imported once."""
    global _extension
    if _extension is None:
        try:
            from . import _fastlaunch
        except ImportError:
            _extension = False
        else:
            _extension = _fastlaunch
    return _extension or None


def fast_launch():
    """The C extension nbflash._fastlaunch where it was built and libcuda.so.1 opens,
    else None."""
    module = _fastlaunch_module()
    return module if module is not None and module.driver_available() else None


def fast_run():
    """nbflash._fastlaunch.run (the remembered-call hot path in C; it launches through
    the entries' own go, so it needs no libcuda) where the extension was built and
    $NBFLASH_HOT_PATH is not "python", else None."""
    import os

    module = _fastlaunch_module()
    if module is None or os.environ.get("NBFLASH_HOT_PATH", "c") == "python":
        return None
    return module.run


def describe_host_path() -> str:
    """One line on how remembered calls (the memo, plans) reach the driver here, for
    ``python -m nbflash``."""
    from . import plans

    if device.SIMULATOR:
        return "Numba's CUDA simulator (no driver launches)"
    hot = "C" if plans._hot_run is not None else "Python"
    if _fastlaunch_module() is None:
        return "Python (nbflash._fastlaunch was not built: no C compiler at install)"
    driver = _get_driver()
    launch_kind = "C PreparedLaunch" if driver.prepared is not None else f"{driver.kind} launchKernel"
    return f"{hot} key and lookup, {launch_kind} (NBFLASH_HOT_PATH, NBFLASH_LAUNCH_DRIVER)"


_CUDA_ERROR_INVALID_CONTEXT = 201


class _Driver:
    """cuLaunchKernel, called with plain ints: ``launch_kernel(handle, gx, gy, gz, bx, by,
    bz, shared, stream, extra)`` (extra: the address of the ``extra`` array that hands
    over the packed parameter block, ParamLayout.new_buffer; kernelParams is NULL)
    returns the CUresult.

    ``kind`` "cupy": CuPy's Cython binding (cupy_backends.cuda.api.driver.launchKernel,
    typed C arguments: about 0.1 us of Python per call, against about 0.5 us for a
    ctypes foreign call of 11 arguments, both timed with the driver stubbed; see
    perf/stub_host_path.py). It raises CUDADriverError instead of returning the code:
    ``raw`` and ``error`` let generated launch code call it bare and read the code from
    the exception. ``kind`` "ctypes": libcuda's symbol through ctypes, without argtypes,
    pointer arguments as cached ctypes.c_void_p (the fallback without CuPy).
    ``kind`` "c" (the default where nbflash._fastlaunch was built and libcuda opens):
    launches through CuPy's binding as "cupy" (or ctypes without CuPy), and the prepared
    launches of :meth:`Bound.fixed` (plans, memoized calls) are the C extension's
    ``PreparedLaunch`` (``prepared``): the pointer writes and the driver call without
    the interpreter (perf/bench_overhead.py). $NBFLASH_LAUNCH_DRIVER ("c", "cupy" or
    "ctypes") picks one."""

    def __init__(self, kind=None):
        import os

        kind = kind or os.environ.get("NBFLASH_LAUNCH_DRIVER") or ("c" if fast_launch() is not None else "cupy")
        self.raw = self.error = None
        self.prepared = None  # the C PreparedLaunch type, for kind "c"
        if kind == "c":
            module = fast_launch()
            if module is None:
                raise ValueError("NBFLASH_LAUNCH_DRIVER=c: nbflash._fastlaunch is not built or libcuda.so.1 "
                                 "does not open; reinstall nbflash with a C compiler, or pick 'cupy'")
            self.prepared = module.PreparedLaunch
        elif kind not in ("cupy", "ctypes"):
            raise ValueError(f"NBFLASH_LAUNCH_DRIVER: expected 'c', 'cupy' or 'ctypes'; got {kind!r}")
        self.launch_kernel = None
        if kind in ("cupy", "c"):
            try:
                from cupy_backends.cuda.api.driver import CUDADriverError, launchKernel
            except Exception:  # no CuPy: ctypes
                kind = "ctypes" if kind == "cupy" else kind
            else:
                self.raw, self.error = launchKernel, CUDADriverError
                self.launch_kernel = self._cupy_launch
        if self.launch_kernel is None:
            import ctypes

            fn = ctypes.CDLL("libcuda.so.1").cuLaunchKernel
            fn.restype = ctypes.c_int
            self.ctypes_fn = fn
            self.launch_kernel = self._ctypes_launch
        self.kind = kind

    def _cupy_launch(self, handle, gx, gy, gz, bx, by, bz, shared, stream, extra):
        try:
            self.raw(handle, gx, gy, gz, bx, by, bz, shared, stream, 0, extra)
        except self.error as error:
            return error.status
        return 0

    def _ctypes_launch(self, handle, gx, gy, gz, bx, by, bz, shared, stream, extra):
        arg = _void_p
        return self.ctypes_fn(arg(handle), gx, gy, gz, bx, by, bz, shared, arg(stream), None, arg(extra))


_void_ps: dict[int, object] = {}


def _void_p(value: int):
    """A ctypes.c_void_p per address (kernel handles, streams, parameter arrays: few and
    long-lived), kept, so a ctypes launch allocates none."""
    arg = _void_ps.get(value)
    if arg is None:
        import ctypes

        if len(_void_ps) > 1024:
            _void_ps.clear()
        arg = _void_ps[value] = ctypes.c_void_p(value)
    return arg


_driver = None
_driver_lock = threading.Lock()


def _get_driver():
    global _driver
    if _driver is None:
        with _driver_lock:
            if _driver is None:
                _driver = _Driver()
    return _driver


class LaunchError(RuntimeError):
    """cuLaunchKernel returned an error (nothing was launched)."""


def _make_context_current(device_id):
    """Bind the device's primary context (the one CuPy and Numba use) to this thread;
    launches on the legacy default stream take the thread's current context."""
    from cuda.bindings import driver

    if device_id < 0:
        import cupy

        device_id = cupy.cuda.runtime.getDevice()
    err, ctx = driver.cuDevicePrimaryCtxRetain(device_id)
    if err == driver.CUresult.CUDA_SUCCESS:
        driver.cuCtxSetCurrent(ctx)


_STATIC_SHARED_LIMIT = 48 * 1024


class Launcher:
    """A kernel ready to launch for one argument-type signature on one device: the
    driver handle and the parameter layout. Thread safe."""

    def __init__(self, handle: int, layout: ParamLayout, device_id: int, name: str, driver=None,
                 handle_kind: str = "function"):
        self.handle = handle
        self.handle_kind = handle_kind  # "function": a CUfunction; "kernel": a CUkernel (library-loaded)
        self.layout = layout
        self.device = device_id
        self.name = name
        self._buffer, self._extra = layout.new_buffer()
        self._extra_addr = extra_address(self._extra)
        self._lock = threading.Lock()
        self._shared_allowed = _STATIC_SHARED_LIMIT
        self._driver = driver or _get_driver()  # a given _Driver: benchmarks comparing them
        self._launch = self._driver.launch_kernel

    def allow_shared(self, nbytes: int):
        """Opt in to more than 48 KB of dynamic shared memory (once per size)."""
        if nbytes <= self._shared_allowed:
            return
        from cuda.bindings import driver

        attr = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        err = self._set_attribute(attr, nbytes)
        if err != driver.CUresult.CUDA_SUCCESS:
            raise LaunchError(f"{self.name}: could not allow {nbytes} bytes of shared memory: {err}")
        # prefer the largest shared-memory carveout, so that as many CTAs as the
        # shared memory allows are resident (a hint; the driver otherwise may pick a
        # split with more L1 that fits fewer of these CTAs)
        self._set_attribute(driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT, 100)
        self._shared_allowed = nbytes

    def _set_attribute(self, attr, value):
        """cuFuncSetAttribute on a CUfunction handle, cuKernelSetAttribute on a CUkernel."""
        from cuda.bindings import driver

        if self.handle_kind == "kernel":
            dev = self.device if self.device >= 0 else 0
            (err,) = driver.cuKernelSetAttribute(attr, value, driver.CUkernel(self.handle), dev)
        else:
            (err,) = driver.cuFuncSetAttribute(driver.CUfunction(self.handle), attr, value)
        return err

    def __call__(self, grid, block, shared, stream, args, _retried=False):
        """Pack ``args`` (the signature's kinds) and launch; raises LaunchError."""
        if shared > self._shared_allowed:
            self.allow_shared(shared)
        with self._lock:
            self.layout.pack(self._buffer, args)
            rc = self._launch(self.handle, grid[0], grid[1], grid[2], block[0], block[1], block[2],
                              shared, stream, self._extra_addr)
        if rc:
            self._failed(rc, _retried)
            self(grid, block, shared, stream, args, True)

    def bind(self, args):
        """A :class:`Bound` parameter block holding ``args``' values, whose array data
        pointers alone can be replaced per launch."""
        return Bound(self, args)

    def _failed(self, rc, retried):
        """After a failed cuLaunchKernel (nothing launched): a thread with no current
        context gets the device's primary context and one more try; else raise."""
        if rc == _CUDA_ERROR_INVALID_CONTEXT and not retried:
            _make_context_current(self.device)
            return
        raise LaunchError(f"{self.name}: cuLaunchKernel failed with CUresult {rc}")


class Bound:
    """One argument set's parameter block, kept packed: a launch writes only the
    array data pointers (``ptrs``, one per array argument, in order) and calls the
    driver. For callers whose shapes and strides repeat (plans, memoized calls)."""

    __slots__ = ("launcher", "_buffer", "_extra", "_extra_addr", "_slots", "_data_slots", "_lock",
                 "_launch", "_handle")

    def __init__(self, launcher: Launcher, args):
        self.launcher = launcher
        self._buffer, self._extra = launcher.layout.new_buffer()
        self._extra_addr = extra_address(self._extra)
        launcher.layout.pack(self._buffer, args)
        self._slots = memoryview(self._buffer).cast("B").cast("Q")
        self._data_slots = launcher.layout.data_slots
        self._lock = threading.Lock()
        self._launch = launcher._launch
        self._handle = launcher.handle

    def __call__(self, grid, block, shared, stream, ptrs, _retried=False):
        if shared > self.launcher._shared_allowed:
            self.launcher.allow_shared(shared)
        slots = self._slots
        with self._lock:
            for i, p in zip(self._data_slots, ptrs):
                slots[i] = p
            rc = self._launch(self._handle, grid[0], grid[1], grid[2], block[0], block[1], block[2],
                              shared, stream, self._extra_addr)
        if rc:
            self.launcher._failed(rc, _retried)
            self(grid, block, shared, stream, ptrs, True)

    def fixed(self, grid, block, shared, varying=None):
        """A launch function ``go(stream, p0, p1, ...)`` for this block with the launch
        configuration fixed too: one Python frame that writes the array data pointers
        and calls the driver; raises LaunchError (nothing launched). ``go`` takes the
        first ``varying`` array arguments' pointers (default: every array argument's, in
        order); the others keep the pointers packed at :meth:`Launcher.bind` (arrays the
        caller keeps alive, e.g. dummies). Opts in to ``shared`` bytes of shared memory now.
        With driver kind "c", ``go`` is a nbflash._fastlaunch.PreparedLaunch taking the
        same arguments: it copies the block per call (no lock) and calls the driver in C."""
        grid, block = _as_dims(grid), _as_dims(block)
        shared = int(shared)
        self.launcher.allow_shared(shared)
        slots = self._data_slots if varying is None else self._data_slots[:varying]
        names = [f"p{i}" for i in range(len(slots))]
        stores = "".join(f"        slots[{slot}] = {p}\n" for slot, p in zip(slots, names))
        params = "".join(f", {p}" for p in names)
        config = f"{grid[0]}, {grid[1]}, {grid[2]}, {block[0]}, {block[1]}, {block[2]}, {shared}"
        driver = self.launcher._driver
        fixed_ptrs = tuple(self._slots[slot] for slot in self._data_slots[len(slots):])
        prepared = getattr(driver, "prepared", None)
        if prepared is not None:  # the C extension: a copy of the block, pointers written, one driver call
            launcher = self.launcher

            def on_failure(rc, stream, ptrs):
                launcher._failed(rc, False)  # raises LaunchError unless a context retry may help
                self(grid, block, shared, stream, ptrs + fixed_ptrs, True)

            return prepared(self._handle, grid, block, shared, launcher.layout.block(self._buffer), slots, on_failure)
        if getattr(driver, "raw", None) is not None:  # raises on failure: nothing to test on success
            call = (
                f"        try:\n"
                f"            driver(handle, {config}, stream, 0, extra)\n"
                f"            return\n"
                f"        except error as failure:\n"
                f"            rc = failure.status\n"
            )
            namespace = {"driver": driver.raw, "error": driver.error}
        elif getattr(driver, "kind", None) == "ctypes":  # the foreign function itself, c_void_p arguments
            call = (
                f"        rc = driver(handle_p, {config}, void_ps_get(stream) or void_p(stream), None, extra_p)\n"
                f"        if not rc:\n"
                f"            return\n"
            )
            namespace = {"driver": driver.ctypes_fn, "handle_p": _void_p(self._handle),
                         "extra_p": _void_p(self._extra_addr), "void_ps_get": _void_ps.get, "void_p": _void_p}
        else:
            call = (
                f"        rc = driver(handle, {config}, stream, extra)\n"
                f"        if not rc:\n"
                f"            return\n"
            )
            namespace = {"driver": self._launch}
        # a retry writes every pointer: the fixed ones as packed now
        all_ptrs = "".join(f"{p}, " for p in names) + "".join(f"{p}, " for p in fixed_ptrs)
        # acquire / release in try-finally: half the cost of a with block (0.07 against
        # 0.15 us, perf/stub_host_path.py), the same release on every way out
        source = (
            f"def go(stream{params}):\n"
            f"    acquire()\n"
            f"    try:\n"
            f"{stores}"
            f"{call}"
            f"    finally:\n"
            f"        release()\n"
            f"    failed(rc, False)\n"
            f"    bound({grid!r}, {block!r}, {shared}, stream, ({all_ptrs}), True)\n"
        )
        namespace.update({
            "acquire": self._lock.acquire, "release": self._lock.release, "slots": self._slots, "handle": self._handle,
            "extra": self._extra_addr, "failed": self.launcher._failed, "bound": self,
        })
        exec(source, namespace)  # noqa: S102 - generated from ints and fixed names only
        return namespace["go"]


# ---------------------------------------------------------------------------
# Making launchers: compile (or load from disk) once per (kernel, signature, device)
# ---------------------------------------------------------------------------

_launchers: dict[tuple, object] = {}
# Every kernel a launcher was made for, kept alive: _launchers (and _spec_keys) are keyed
# by id(kernel), and a freed kernel's id can be reused by a new one, which would then
# launch the old kernel's code (perf/probe_wgmma's per-call kernels did: wrong results
# and illegal addresses on the H100, intermittently).
_held_kernels: dict[int, object] = {}
_prepare_lock = threading.RLock()
_NUMBA = object()  # marker: this signature launches through Numba
_warned: set = set()


def launcher_for(kernel, args, shared=0):
    """The fast :class:`Launcher` for ``kernel`` and these arguments (DeviceArgs and
    scalars), made on first use; None where only Numba's launch can run them."""
    if device.SIMULATOR:
        return None
    sig = signature_of(args)
    if sig is None:
        return None
    dev = next((a.device for a in args if type(a) is DeviceArg), -1)
    key = (id(kernel), sig, dev)
    found = _launchers.get(key)
    if found is None:
        with _prepare_lock:
            found = _launchers.get(key)
            if found is None:
                _held_kernels[id(kernel)] = kernel
                found = _prepare(kernel, sig, dev, args)
                _launchers[key] = found
    return None if found is _NUMBA else found


def _disable(kernel, sig, dev, error):
    """The fast path failed for this signature: log once, use Numba's launch from now on."""
    key = (id(kernel), sig, dev)
    _launchers[key] = _NUMBA
    if key not in _warned:
        _warned.add(key)
        log.warning("nbflash: fast launch unavailable for %s (%s); using Numba's launch: %s",
                    _spec_keys.get(id(kernel), getattr(kernel, "__name__", kernel)),
                    signature_text(sig), error)


def _prepare(kernel, sig, dev, args):
    try:
        layout = ParamLayout(sig)
        _get_driver()
        spec_key = _spec_keys.get(id(kernel))
        cc = _compute_capability(dev)
        cache_key = _disk_key(spec_key, sig, cc) if spec_key else None
        start = time.perf_counter()
        loaded = _disk_load(cache_key, layout) if cache_key else None
        if loaded is not None:
            handle, name = loaded
            label = f"{spec_key} {signature_text(sig)} [disk]"
        else:
            handle, name, cubin, cacheable = _numba_compile(kernel, sig)
            label = f"{spec_key or getattr(kernel, '__name__', 'kernel')} {signature_text(sig)}"
            if cache_key and cacheable:
                _disk_store(cache_key, name, layout, cubin)
        seconds = time.perf_counter() - start
        compile_seconds[label] = seconds
        log.info("nbflash: %s ready in %.3f s", label, seconds)
        _check_params(handle, layout, name)
        # Numba's and the disk cache's handles are both CUkernels (library-loaded):
        # launch through the CUfunction, and the driver skips a per-launch lookup
        function = _function_of(handle, dev)
        if function is not None:
            return Launcher(function, layout, dev, name)
        return Launcher(handle, layout, dev, name, handle_kind="kernel")
    except Exception as error:  # never a wrong result: Numba's launch takes over
        _disable(kernel, sig, dev, error)
        return _NUMBA


def _compute_capability(dev) -> tuple:
    import cupy

    if dev < 0:
        dev = cupy.cuda.runtime.getDevice()
    cc = cupy.cuda.Device(dev).compute_capability  # e.g. "90"
    return (int(cc[:-1]), int(cc[-1]))


def _numba_compile(kernel, sig):
    """Compile through Numba for exactly ``sig``; (handle, entry name, cubin, whether
    the cubin alone is enough to run it)."""
    compiled = kernel.compile(numba_types(sig))
    if compiled.cooperative or getattr(compiled, "launch_config_sensitive", False):
        raise LaunchError("cooperative and launch-configuration-sensitive kernels launch through Numba")
    library = compiled._codelibrary
    cufunc = library.get_cufunc()
    compiled.bind()  # module setup, once
    cacheable = not (library._setup_functions or library._teardown_functions or compiled.debug)
    cubin = library_cubin(library) if cacheable else None
    return int(cufunc.handle), library._entry_name, cubin, cubin is not None


def library_cubin(library):
    """The bytes of a Numba code library's linked cubin for the current device, or
    None (logged) where they cannot be had."""
    try:
        return cubin_bytes(library.get_cubin())
    except TypeError as error:
        log.info("nbflash: %s not cached on disk: %s", getattr(library, "_entry_name", library), error)
        return None


def cubin_bytes(cubin) -> bytes:
    """The bytes of a linked cubin as numba-cuda hands it out: plain bytes from older
    versions, a cuda.core ``ObjectCode`` (whose ``code`` holds the bytes, or a file
    path) from numba-cuda 0.2x on. Raises TypeError for anything else."""
    if isinstance(cubin, (bytes, bytearray, memoryview)):
        return bytes(cubin)
    code = getattr(cubin, "code", None)
    if isinstance(code, (bytes, bytearray, memoryview)):
        return bytes(code)
    if isinstance(code, str):
        import os

        if os.path.isfile(code):
            with open(code, "rb") as f:
                return f.read()
    raise TypeError(f"a cubin of type {type(cubin).__name__} has no bytes to store")


def _check_params(handle, layout, name):
    """Where the driver can tell (CUDA 12.8+), the kernel's parameter sizes and offsets
    must be exactly the ones the layout packs (the block goes over whole, through
    ``extra``)."""
    from cuda.bindings import driver

    # The count comes first and only existing indices are asked for: probing one past the
    # end returns CUDA_ERROR_INVALID_VALUE, which compute-sanitizer reports as an API error.
    try:
        kernel = driver.CUkernel(handle)
        try:
            err, count = driver.cuKernelGetParamCount(kernel)
        except Exception:  # bindings without it
            err = None
        if err != driver.CUresult.CUDA_SUCCESS:  # a driver older than CUDA 12.8: the layout's count
            count = len(layout.param_sizes)
        sizes, offsets = [], []
        for i in range(count):
            err, offset, size = driver.cuKernelGetParamInfo(kernel, i)
            if err != driver.CUresult.CUDA_SUCCESS:
                if i == 0:
                    return  # a driver older than CUDA 12.4: nothing to check against
                break  # fewer parameters than the layout packs: the comparison below fails
            sizes.append(size)
            offsets.append(offset)
    except Exception:  # bindings without these entry points: nothing to check against
        return
    if tuple(sizes) != layout.param_sizes or tuple(offsets) != layout.param_offsets:
        raise LaunchError(f"{name}: kernel parameters (sizes {sizes}, offsets {offsets}) differ from the packed "
                          f"layout ({layout.param_sizes}, {layout.param_offsets})")


# ---------------------------------------------------------------------------
# Disk cache of compiled kernels
# ---------------------------------------------------------------------------

_MAGIC = b"NBFLASH-CUBIN-1\n"
_source_digest_value = None


def cache_dir():
    """Where compiled kernels are kept: $NBFLASH_CACHE_DIR, else $XDG_CACHE_HOME/nbflash,
    else ~/.cache/nbflash. NBFLASH_CACHE_DIR set to an empty string turns the disk
    cache off (None)."""
    import os

    explicit = os.environ.get("NBFLASH_CACHE_DIR")
    if explicit is not None:
        return explicit or None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "nbflash")


def _source_digest() -> str:
    """A digest of the kernel sources: a cached cubin is stale once they change, even
    when the version number does not."""
    global _source_digest_value
    if _source_digest_value is None:
        import hashlib
        import os

        h = hashlib.sha256()
        here = os.path.dirname(__file__)
        kernels = os.path.join(here, "kernels")
        for path in [os.path.join(here, "spec.py")] + sorted(
            os.path.join(kernels, f) for f in os.listdir(kernels) if f.endswith(".py")
        ):
            with open(path, "rb") as f:
                h.update(os.path.basename(path).encode() + b"\0" + f.read())
        _source_digest_value = h.hexdigest()[:16]
    return _source_digest_value


def _disk_key(spec_key, sig, cc) -> str:
    """The text a cache entry is named by: every input that changes the cubin."""
    from importlib.metadata import version

    from . import __version__

    try:
        numba_version = version("numba-cuda")
    except Exception:
        numba_version = "unknown"
    return (
        f"nbflash {__version__} src {_source_digest()} numba-cuda {numba_version} "
        f"sm_{cc[0]}{cc[1]} {spec_key} ({signature_text(sig)})"
    )


def _disk_path(key: str):
    import hashlib
    import os

    where = cache_dir()
    if where is None:
        return None
    return os.path.join(where, hashlib.sha256(key.encode()).hexdigest()[:32] + ".cubin")


def disk_write(key: str, entry: str, param_sizes, cubin: bytes) -> bool:
    """Store one compiled kernel (atomically); False, silently, where the file system
    refuses. ``cubin`` must be bytes (see :func:`cubin_bytes`): anything else is a
    programming error and raises TypeError, never a silent cache miss."""
    import hashlib
    import json
    import os
    import tempfile

    if not isinstance(cubin, (bytes, bytearray, memoryview)):
        raise TypeError(f"cubin: expected bytes; got {type(cubin).__name__} (see launch.cubin_bytes)")
    try:
        path = _disk_path(key)
        if path is None:
            return False
        os.makedirs(os.path.dirname(path), exist_ok=True)
        header = json.dumps({
            "key": key, "entry": entry, "param_sizes": list(param_sizes),
            "sha256": hashlib.sha256(cubin).hexdigest(), "bytes": len(cubin),
        }).encode()
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_MAGIC + header + b"\n" + bytes(cubin))
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return True
    except Exception as error:
        log.info("nbflash: kernel cache not written (%s)", error)
        return False


def disk_read(key: str, param_sizes):
    """(entry name, cubin) stored under ``key``, or None when absent, unreadable,
    corrupt, or stored for another key or parameter layout."""
    import hashlib
    import json

    try:
        path = _disk_path(key)
        if path is None:
            return None
        with open(path, "rb") as f:
            data = f.read()
        if not data.startswith(_MAGIC):
            return None
        end = data.index(b"\n", len(_MAGIC))
        header = json.loads(data[len(_MAGIC):end])
        cubin = data[end + 1:]
        if (
            header.get("key") != key
            or tuple(header.get("param_sizes", ())) != tuple(param_sizes)
            or header.get("bytes") != len(cubin)
            or header.get("sha256") != hashlib.sha256(cubin).hexdigest()
        ):
            return None
        return header["entry"], cubin
    except Exception as error:
        log.debug("nbflash: kernel cache entry not read (%s)", error)
        return None


_libraries = []  # loaded cubins stay loaded for the process


def _disk_load(key, layout):
    found = disk_read(key, layout.param_sizes)
    if found is None:
        return None
    name, cubin = found
    from cuda.bindings import driver

    err, library = driver.cuLibraryLoadData(cubin, [], [], 0, [], [], 0)
    if err != driver.CUresult.CUDA_SUCCESS:
        return None
    err, kernel = driver.cuLibraryGetKernel(library, name.encode())
    if err != driver.CUresult.CUDA_SUCCESS:
        driver.cuLibraryUnload(library)
        return None
    _libraries.append(library)
    return int(kernel), name


def _function_of(kernel_handle, dev):
    """The CUfunction of a loaded CUkernel in the current context, or None. A launch
    through a CUkernel makes the driver look its function up in the current context
    every time (bench_overhead on an H100: 8.6 us per launch against 5.9 us through
    the CUfunction). Only when the current device is the launcher's: a CUfunction
    belongs to one context (the device's primary context, which CuPy and Numba use,
    and which a launch from a thread without a context gets, see Launcher._failed)."""
    try:
        import cupy
        from cuda.bindings import driver

        if dev >= 0 and cupy.cuda.runtime.getDevice() != dev:
            return None
        err, function = driver.cuKernelGetFunction(driver.CUkernel(kernel_handle))
        if err != driver.CUresult.CUDA_SUCCESS:
            return None
        return int(function)
    except Exception as error:  # an older driver or binding: the CUkernel still launches
        log.debug("nbflash: no CUfunction for a loaded kernel (%s)", error)
        return None


def _disk_store(key, name, layout, cubin):
    disk_write(key, name, layout.param_sizes, cubin)


# ---------------------------------------------------------------------------
# Streams and the launch
# ---------------------------------------------------------------------------


def stream_handle(stream=None) -> int:
    """A raw CUstream handle: ``stream`` None means CuPy's current stream; a CuPy
    stream, a Numba stream, an object with ``__cuda_stream__`` or an int handle."""
    if stream is None:
        if device.SIMULATOR:
            return 0
        import cupy

        return cupy.cuda.get_current_stream().ptr
    if isinstance(stream, int):
        return stream
    ptr = getattr(stream, "ptr", None)  # CuPy
    if isinstance(ptr, int):
        return ptr
    proto = getattr(stream, "__cuda_stream__", None)
    if proto is not None:
        return int(proto()[1])
    handle = getattr(stream, "handle", None)  # Numba
    if handle is not None:
        value = getattr(handle, "value", handle)
        return int(value or 0)
    raise TypeError(
        f"stream: expected a CuPy or Numba stream, an object with __cuda_stream__, an int "
        f"handle or None; got {type(stream).__name__}"
    )


class _StreamRef:
    """A raw stream handle speaking the CUDA stream protocol (for Stream.from_external)."""

    __slots__ = ("ptr",)

    def __init__(self, ptr):
        self.ptr = ptr

    def __cuda_stream__(self):
        return (0, self.ptr)


_cupy_streams: dict[tuple, object] = {}


def cupy_stream(ptr: int):
    """A CuPy stream object over the raw handle ``ptr`` on the current device, made
    once per (handle, device) and kept: entering it makes CuPy allocate from the
    pool of that stream. Costs a dict lookup per call, and never builds a stream
    object (or goes through CuPy's deprecation warning for ExternalStream) twice."""
    import cupy

    key = (ptr, cupy.cuda.runtime.getDevice())
    found = _cupy_streams.get(key)
    if found is None:
        if ptr == 0:
            found = cupy.cuda.Stream.null
        else:
            try:
                found = cupy.cuda.Stream.from_external(_StreamRef(ptr))
            except Exception:  # CuPy < 14, or a handle from_external does not take
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    found = cupy.cuda.ExternalStream(ptr)
        if len(_cupy_streams) > 256:
            _cupy_streams.clear()
        _cupy_streams[key] = found
    return found


def current_stream():
    """CuPy's current stream as a Numba stream (0 on the simulator)."""
    return _numba_stream(None)


def _numba_stream(stream):
    if device.SIMULATOR:
        return 0
    ptr = stream_handle(stream)
    return cuda.external_stream(ptr) if ptr else cuda.default_stream()


def _as_dims(dims):
    if isinstance(dims, int):
        return (int(dims), 1, 1)
    dims = tuple(int(d) for d in dims)  # ctypes passes Python ints only
    return dims + (1,) * (3 - len(dims))


def launch(kernel, grid, threads, args, shared_bytes=0, stream=None):
    """Launch ``kernel`` (a Numba kernel from :func:`compiled`) on ``stream`` (default
    CuPy's current stream), without synchronizing.

    ``args`` are :func:`numba_view` arrays and Python / NumPy scalars. On a GPU the
    first launch per argument-type signature compiles (or loads from the disk cache)
    and every later one goes straight to the driver; anything the fast path cannot
    pack, or a failure on first use, goes through Numba's launch instead.
    """
    if not device.SIMULATOR:
        fast = launcher_for(kernel, args, shared_bytes)
        if fast is not None:
            try:
                fast(_as_dims(grid), _as_dims(threads), int(shared_bytes), stream_handle(stream), args)
                return
            except Exception as error:  # raised before anything was launched
                _disable(kernel, signature_of(args), fast.device, error)
        numba_launch(kernel, grid, threads, args, shared_bytes, stream)
        return
    numba_launch(kernel, grid, threads, args, shared_bytes, stream)


def numba_launch(kernel, grid, threads, args, shared_bytes=0, stream=None):
    """Numba's own launch of ``kernel`` (typing every argument on every call)."""
    if device.SIMULATOR:
        # The simulator configures the shared kernel object and swaps its module's
        # globals per launch: one launch at a time.
        with _simulator_lock:
            kernel[grid, threads, 0, shared_bytes](*args)
        return
    args = [a.numba() if type(a) is DeviceArg else a for a in args]
    if shared_bytes > _STATIC_SHARED_LIMIT:
        _allow_dynamic_shared(kernel, args, shared_bytes)
    kernel[grid, threads, _numba_stream(stream), shared_bytes](*args)


_simulator_lock = threading.Lock()


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
