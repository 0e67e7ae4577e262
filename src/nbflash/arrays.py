"""Intake of user arrays and the dtype table.

Every input becomes a NumPy array (host) or a CuPy array (device) that views the
caller's memory: CuPy arrays pass through, objects exposing
``__cuda_array_interface__`` or ``__dlpack__`` (torch, JAX, ...) are wrapped without
a copy and without importing their library. bfloat16 is ml_dtypes.bfloat16, stored
as 16 bits and handed to kernels as a uint16 view.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from . import device

FLOAT16 = np.dtype(np.float16)
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
FLOAT32 = np.dtype(np.float32)
FLOAT64 = np.dtype(np.float64)

SHORT_NAMES = {FLOAT16: "fp16", BFLOAT16: "bf16", FLOAT32: "fp32", FLOAT64: "fp64"}
"""The supported dtypes and the short names used in specialization keys."""

_DLPACK_CPU = 1
_DLPACK_CUDA_DEVICES = (2, 3, 13)  # CUDA, CUDA host-pinned, CUDA managed


class Operand(NamedTuple):
    """One user array after intake."""

    array: Any  # numpy.ndarray or cupy.ndarray, a view of the caller's memory
    on_device: bool


def intake(x: Any, name: str) -> Operand:
    """View ``x`` as a NumPy or CuPy array without copying.

    Raises TypeError naming ``name`` when ``x`` is not an array nbflash can read.
    """
    if isinstance(x, np.ndarray):
        return Operand(x, False)
    cupy = device.cupy_or_none()
    if cupy is not None and isinstance(x, cupy.ndarray):
        return Operand(x, True)
    if hasattr(x, "__cuda_array_interface__"):
        if cupy is None:
            raise TypeError(
                f"{name}: got a device array ({type(x).__name__}) but no GPU is in use "
                f"({device.describe()}); pass a NumPy array instead"
            )
        try:
            return Operand(cupy.asarray(x), True)
        except Exception:  # e.g. a typestr CuPy does not know; DLPack may still carry it
            if not hasattr(x, "__dlpack__"):
                raise
    if hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__"):
        kind, _ = x.__dlpack_device__()
        if int(kind) == _DLPACK_CPU:
            return Operand(np.from_dlpack(x), False)
        if int(kind) in _DLPACK_CUDA_DEVICES:
            if cupy is None:
                raise TypeError(
                    f"{name}: got a DLPack CUDA array ({type(x).__name__}) but no GPU is in "
                    f"use ({device.describe()})"
                )
            return Operand(cupy.from_dlpack(x), True)
        raise TypeError(f"{name}: DLPack device type {int(kind)} is not supported (CPU or CUDA only)")
    raise TypeError(
        f"{name}: expected a CuPy or NumPy array, or an object with __cuda_array_interface__ "
        f"or __dlpack__; got {type(x).__name__}"
    )


def short_name(dtype: np.dtype) -> str:
    return SHORT_NAMES[np.dtype(dtype)]


def kernel_view(a, raw_bits: bool = False):
    """The array as kernels see it: bfloat16 reinterpreted as uint16 (Numba has no
    bfloat16), and with ``raw_bits`` float16 too (tensor-core kernels move bits)."""
    if a.dtype == BFLOAT16 or (raw_bits and a.dtype == FLOAT16):
        return a.view(np.uint16)
    return a


def device_id(a) -> int:
    """CUDA device ordinal of a CuPy array."""
    return a.device.id


def byte_range(a) -> tuple[int, int]:
    """[first, last] byte addresses an array can touch (for overlap checks)."""
    if a.size == 0:
        return (0, -1)
    lo = hi = a.data.ptr if not isinstance(a, np.ndarray) else a.__array_interface__["data"][0]
    for s, n in zip(a.strides, a.shape):
        if s < 0:
            lo += s * (n - 1)
        else:
            hi += s * (n - 1)
    return (lo, hi + a.itemsize - 1)


def overlaps(a, b) -> bool:
    return ranges_overlap(byte_range(a), byte_range(b))


def ranges_overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether two byte_range results share a byte."""
    return a[0] <= b[1] and b[0] <= a[1]
