"""attention_varlen: packed variable-length batches, FlashAttention's varlen conventions.

Validation first (nothing launched or written before every check has passed), then
the forward kernels built with spec.varlen: one CTA per (query tile, head, sequence),
reading its sequence's offsets from cu_seqlens, with no padding in memory.
"""

from __future__ import annotations

import dataclasses
import numbers

import numpy as np

from . import api, arrays, device, launch, tuning, variants
from .spec import ForwardSpec

_INT32 = np.dtype(np.int32)


@dataclasses.dataclass(frozen=True)
class _Seqlens:
    """cu_seqlens_q / cu_seqlens_k after validation."""

    q: object  # the arrays as given (NumPy or CuPy)
    k: object
    batch: int
    max_seqlen_q: int  # sizes the grid: the longest query length, or the caller's bound


def _validate_3d(ops):
    shapes = {"q": "(total_q, heads_q, head_dim)", "k": "(total_k, heads_kv, head_dim)",
              "v": "(total_k, heads_kv, head_dim_v)"}
    for (name, expected), op in zip(shapes.items(), ops):
        if op.array.ndim != 3:
            raise ValueError(f"{name}: expected 3 dims {expected}; got shape {op.array.shape}")
    return api._validate(*ops, "bshd")  # 3-D: batch 1, seqlen = total


def _check_max_seqlen(value, name):
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected a non-negative int or None; got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name}: expected a non-negative int; got {value}")
    return int(value)


def _intake_seqlens(x, name, problem, q_array):
    op = arrays.intake(x, name)
    a = op.array
    if a.dtype != _INT32:
        raise TypeError(f"{name}: expected dtype int32; got {a.dtype}")
    if a.ndim != 1:
        raise ValueError(f"{name}: expected 1 dim (batch + 1,); got shape {a.shape}")
    if a.shape[0] == 0:
        raise ValueError(f"{name}: expected batch + 1 >= 1 entries; got an empty array")
    if op.on_device and problem.on_device and arrays.device_id(a) != arrays.device_id(q_array):
        raise ValueError(f"{name}: on device {arrays.device_id(a)}, q on device {arrays.device_id(q_array)}")
    return op


def _check_prefix_sums(values, name, total, total_name):
    """cu_seqlens must be prefix sums of non-negative lengths: 0, ..., total."""
    if values[0] != 0:
        raise ValueError(f"{name}: expected to start at 0; got {int(values[0])}")
    steps = np.diff(values.astype(np.int64))
    if steps.size and steps.min() < 0:
        i = int(np.argmax(steps < 0))
        raise ValueError(
            f"{name}: expected non-decreasing values; got {int(values[i + 1])} after "
            f"{int(values[i])} at index {i + 1}"
        )
    if values[-1] != total:
        raise ValueError(f"{name}: expected to end at {total_name} = {total}; got {int(values[-1])}")
    return int(steps.max()) if steps.size else 0


def _validate_seqlens(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, problem, q_array,
                      check_seqlens=True):
    """Metadata always; the values of cu_seqlens only with ``check_seqlens`` (a host
    copy for device arrays). Unchecked, max_seqlen_q is required (it sizes the grid)."""
    cu_q = _intake_seqlens(cu_seqlens_q, "cu_seqlens_q", problem, q_array)
    cu_k = _intake_seqlens(cu_seqlens_k, "cu_seqlens_k", problem, q_array)
    if cu_q.array.shape != cu_k.array.shape:
        raise ValueError(
            f"cu_seqlens_q, cu_seqlens_k: expected the same length (batch + 1); got "
            f"{cu_q.array.shape[0]} and {cu_k.array.shape[0]}"
        )
    batch = cu_q.array.shape[0] - 1
    if batch > api._MAX_GRID_YZ:
        raise ValueError(f"cu_seqlens_q: batch {batch} exceeds the supported {api._MAX_GRID_YZ}")
    max_seqlen_q = _check_max_seqlen(max_seqlen_q, "max_seqlen_q")
    max_seqlen_k = _check_max_seqlen(max_seqlen_k, "max_seqlen_k")
    if not check_seqlens:  # values never read on the host: the caller's promise (see the docstring)
        if max_seqlen_q is None:
            raise ValueError("max_seqlen_q: required with check_seqlens=False (it sizes the grid; "
                             "the lengths are not read on the host)")
        # no sequence of a clamped span is longer than total_q: a larger bound adds
        # only CTAs that would exit at once
        return _Seqlens(cu_q.array, cu_k.array, batch, min(max_seqlen_q, problem.seqlen_q))
    # host values: free for NumPy arrays, one small device->host copy (a sync) otherwise
    host_q, host_k = (op.array.get() if op.on_device else op.array for op in (cu_q, cu_k))
    longest_q = _check_prefix_sums(host_q, "cu_seqlens_q", problem.seqlen_q, "total_q (q.shape[0])")
    longest_k = _check_prefix_sums(host_k, "cu_seqlens_k", problem.seqlen_k, "total_k (k.shape[0])")
    for name, given, longest in (("max_seqlen_q", max_seqlen_q, longest_q), ("max_seqlen_k", max_seqlen_k, longest_k)):
        if given is not None and given < longest:
            raise ValueError(f"{name}: {given} is smaller than the longest sequence in cu_seqlens ({longest})")
    return _Seqlens(cu_q.array, cu_k.array, batch, longest_q)


def _varlen_spec(problem, causal, return_lse, views, variant=variants.PLAIN) -> ForwardSpec:
    spec = api.choose_forward_spec(problem, causal, return_lse, views, variant,
                                   wgmma=tuning.wgmma_varlen(problem.head_dim, variant))
    # the softmax overlap stays off for packed batches: ptxas serializes that kernel's wgmma
    # (tuning.wgmma_overlap's comment)
    return dataclasses.replace(spec, varlen=True, softmax_overlap=False)


def _check_varlen_variants(problem, q_array, batch, causal, window, softcap, alibi_slopes):
    """The variants varlen supports (window, softcap, ALiBi) checked as for attention;
    ALiBi slopes of shape (heads_q,) or (batch, heads_q), batch = the sequences
    (None: not known yet, only the (heads_q,) form and the dtype are checked)."""
    var = variants.check_variants(problem, q_array, causal=causal, window=window, softcap=softcap)
    if alibi_slopes is None:
        return var
    per_sequence = dataclasses.replace(problem, batch=max(batch or 0, 1), squeeze=batch is None)
    slopes = variants._check_alibi(alibi_slopes, per_sequence, q_array)
    return dataclasses.replace(var, alibi=slopes, variant=dataclasses.replace(var.variant, alibi=True))


def forward_spec_varlen(q, k, v, *, causal=False, return_lse=False, window=None, softcap=0.0,
                        alibi_slopes=None) -> ForwardSpec:
    """The kernel specialization :func:`attention_varlen` would run for q, k, v (same
    shapes and argument meanings); its ``key`` ends in "-varlen" and names it in logs
    and benchmark rows. The choice does not depend on cu_seqlens."""
    ops = [arrays.intake(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v"))]
    problem, views = _validate_3d(ops)
    causal = api._check_flag(causal, "causal")
    slopes = alibi_slopes
    if slopes is not None and getattr(slopes, "ndim", 1) == 2:  # (batch, heads_q): batch unknown here
        slopes = slopes[0]
    var = _check_varlen_variants(problem, ops[0].array, None, causal, window, softcap, slopes)
    return _varlen_spec(problem, causal, api._check_flag(return_lse, "return_lse"), views, var.variant)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None, max_seqlen_k=None,
                     causal=False, scale=None, return_lse=False, out=None, stream=None, window=None,
                     softcap=0.0, alibi_slopes=None, check_seqlens=True):
    """Exact softmax attention over a batch of packed sequences of different lengths.

    Sequence b owns queries cu_seqlens_q[b]:cu_seqlens_q[b + 1] and keys
    cu_seqlens_k[b]:cu_seqlens_k[b + 1]; it attends only to its own keys. No padding:
    the sequences lie one after another along the first axis.

    Args:
        q: (total_q, heads_q, head_dim), float16, bfloat16 (ml_dtypes.bfloat16),
            float32 or float64.
        k: (total_k, heads_kv, head_dim), q's dtype; heads_q a multiple of heads_kv (MQA/GQA).
        v: (total_k, heads_kv, head_dim_v), q's dtype; head_dim, head_dim_v in 1..256.
        cu_seqlens_q: int32 (batch + 1,), prefix sums of the query lengths: starts at 0,
            non-decreasing, ends at total_q. NumPy or device array.
        cu_seqlens_k: int32 (batch + 1,), the same for keys, ending at total_k.
            Sequences may be empty: a sequence without queries produces nothing, one
            without keys gets output 0 and lse -inf.
        max_seqlen_q: int or None, an upper bound on the query lengths. With
            check_seqlens=False it is required and sizes the grid
            (cdiv(min(max_seqlen_q, total_q), block_m) CTAs per head and sequence; a
            loose bound only adds CTAs that exit at once); otherwise it is checked
            against the lengths and the true longest sizes the grid.
        max_seqlen_k: int or None, an upper bound on the key lengths; checked with
            check_seqlens, otherwise unused (the kernels read each sequence's key
            length from cu_seqlens_k).
        causal: hide key j of a sequence from its query i when j > i + seqlen_k - seqlen_q
            (bottom-right aligned per sequence, as FlashAttention >= 2.1).
        scale: factor on q k^T; default 1/sqrt(head_dim). Positive and finite.
        return_lse: also return the log-sum-exp of the scaled, masked scores.
        out: optional (total_q, heads_q, head_dim_v) array of q's dtype to write into.
        stream: where the kernel runs, as for :func:`nbflash.attention` (default CuPy's
            current stream).
        window: None or (left, right), as for :func:`nbflash.attention`, per sequence:
            query i of a sequence sees its keys j with i + seqlen_k - seqlen_q - left <=
            j <= i + seqlen_k - seqlen_q + right (-1: unbounded).
        softcap: float >= 0, as for :func:`nbflash.attention` (0 disables).
        alibi_slopes: None, or float32 (heads_q,) or (batch, heads_q) with batch the
            number of sequences: -slope * |i + seqlen_k - seqlen_q - j| is added to
            the scores, positions counted within each sequence (FlashAttention's).
        check_seqlens: True (default): the values of cu_seqlens (start at 0,
            non-decreasing, end at total) and that max_seqlen_* bound the lengths are
            checked on the host; device cu_seqlens are copied to the host for it, which
            synchronizes with the stream on every call. False (serving loops): the
            values are never read on the host (no copy, no synchronization), as
            FlashAttention trusts them; max_seqlen_q is then required. Their kind,
            dtype, shape and device are still checked.

    What is checked on the host: shapes, dtypes, strides, devices and flags always;
    cu_seqlens' values as check_seqlens says. Unchecked values that are malformed give
    garbage out, never an access outside q, k, v, out and lse: the kernels clamp
    sequence b's span to start = clip(cu[b], 0, total), end = clip(cu[b + 1], start,
    total) (so a decreasing step gives an empty sequence, overlapping spans write the
    same rows in an unspecified order), and query rows of a sequence beyond
    max_seqlen_q are left unwritten.

    Arrays are CuPy arrays, objects exposing ``__cuda_array_interface__`` or
    ``__dlpack__`` (read in place), or NumPy arrays (moved to the GPU and back; on a
    machine without a GPU they run on Numba's CUDA simulator, slowly).

    Returns:
        out: (total_q, heads_q, head_dim_v), q's dtype; CuPy for device inputs, NumPy
            for NumPy inputs.
        lse (with return_lse): float32 (heads_q, total_q), natural log; -inf for rows
            that see no key (FlashAttention's varlen layout).

    Accumulation is float32 for 16-bit and float32 inputs, float64 for float64.
    Computed on the stream, without synchronizing (except the host copy of device
    cu_seqlens that check_seqlens=True makes). A check_seqlens=False call with none of
    window, softcap, alibi_slopes, whose arrays (cu_seqlens included) are CuPy arrays
    and whose shapes, strides, dtypes, devices, max_seqlen_* and flags repeat an
    earlier one's, skips straight to the prepared launch: a few microseconds of host
    time (the serving loop's path; cu_seqlens' values and buffers may change freely).
    """
    memo_key = None
    if (  # trusted lengths, no variant: the memo's fast path (plans.memoized_varlen)
        check_seqlens is False and window is None and alibi_slopes is None and not device.SIMULATOR
        and (softcap is None or (type(softcap) in api._REALS and softcap == 0))
    ):
        memo_key = _plans.varlen_key(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                     scale, return_lse, out)
        if memo_key is not None:
            result = _plans.memoized_varlen(memo_key, q, k, v, cu_seqlens_q, cu_seqlens_k, out, return_lse, stream)
            if result is not None:
                return result
    stream_ptr = launch.stream_handle(stream) if stream is not None else None
    ops = [arrays.intake(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v"))]
    problem, views = _validate_3d(ops)
    causal = api._check_flag(causal, "causal")
    return_lse = api._check_flag(return_lse, "return_lse")
    scale = api._check_scale(scale, problem.head_dim)
    check_seqlens = api._check_flag(check_seqlens, "check_seqlens")
    with api._on_stream(stream_ptr):  # the host copy of cu_seqlens, if any, waits on the stream
        seqlens = _validate_seqlens(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, problem, ops[0].array,
                                    check_seqlens)
    var = _check_varlen_variants(problem, ops[0].array, seqlens.batch, causal, window, softcap, alibi_slopes)
    out_op = api._check_out(out, problem, [op.array for op in ops]) if out is not None else None

    if problem.on_device or device.SIMULATOR:
        out, lse = _forward_varlen(problem, views, out_op, seqlens, causal, scale, return_lse, stream_ptr, var,
                                   memo_key if problem.on_device else None)
    else:  # NumPy inputs with a GPU present: there and back
        given = dict(window=window, softcap=softcap, alibi_slopes=alibi_slopes)
        out, lse = _forward_varlen_via_gpu(ops, out_op, seqlens, causal, scale, return_lse, stream_ptr, given)
    return (out, lse) if return_lse else out


def _forward_varlen_via_gpu(ops, out_op, seqlens, causal, scale, return_lse, stream_ptr, given):
    import cupy

    with api._on_stream(stream_ptr):
        dev_ops = [arrays.Operand(cupy.asarray(op.array), True) for op in ops]
        problem, views = _validate_3d(dev_ops)
        cu_q, cu_k = (cupy.asarray(a) for a in (seqlens.q, seqlens.k))
        dev_seqlens = dataclasses.replace(seqlens, q=cu_q, k=cu_k)
        slopes = given["alibi_slopes"]
        given["alibi_slopes"] = cupy.asarray(slopes) if isinstance(slopes, np.ndarray) else slopes
        var = _check_varlen_variants(problem, dev_ops[0].array, seqlens.batch, causal, **given)
        out_dev, lse_dev = _forward_varlen(problem, views, None, dev_seqlens, causal, scale, return_lse, stream_ptr,
                                           var)
        out_host = out_op[0].array if out_op is not None else np.empty(problem.out_shape(), problem.dtype)
        out_host[...] = out_dev.get()
        return out_host, (lse_dev.get() if lse_dev is not None else None)


def _forward_varlen(problem, views, out_op, seqlens, causal, scale, return_lse, stream_ptr=None,
                    var=variants.NO_VARIANTS, memo_key=None):
    """Allocate what the caller did not give, pick the kernel, launch one CTA per
    (query tile, query head, sequence); with ``memo_key`` (a plain device call with
    trusted lengths), remember the launch for the next call with that key."""
    with api._on_stream(stream_ptr):  # CuPy's pool reuses memory per stream: allocate on ours
        out = out_op[0].array if out_op is not None else api._empty(problem, problem.out_shape(), problem.dtype)
        lse = api._empty(problem, (problem.heads_q, problem.seqlen_q), np.float32) if return_lse else None
    if problem.seqlen_q == 0 or problem.heads_q == 0 or seqlens.batch == 0 or seqlens.max_seqlen_q == 0:
        return out, lse
    spec = _varlen_spec(problem, causal, return_lse, views, var.variant)
    cu_q, cu_k = seqlens.q, seqlens.k
    if problem.on_device and (isinstance(cu_q, np.ndarray) or isinstance(cu_k, np.ndarray)):
        import cupy  # NumPy cu_seqlens with device q: upload

        with api._on_stream(stream_ptr):
            cu_q, cu_k = cupy.asarray(cu_q), cupy.asarray(cu_k)
    lse_view = lse[None] if return_lse else api._dummy(problem, views, api._dummy_lse, (1, 1, 1), np.float32)
    acc_type = np.float64 if problem.dtype == arrays.FLOAT64 else np.float32
    kernel = launch.compiled(spec)
    grid = (-(-seqlens.max_seqlen_q // spec.block_m), problem.heads_q, seqlens.batch)
    args = [launch.numba_view(arrays.kernel_view(a, spec.kernel != "simt")) for a in (*views, out[None])]
    args += [launch.numba_view(lse_view), acc_type(scale), problem.heads_q // problem.heads_kv]
    args += [launch.numba_view(cu_q), launch.numba_view(cu_k)]
    args += api.variant_kernel_args(problem, views, var)
    shared = launch.shared_bytes(spec)
    launch.launch(kernel, grid, spec.threads, args, shared, stream_ptr)
    if memo_key is not None and not var.variant:
        _plans.remember_varlen(memo_key, problem, views, out[None], return_lse, kernel, grid, spec.threads, args,
                               shared)
    return out, lse


def attention_varlen_backward(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None,
                              max_seqlen_k=None, causal=False, scale=None, deterministic=False,
                              dq=None, dk=None, dv=None, window=None, softcap=0.0, alibi_slopes=None):
    """Gradients of :func:`attention_varlen`: given dO = dL/d(out), return dL/dq,
    dL/dk, dL/dv of a packed batch.

    Args:
        do: (total_q, heads_q, head_dim_v), q's dtype: the gradient of the loss with
            respect to out.
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale:
            exactly as the forward took them (see :func:`attention_varlen`).
        out: the forward's output, (total_q, heads_q, head_dim_v), q's dtype. do and
            out may be strided views with a unit-stride head_dim axis.
        lse: the forward's lse, float32 (heads_q, total_q) (float64 accepted for
            float64 inputs, as :func:`nbflash.attention_backward` does).
        deterministic: as in :func:`nbflash.attention_backward`.
        dq, dk, dv: optional arrays of q's, k's, v's shapes and q's dtype to write into;
            no overlap with any input or each other.
        window, softcap, alibi_slopes: the forward's variants, exactly as given to
            :func:`attention_varlen` (window (left, right) per sequence; softcap a
            float >= 0; alibi_slopes float32 (heads_q,) or (batch, heads_q), batch
            the number of sequences).

    The lengths are read on the host (one small device->host copy for device
    cu_seqlens, which synchronizes with the stream) and every check of
    :func:`attention_varlen` applies. float16 and bfloat16 on the tensor-core backward
    (head_dim = head_dim_v in 32, 64, 96, 128) run as one launch per kernel stage for
    the whole batch: the kernels read each sequence's offsets from cu_seqlens, as the
    varlen forward does. Other dtypes and head dims, and NumPy inputs on a machine with
    a GPU, run the dense backward on each sequence's slices (views, no padding, no
    copies): one launch group per non-empty sequence.

    Returns:
        (dq, dk, dv): the shapes of q, k, v, q's dtype; CuPy for device inputs, NumPy
        for NumPy inputs. For GQA, dk and dv sum over the query heads that share a kv
        head; keys of a sequence without queries get 0, as do queries without keys.
    """
    from .api_backward import _check_array, choose_backward_spec

    ops = [arrays.intake(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v"))]
    problem, views = _validate_3d(ops)
    causal = api._check_flag(causal, "causal")
    deterministic = api._check_flag(deterministic, "deterministic")
    scale = api._check_scale(scale, problem.head_dim)
    qa = ops[0].array
    seqlens = _validate_seqlens(cu_seqlens_q, cu_seqlens_k, None, max_seqlen_k, problem, qa)
    if max_seqlen_q is not None and _check_max_seqlen(max_seqlen_q, "max_seqlen_q") < seqlens.max_seqlen_q:
        raise ValueError(f"max_seqlen_q: {max_seqlen_q} is smaller than the longest sequence in "
                         f"cu_seqlens ({seqlens.max_seqlen_q})")
    var = _check_varlen_variants(problem, qa, seqlens.batch, causal, window, softcap, alibi_slopes)
    packed_out = (problem.seqlen_q, problem.heads_q, problem.head_dim_v)
    do_a = _check_array(do, "do", problem, qa, packed_out, bshd=False)[0].array
    out_a = _check_array(out, "out", problem, qa, packed_out, bshd=False)[0].array
    for name, a in (("do", do_a), ("out", out_a)):  # as attention_backward
        api._check_unit_head_dim_stride(name, a)
    lse_dtypes = (arrays.FLOAT32, arrays.FLOAT64) if problem.dtype == arrays.FLOAT64 else (arrays.FLOAT32,)
    lse_a = _check_array(lse, "lse", problem, qa, (problem.heads_q, problem.seqlen_q), lse_dtypes,
                         bshd=False)[0].array
    inputs = {"q": qa, "k": ops[1].array, "v": ops[2].array, "do": do_a, "out": out_a, "lse": lse_a}
    grads = {}
    for name, g, like in zip(("dq", "dk", "dv"), (dq, dk, dv), ops):
        if g is not None:
            grads[name] = _check_array(g, name, problem, qa, like.array.shape, writable=True)[0].array
            for other, x in inputs.items():
                if arrays.overlaps(grads[name], x):
                    raise ValueError(f"{name}: overlaps {other} in memory; pass a separate buffer")
            for other, x in list(grads.items())[:-1]:
                if arrays.overlaps(grads[name], x):
                    raise ValueError(f"{name}: overlaps {other} in memory; pass a separate buffer")
    for name, like in zip(("dq", "dk", "dv"), ops):
        if name not in grads:
            grads[name] = api._empty(problem, like.array.shape, problem.dtype)

    host_q, host_k = (a.get() if not isinstance(a, np.ndarray) else a for a in (seqlens.q, seqlens.k))
    dq_a, dk_a, dv_a = grads["dq"], grads["dk"], grads["dv"]
    if min(seqlens.batch, problem.seqlen_q, problem.seqlen_k, problem.heads_q) == 0:
        for g in (dq_a, dk_a, dv_a):  # no query sees a key: every gradient is 0
            g[...] = 0
        return dq_a, dk_a, dv_a
    if problem.on_device or device.SIMULATOR:
        grad_views = [g[None] for g in (dq_a, dk_a, dv_a)]
        spec = choose_backward_spec(problem, causal, deterministic, [*views, do_a[None], *grad_views], var.variant,
                                    wgmma=False)
        if spec.module == "backward_mma":
            longest_k = int(np.diff(host_k.astype(np.int64)).max())
            _backward_varlen(spec, problem, views, do_a, out_a, lse_a, grad_views, seqlens, longest_k, scale,
                             deterministic, var)
            return dq_a, dk_a, dv_a
    _backward_per_sequence(do_a, ops, out_a, lse_a, (dq_a, dk_a, dv_a), host_q, host_k, causal, scale,
                           deterministic, window, softcap, var)
    return dq_a, dk_a, dv_a


def _backward_varlen(spec, problem, views, do_a, out_a, lse_a, grad_views, seqlens, longest_k, scale,
                     deterministic, var):
    """The tensor-core backward over the whole packed batch: delta for every packed
    row, then the dK/dV and dQ kernels built with spec.varlen (one launch each)."""
    from .api_backward import _launch_backward

    cu_q, cu_k = seqlens.q, seqlens.k
    if problem.on_device:  # NumPy cu_seqlens with device q: upload (a no-op for CuPy ones)
        import cupy

        cu_q, cu_k = cupy.asarray(cu_q), cupy.asarray(cu_k)
    delta = api._empty(problem, (1, problem.heads_q, problem.seqlen_q), np.float32)
    varlen = (launch.numba_view(cu_q), launch.numba_view(cu_k), seqlens.batch, seqlens.max_seqlen_q, longest_k)
    _launch_backward(spec, problem, views, do_a[None], out_a[None], lse_a[None], delta, grad_views,
                     np.float32(scale), deterministic, var, None, varlen)


def _backward_per_sequence(do_a, ops, out_a, lse_a, grads, host_q, host_k, causal, scale, deterministic,
                           window, softcap, var):
    """The dense backward on each sequence's slices (dtypes and head dims without a
    varlen kernel, and NumPy inputs through a GPU)."""
    from .api_backward import attention_backward

    qa, ka, va = (op.array for op in ops)
    dq_a, dk_a, dv_a = grads
    for b in range(len(host_q) - 1):
        qs = slice(int(host_q[b]), int(host_q[b + 1]))
        ks = slice(int(host_k[b]), int(host_k[b + 1]))
        if qs.start == qs.stop or ks.start == ks.stop:  # nothing attends: zero gradients
            dq_a[qs] = 0
            if qs.start == qs.stop:
                dk_a[ks] = 0
                dv_a[ks] = 0
            continue
        slopes = var.alibi[b] if var.alibi is not None else None
        attention_backward(do_a[qs], qa[qs], ka[ks], va[ks], out_a[qs], lse_a[:, qs],
                           causal=causal, scale=scale, deterministic=deterministic,
                           dq=dq_a[qs], dk=dk_a[ks], dv=dv_a[ks], window=window, softcap=softcap,
                           alibi_slopes=slopes)


from . import plans as _plans  # noqa: E402  (the memo builds on api)
