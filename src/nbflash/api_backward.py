"""The backward pass: attention_backward and attention_vjp validate, pick a kernel
family, launch.

Same vocabulary, layouts and refusals as nbflash.attention (api.py's validation is
reused); nothing is launched and nothing is written until every argument has been
checked. Kernels see (batch, seqlen, heads, head_dim) views.
"""

from __future__ import annotations

import numpy as np

from . import arrays, device, launch, tuning
from .api import _bshd, _check_flag, _check_scale, _Problem, _rows_16_byte_aligned, _validate, choose_forward_spec
from .api import variant_kernel_args
from .variants import NO_VARIANTS
from .api import _dummy, _dummy_seqlens
from .spec import BackwardSpec


def choose_backward_spec(problem: _Problem, causal: bool, deterministic: bool, views=None):
    """The kernel family and tiles that run this problem's backward pass: the
    tensor-core kernels (kernels/backward_mma.py) for fp16/bf16 with a shipped
    head_dim equal for q and v, 16-byte aligned rows in every array in ``views`` and
    an sm_80+ GPU; the portable kernels (any dtype and head_dim) otherwise.

    Every family honours ``deterministic``: the tensor-core family then computes dQ in
    a kernel of its own instead of with float32 atomics.
    """
    dtype = arrays.short_name(problem.dtype)
    if (
        dtype in ("fp16", "bf16")
        and problem.head_dim == problem.head_dim_v
        and device.compute_capability() >= (8, 0)
        and (views is None or all(_rows_16_byte_aligned(a) for a in views))
    ):
        from .kernels import backward_mma

        spec = backward_mma.choose_spec(dtype, problem.head_dim, causal, device.SIMULATOR)
        if spec is not None:
            return spec
    return _simt_spec(problem, causal)


def _simt_spec(problem: _Problem, causal: bool) -> BackwardSpec:
    acc_bytes = 8 if problem.dtype == arrays.FLOAT64 else 4
    block_m, block_n, threads = tuning.backward_simt_tiles(
        acc_bytes, problem.head_dim, problem.head_dim_v, device.SIMULATOR
    )
    return BackwardSpec(
        "simt", arrays.short_name(problem.dtype), problem.head_dim, problem.head_dim_v,
        causal, block_m, block_n, threads,
    )


def backward_spec(q, k, v, *, causal=False, layout="bshd", deterministic=False) -> BackwardSpec:
    """The specialization :func:`attention_backward` would run for these arguments;
    its ``key`` names it in logs and benchmark rows."""
    ops = [arrays.intake(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v"))]
    problem, views = _validate(*ops, layout)
    return choose_backward_spec(
        problem, _check_flag(causal, "causal"), _check_flag(deterministic, "deterministic"), views
    )


def _check_array(x, name, problem: _Problem, q, shape, dtypes=None, *, bshd=True, writable=False):
    """Intake and check one array argument against the validated problem; return
    (operand, kernel view)."""
    op = arrays.intake(x, name)
    where = "device" if problem.on_device else "host"
    if op.on_device != problem.on_device:
        raise TypeError(f"{name}: expected a {where} array like q; got a {'device' if op.on_device else 'host'} array")
    a = op.array
    if a.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}; got {a.shape}")
    if dtypes is None and a.dtype != problem.dtype:
        raise TypeError(f"{name}: expected dtype {problem.dtype} (q's); got {a.dtype}")
    if dtypes is not None and a.dtype not in dtypes:
        expected = " or ".join(str(np.dtype(d)) for d in dtypes)
        raise TypeError(f"{name}: expected dtype {expected}; got {a.dtype}")
    if problem.on_device and arrays.device_id(a) != arrays.device_id(q):
        raise ValueError(f"{name}: on device {arrays.device_id(a)}, q on device {arrays.device_id(q)}")
    if bshd:
        view = _bshd(a, problem.layout, problem.squeeze)
        if view.size and view.shape[3] > 1 and view.strides[3] != view.itemsize:
            raise ValueError(
                f"{name}: the head_dim axis must have unit stride ({view.itemsize} bytes); "
                f"got {view.strides[3]} bytes"
            )
    else:
        view = a[None] if problem.squeeze else a
    if writable and any(s == 0 for s, n in zip(a.strides, a.shape) if n > 1):
        raise ValueError(f"{name}: broadcast (zero-stride) arrays cannot be written")
    return op, view


def _check_all(ops, do, out, lse, grads, causal, deterministic, scale, layout):
    """Validate every argument of attention_backward; return what the run needs."""
    problem, views = _validate(*ops, layout)
    causal = _check_flag(causal, "causal")
    deterministic = _check_flag(deterministic, "deterministic")
    scale = _check_scale(scale, problem.head_dim)
    q = ops[0].array
    do_op, do_view = _check_array(do, "do", problem, q, problem.out_shape())
    out_op, out_view = _check_array(out, "out", problem, q, problem.out_shape())
    lse_dtypes = (arrays.FLOAT32, arrays.FLOAT64) if problem.dtype == arrays.FLOAT64 else (arrays.FLOAT32,)
    lse_op, lse_view = _check_array(lse, "lse", problem, q, problem.lse_shape(), lse_dtypes, bshd=False)
    inputs = {"q": q, "k": ops[1].array, "v": ops[2].array, "do": do_op.array, "out": out_op.array, "lse": lse_op.array}
    given = {}
    for name, g, like in zip(("dq", "dk", "dv"), grads, ops):
        if g is not None:
            given[name] = _check_array(g, name, problem, q, like.array.shape, writable=True)[0].array
    for name, g in given.items():
        for other, x in inputs.items():
            if arrays.overlaps(g, x):
                raise ValueError(f"{name}: overlaps {other} in memory; pass a separate buffer")
    names = list(given)
    for i, name in enumerate(names):
        for other in names[:i]:
            if arrays.overlaps(given[name], given[other]):
                raise ValueError(f"{name}: overlaps {other} in memory; pass a separate buffer")
    return problem, views, (do_view, out_view, lse_view), given, causal, deterministic, scale


def attention_backward(
    do, q, k, v, out, lse, *, causal=False, scale=None, layout="bshd", deterministic=False,
    dq=None, dk=None, dv=None,
):
    """Gradients of attention: given dO = dL/d(out), return dL/dq, dL/dk, dL/dv.

    Args:
        do: the gradient of the loss with respect to out: out's shape
            ((batch, seqlen_q, heads_q, head_dim_v) for "bshd", (batch, heads_q,
            seqlen_q, head_dim_v) for "bhsd"; 3-D without the batch axis if q is) and
            q's dtype.
        q, k, v: the forward's inputs, exactly as :func:`nbflash.attention` takes them
            (same shapes, layouts, dtypes, GQA rule and head_dim limits).
        out: the forward's output, out's shape and q's dtype.
        lse: the forward's log-sum-exp as ``attention(..., return_lse=True)`` returns it:
            float32 (batch, heads_q, seqlen_q), or (heads_q, seqlen_q) for 3-D inputs.
            For float64 inputs a float64 lse is also accepted and used as is; a float32
            one is recomputed in float64 first (an extra forward pass), because P
            recomputed from a float32 lse would cap the gradients at ~1e-7 accuracy.
        causal, scale, layout: as in :func:`nbflash.attention`; they must match the
            forward's.
        deterministic: bitwise-repeatable gradients from run to run. The portable
            kernels always are (no atomics); a family that accumulates with atomics is
            not chosen when this is True.
        dq, dk, dv: optional arrays of q's, k's and v's shapes and q's dtype to write
            into; they must not overlap any input or each other.

    Arrays are CuPy arrays, ``__cuda_array_interface__`` / ``__dlpack__`` objects (read
    in place) or NumPy arrays (through the GPU and back; on the simulator without a
    GPU), all on the same side; every array but lse needs a unit-stride last axis.

    Returns:
        (dq, dk, dv): the shapes of q, k, v, q's dtype and layout. For GQA, dk and dv
        sum over the query heads that share a kv head. Rows that see no key get a zero
        dq and add nothing to dk and dv.

    Accumulation is float32 (float64 for float64 inputs); P and dS are never rounded to
    the storage dtype. Extra memory: delta, (batch, heads_q, seqlen_q) in accumulation
    precision (plus, for float64 with a float32 lse, a float64 lse and a scratch
    output). Computed on CuPy's current stream, without synchronizing.
    """
    ops = [arrays.intake(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v"))]
    problem, views, (do_view, out_view, lse_view), given, causal, deterministic, scale = _check_all(
        ops, do, out, lse, (dq, dk, dv), causal, deterministic, scale, layout
    )
    if problem.on_device or device.SIMULATOR:
        return _backward(problem, views, do_view, out_view, lse_view, given, ops, causal, deterministic, scale)
    return _backward_via_gpu(do, q, k, v, out, lse, given, causal, deterministic, scale, layout)


def _backward_via_gpu(do, q, k, v, out, lse, given, causal, deterministic, scale, layout):
    """NumPy inputs with a GPU present: there and back, into the caller's buffers if given."""
    import cupy

    dev = [cupy.asarray(x) for x in (do, q, k, v, out, lse)]
    grads = attention_backward(*dev, causal=causal, scale=scale, layout=layout, deterministic=deterministic)
    result = []
    for name, g in zip(("dq", "dk", "dv"), grads):
        host = given.get(name)
        if host is None:
            host = np.empty(g.shape, g.dtype)
        host[...] = g.get()
        result.append(host)
    return tuple(result)


def _backward(problem, views, do_view, out_view, lse_view, given, ops, causal, deterministic, scale):
    """Allocate what the caller did not give, recompute a float64 lse if needed, launch."""
    grads = []
    for name, op in zip(("dq", "dk", "dv"), ops):
        grads.append(given[name] if name in given else _empty(problem, op.array.shape, problem.dtype))
    if min(problem.batch, problem.seqlen_q, problem.seqlen_k, problem.heads_q) == 0:
        for g in grads:  # no query sees a key: every gradient is 0
            g[...] = 0
        return tuple(grads)
    grad_views = [_bshd(g, problem.layout, problem.squeeze) for g in grads]
    spec = choose_backward_spec(problem, causal, deterministic, [*views, do_view, *grad_views])
    acc_type = np.float64 if problem.dtype == arrays.FLOAT64 else np.float32
    if lse_view.dtype != acc_type:  # float64 inputs with the forward's float32 lse
        lse_view = _float64_lse(problem, views, causal, scale)
    delta = _empty(problem, (problem.batch, problem.heads_q, problem.seqlen_q), acc_type)
    _launch_backward(spec, problem, views, do_view, out_view, lse_view, delta, grad_views, acc_type(scale), deterministic)
    return tuple(grads)


def _launch_backward(spec, problem, views, do_view, out_view, lse_view, delta, grad_views, scale, deterministic):
    """delta = rowsum(dO * O) by the portable preprocess kernel, then one family's
    kernels (contract: kernels/backward_simt.py's docstring)."""
    b, hq, hkv = problem.batch, problem.heads_q, problem.heads_kv
    cdiv = lambda n, d: -(-n // d)  # noqa: E731
    simt = spec if spec.module == "backward_simt" else _simt_spec(problem, spec.causal)
    kernels = launch.compiled(simt)
    view = lambda a: launch.numba_view(arrays.kernel_view(a))  # noqa: E731
    launch.launch(
        kernels.preprocess, (cdiv(problem.seqlen_q, simt.threads), hq, b), simt.threads,
        [view(do_view), view(out_view), launch.numba_view(delta)],
    )
    q, k, v = views
    dq, dk, dv = grad_views
    if spec.module == "backward_mma":
        from .kernels import backward_mma

        raw = lambda a: arrays.kernel_view(a, True)  # noqa: E731
        backward_mma.launch_backward(
            spec, raw(q), raw(k), raw(v), raw(do_view), lse_view, delta, raw(dq), raw(dk), raw(dv),
            scale, hq // hkv, deterministic,
        )
        return
    args = [
        view(q), view(k), view(v), view(do_view), launch.numba_view(lse_view), launch.numba_view(delta),
        view(dq), view(dk), view(dv), scale, hq // hkv,
    ]
    shared = launch.shared_bytes(spec)
    launch.launch(kernels.dkdv, (cdiv(problem.seqlen_k, spec.block_n), hkv, b), spec.threads, args, shared)
    launch.launch(kernels.dq, (cdiv(problem.seqlen_q, spec.block_m), hq, b), spec.threads, args, shared)


def _float64_lse(problem, views, causal, scale, out_view=None):
    """The log-sum-exp in float64, from the portable forward kernel writing a float64
    lse buffer (the output goes to ``out_view``, or to a scratch buffer)."""
    spec = choose_forward_spec(problem, causal, True, views)
    assert spec.kernel == "simt" and spec.dtype == "fp64"
    if out_view is None:
        out_view = _empty(problem, (problem.batch, problem.seqlen_q, problem.heads_q, problem.head_dim_v), np.float64)
    lse = _empty(problem, (problem.batch, problem.heads_q, problem.seqlen_q), np.float64)
    grid = (-(-problem.seqlen_q // spec.block_m), problem.heads_q, problem.batch)
    args = [launch.numba_view(a) for a in (*views, out_view, lse)]
    args += [np.float64(scale), problem.heads_q // problem.heads_kv]
    no_seqlens = launch.numba_view(_dummy(problem, views, _dummy_seqlens, (1,), np.int32))  # varlen-only args
    args += [no_seqlens, no_seqlens]
    args += variant_kernel_args(problem, views, NO_VARIANTS)  # the forward kernels' variant arguments
    launch.launch(launch.compiled(spec), grid, spec.threads, args, launch.shared_bytes(spec))
    return lse


def _empty(problem, shape, dtype):
    if problem.on_device:
        import cupy

        return cupy.empty(shape, dtype)
    return np.empty(shape, dtype)


def attention_vjp(q, k, v, *, causal=False, scale=None, layout="bshd", deterministic=False):
    """Attention and its vector-Jacobian product, as a functional pair (JAX's ``vjp``).

    Args:
        q, k, v, causal, scale, layout: as in :func:`nbflash.attention`.
        deterministic: as in :func:`attention_backward`.

    Returns:
        (out, vjp): out as :func:`nbflash.attention` returns it, and a function
        ``vjp(do) -> (dq, dk, dv)`` with ``do`` of out's shape and dtype, results as
        :func:`attention_backward` returns them. The forward runs once and keeps its
        lse (float64 for float64 inputs, so no recompute is needed) and references to
        q, k, v and out (not copies: change them and the gradients change).
    """
    from .api import _forward

    ops = [arrays.intake(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v"))]
    problem, views = _validate(*ops, layout)
    causal = _check_flag(causal, "causal")
    deterministic = _check_flag(deterministic, "deterministic")
    scale = _check_scale(scale, problem.head_dim)

    host_via_gpu = not problem.on_device and not device.SIMULATOR
    if host_via_gpu:  # keep device copies for the backward, hand NumPy back
        import cupy

        ops = [arrays.Operand(cupy.asarray(op.array), True) for op in ops]
        problem, views = _validate(*ops, layout)
    saved = [op.array for op in ops]
    if problem.dtype == arrays.FLOAT64 and min(problem.batch, problem.seqlen_q, problem.heads_q) > 0:
        out = _empty(problem, problem.out_shape(), problem.dtype)
        lse = _float64_lse(problem, views, causal, scale, _bshd(out, layout, problem.squeeze))
        lse = lse[0] if problem.squeeze else lse
    else:
        out, lse = _forward(problem, views, None, causal, scale, True)

    def vjp(do):
        """(dq, dk, dv) for the gradient ``do`` of the loss with respect to out."""
        if host_via_gpu:
            import cupy

            if not isinstance(do, np.ndarray):
                raise TypeError(f"do: expected a host array like q; got {type(do).__name__}")
            grads = attention_backward(
                cupy.asarray(do), *saved, out, lse,
                causal=causal, scale=scale, layout=layout, deterministic=deterministic,
            )
            return tuple(g.get() for g in grads)
        return attention_backward(
            do, *saved, out, lse, causal=causal, scale=scale, layout=layout, deterministic=deterministic
        )

    return (out.get() if host_via_gpu else out), vjp
