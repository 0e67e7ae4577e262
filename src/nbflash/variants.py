"""The attention variants (sliding window, softcap, ALiBi, bias, mask, dropout):
validation of their arguments and the run-time values every kernel receives.

Which variants are on is compile-time (spec.Variant, part of a spec's key); their
values are kernel arguments, appended in the order of KERNEL_ARGS to every forward
and backward kernel's arguments, so one compiled kernel serves every window size,
softcap, slope, bias, mask and seed.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from . import arrays, dropout
from .spec import PLAIN, Variant

UNBOUNDED = 1 << 30
"""A window side given as -1 reaches this far: past any sequence a kernel indexes."""

KERNEL_ARGS = (
    "window_left", "window_right", "softcap", "alibi", "bias", "mask",
    "keep_threshold", "keep_scale", "seed_lo", "seed_hi",
)
"""The variant arguments of every forward/backward kernel, after its own arguments:
window_left, window_right (int32; key j is visible to query i when
i + seqlen_k - seqlen_q - window_left <= j <= i + seqlen_k - seqlen_q + window_right,
causal already folded into window_right, UNBOUNDED for no bound); softcap (float32);
alibi (float32 (batch, heads_q), a stride-0 batch axis when broadcast); bias (the
bias's dtype, 16-bit as uint16 bits, (batch, heads_q, seqlen_q, seqlen_k) with
stride-0 broadcast axes); mask (uint8, same shape; nonzero attends); keep_threshold
(uint32: dropout keeps an element whose Philox word is >= it, nbflash.dropout);
keep_scale (float32, 1 / (1 - dropout_p)); seed_lo, seed_hi (uint32). Arguments of
variants that are off are small dummies the kernel never reads."""


@dataclass(frozen=True)
class VariantArgs:
    """Validated variant arguments of one call."""

    variant: Variant
    window: tuple[int, int] | None  # as given (None when off)
    window_left: int
    window_right: int
    softcap: float
    alibi: Any  # (batch, heads_q) float32 view, or None
    bias: Any  # (batch, heads_q, seqlen_q, seqlen_k) view, or None
    bias_shape: tuple | None  # the bias's shape as given (dbias comes back in it)
    mask: Any  # (batch, heads_q, seqlen_q, seqlen_k) uint8 view, or None
    dropout_p: float
    seed: int | None


NO_VARIANTS = VariantArgs(PLAIN, None, UNBOUNDED, UNBOUNDED, 0.0, None, None, None, None, 0.0, None)


def check_variants(problem, q, *, causal: bool, window=None, softcap=0.0, alibi_slopes=None, bias=None,
                   mask=None, dropout_p=0.0, seed=None) -> VariantArgs:
    """Check the variant arguments of a call whose q, k, v gave ``problem``
    (api._Problem); ``q`` is q's intake array (for the device checks). Raises
    TypeError/ValueError naming the argument; touches nothing."""
    win = _check_window(window)
    cap = _check_softcap(softcap)
    p, seed_ok = _check_dropout(dropout_p, seed)
    target = (problem.batch, problem.heads_q, problem.seqlen_q, problem.seqlen_k)
    alibi = _check_alibi(alibi_slopes, problem, q)
    bias_view = _check_scores_array(bias, "bias", problem, q, target, bool_dtype=False)
    mask_view = _check_scores_array(mask, "mask", problem, q, target, bool_dtype=True)
    if mask_view is not None:
        mask_view = mask_view.view(np.uint8)
    left = right = UNBOUNDED
    if win is not None:
        left = win[0] if win[0] >= 0 else UNBOUNDED
        right = win[1] if win[1] >= 0 else UNBOUNDED
    if causal:
        right = min(right, 0)
    variant = Variant(
        window=win is not None, softcap=cap > 0, alibi=alibi is not None,
        bias="" if bias_view is None else arrays.short_name(bias_view.dtype),
        mask=mask_view is not None, dropout=p > 0,
        bias_staged=stageable(bias_view), mask_staged=stageable(mask_view),
    )
    bias_shape = None if bias is None else tuple(arrays.intake(bias, "bias").array.shape)
    return VariantArgs(variant, win, left, right, cap, alibi, bias_view, bias_shape, mask_view, p, seed_ok)


def _check_window(window):
    if window is None:
        return None
    if isinstance(window, (str, bytes)) or not hasattr(window, "__len__") or len(window) != 2:
        raise TypeError(f"window: expected a pair (left, right) of ints or None; got {window!r}")
    values = []
    for side, x in zip(("left", "right"), window):
        if isinstance(x, bool) or not isinstance(x, numbers.Integral):
            raise TypeError(f"window: {side} must be an int; got {type(x).__name__}")
        if int(x) < -1:
            raise ValueError(f"window: {side} must be >= -1 (-1: unbounded); got {int(x)}")
        values.append(int(x))
    if values == [-1, -1]:
        return None  # unbounded on both sides: plain attention
    return tuple(values)


def _check_softcap(softcap) -> float:
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap: expected a real number >= 0; got {type(softcap).__name__}")
    value = float(softcap)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"softcap: expected a finite number >= 0 (0 disables); got {softcap!r}")
    return value


def _check_dropout(dropout_p, seed):
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p: expected a real number in [0, 1); got {type(dropout_p).__name__}")
    p = float(dropout_p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p: expected a number in [0, 1); got {dropout_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"seed: expected an int; got {type(seed).__name__}")
    if p > 0 and seed is None:
        raise ValueError("seed: required when dropout_p > 0 (the backward needs the same seed)")
    return p, (None if seed is None else int(seed) % 2**64)


def _check_side(op, name, problem, q):
    where = "device" if problem.on_device else "host"
    if op.on_device != problem.on_device:
        raise TypeError(f"{name}: expected a {where} array like q; got a {'device' if op.on_device else 'host'} array")
    if problem.on_device and arrays.device_id(op.array) != arrays.device_id(q):
        raise ValueError(f"{name}: on device {arrays.device_id(op.array)}, q on device {arrays.device_id(q)}")


def _check_alibi(slopes, problem, q):
    if slopes is None:
        return None
    op = arrays.intake(slopes, "alibi_slopes")
    _check_side(op, "alibi_slopes", problem, q)
    a = op.array
    if a.dtype != arrays.FLOAT32:
        raise TypeError(f"alibi_slopes: expected dtype float32; got {a.dtype}")
    shapes = [(problem.heads_q,)] + ([] if problem.squeeze else [(problem.batch, problem.heads_q)])
    if a.shape not in shapes:
        raise ValueError(f"alibi_slopes: expected shape {' or '.join(map(str, shapes))}; got {a.shape}")
    xp = _xp(a)
    return xp.broadcast_to(a, (problem.batch, problem.heads_q))


def _check_scores_array(x, name, problem, q, target, bool_dtype):
    """A bias or mask broadcast (never copied) to (batch, heads_q, seqlen_q, seqlen_k)."""
    if x is None:
        return None
    op = arrays.intake(x, name)
    _check_side(op, name, problem, q)
    a = op.array
    if bool_dtype and a.dtype != np.bool_:
        raise TypeError(f"{name}: expected dtype bool (True attends); got {a.dtype}")
    if not bool_dtype and a.dtype not in arrays.SHORT_NAMES:
        raise TypeError(f"{name}: expected dtype float16, bfloat16, float32 or float64; got {a.dtype}")
    user_target = target[1:] if problem.squeeze else target
    if a.ndim > len(user_target) or any(n not in (1, t) for n, t in zip(a.shape[::-1], user_target[::-1])):
        raise ValueError(f"{name}: shape {a.shape} does not broadcast to {user_target}")
    view = _xp(a).broadcast_to(a, user_target)
    return view[None] if problem.squeeze else view


def _xp(a):
    if isinstance(a, np.ndarray):
        return np
    import cupy

    return cupy


def kernel_values(args: VariantArgs, dummy) -> list:
    """The KERNEL_ARGS values of a launch, arrays as kernel views (not yet wrapped for
    Numba); ``dummy(shape, dtype)`` gives a never-read placeholder array."""
    bias = args.bias if args.bias is not None else dummy((1, 1, 1, 1), np.float32)
    seed_lo, seed_hi = dropout.split_seed(args.seed or 0)
    return [
        np.int32(args.window_left), np.int32(args.window_right), np.float32(args.softcap),
        args.alibi if args.alibi is not None else dummy((1, 1), np.float32),
        arrays.kernel_view(bias),  # float16 stays float16; bfloat16 as uint16 bits
        args.mask if args.mask is not None else dummy((1, 1, 1, 1), np.uint8),
        np.uint32(dropout.keep_threshold(args.dropout_p)), np.float32(1.0 / (1.0 - args.dropout_p)),
        np.uint32(seed_lo), np.uint32(seed_hi),
    ]


STAGED_ITEMSIZES = (1, 2, 4)
"""Element sizes whose bias / mask tiles the tensor-core forward stages through shared
memory (kernels/bias_tile.py); a float64 bias is read element by element."""


def stageable(view) -> bool:
    """cp.async can copy 16-byte chunks of this (batch, heads_q, seqlen_q, seqlen_k)
    view (None: no): an element size in STAGED_ITEMSIZES, the key axis contiguous, and
    the base and the other axes' strides (broadcast stride 0 included) multiples of
    16 bytes."""
    if view is None or view.itemsize not in STAGED_ITEMSIZES:
        return False
    if view.shape[3] > 1 and view.strides[3] != view.itemsize:
        return False
    base = view.__array_interface__["data"][0] if isinstance(view, np.ndarray) else view.data.ptr
    return base % 16 == 0 and all(st % 16 == 0 for st, n in zip(view.strides[:3], view.shape[:3]) if n > 1)


def unstaged(variant: Variant) -> Variant:
    """``variant`` with the per-element bias / mask reads (kernels that do not stage)."""
    if not (variant.bias_staged or variant.mask_staged):
        return variant
    return replace(variant, bias_staged=False, mask_staged=False)


def fit_staging(spec, limit: int, parts=None):
    """A tensor-core ``spec`` whose staged bias / mask tiles fit ``limit`` bytes of
    shared memory per block: staging is dropped (the bias first, its tile is the
    larger) until they do. ``parts(spec)``: the specs whose kernels launch (a
    backward's parts; default the spec itself), each of which must fit."""
    from . import launch

    for drop in ({}, {"bias_staged": False}, {"bias_staged": False, "mask_staged": False}):
        fitted = replace(spec, variant=replace(spec.variant, **drop))
        if all(launch.shared_bytes(part) <= limit for part in (parts(fitted) if parts else (fitted,))):
            return fitted
    return fitted
