"""The backward pass: attention_backward and attention_vjp validate, pick a kernel
family, launch.

Same vocabulary, layouts and refusals as nbflash.attention (api.py's validation is
reused); nothing is launched and nothing is written until every argument has been
checked. Kernels see (batch, seqlen, heads, head_dim) views.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from . import arrays, backward_plans, device, launch, tuning, variants
from .api import _bshd, _check_flag, _check_scale, _Problem, _rows_16_byte_aligned, _validate, choose_forward_spec
from .api import _check_unit_head_dim_stride, _dummy, _dummy_seqlens, _empty, _plain, variant_kernel_args
from .variants import NO_VARIANTS
from .spec import PLAIN, BackwardSpec, DeltaSpec, Variant


def choose_backward_spec(problem: _Problem, causal: bool, deterministic: bool, views=None,
                         variant: Variant = PLAIN, dbias: bool = False, wgmma: bool = True):
    """The kernel family and tiles that run this problem's backward pass: the
    tensor-core kernels (kernels/backward_mma.py) for fp16/bf16 with a shipped
    head_dim equal for q and v, 16-byte aligned rows in every array in ``views`` and
    an sm_80+ GPU (on sm_90, plain attention at head_dim 64/128 takes the wgmma
    kernels of kernels/backward_wgmma.py unless ``wgmma`` is False, and so do window,
    softcap, ALiBi and, switched on, a staged 16-bit bias or mask without
    ``deterministic``: tuning.wgmma_bwd_variant, _wgmma_stages_fit); the portable
    kernels (any dtype and head_dim) otherwise.

    Every family honours ``deterministic``: the tensor-core families then compute dQ in
    a kernel of its own instead of with float32 reductions from the dK/dV kernel (the
    wgmma family's default, tuning.WGMMA_BWD_DQ_ATOMICS). ``variant`` and ``dbias`` are
    compiled into the spec (spec.Variant; dbias: the kernels also write dS).
    """
    dtype = arrays.short_name(problem.dtype)
    if (
        dtype in ("fp16", "bf16")
        and problem.head_dim == problem.head_dim_v
        and device.compute_capability() >= (8, 0)
        and (views is None or all(_rows_16_byte_aligned(a) for a in views))
    ):
        from .kernels import backward_mma

        wgmma = wgmma and not (variant and deterministic)  # the wgmma variants are in the fused kernel only
        spec = backward_mma.choose_spec(dtype, problem.head_dim, causal, device.SIMULATOR, variant, dbias, wgmma)
        if spec is not None and spec.wgmma and not _wgmma_stages_fit(spec):
            spec = backward_mma.choose_spec(dtype, problem.head_dim, causal, device.SIMULATOR, variant, dbias, False)
        if spec is not None:
            return _fit_staging(spec)
    return _simt_spec(problem, causal, variant, dbias)


def _wgmma_stages_fit(spec) -> bool:
    """Whether a wgmma backward spec's fused kernel, with its bias and mask stages, fits
    the GPU's shared memory (a bias and a mask together do not at head_dim 128)."""
    if not (spec.variant.bias or spec.variant.mask):
        return True
    return launch.shared_bytes(replace(spec, part="dkdvq")) <= device.max_shared_bytes()


def _fit_staging(spec):
    """A tensor-core backward ``spec`` whose staged bias / mask tiles (mma.sync family:
    kernels/backward_mma.py stages them like the forward) fit the GPU's shared memory in
    each of the parts it may launch; staging is dropped, the bias first, until they do.
    The wgmma family takes a bias or mask only staged (tuning.wgmma_bwd_variant,
    _wgmma_stages_fit)."""
    if spec.wgmma:
        return spec
    launched = ("dkdv", "dq") + (("dkdvq",) if spec.dq_atomics else ())  # dq: deterministic=True
    return variants.fit_staging(spec, device.max_shared_bytes(),
                                parts=lambda fitted: [replace(fitted, part=part) for part in launched])


def _simt_spec(problem: _Problem, causal: bool, variant: Variant = PLAIN, dbias: bool = False) -> BackwardSpec:
    acc_bytes = 8 if problem.dtype == arrays.FLOAT64 else 4
    block_m, block_n, threads = tuning.backward_simt_variant_tiles(
        acc_bytes, problem.head_dim, problem.head_dim_v, device.SIMULATOR, variant.softcap
    )
    return BackwardSpec(
        "simt", arrays.short_name(problem.dtype), problem.head_dim, problem.head_dim_v,
        causal, block_m, block_n, threads, variant=variants.unstaged(variant), dbias=dbias,
    )


def backward_spec(q, k, v, *, causal=False, layout="bshd", deterministic=False, window=None, softcap=0.0,
                  alibi_slopes=None, bias=None, mask=None, dropout_p=0.0, seed=None, return_dbias=False):
    """The specialization :func:`attention_backward` would run for these arguments
    (same meanings, shapes and dtypes); its ``key`` names it in logs and benchmark rows."""
    ops = [arrays.intake(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v"))]
    problem, views = _validate(*ops, layout)
    causal = _check_flag(causal, "causal")
    vargs = variants.check_variants(
        problem, ops[0].array, causal=causal, window=window, softcap=softcap, alibi_slopes=alibi_slopes,
        bias=bias, mask=mask, dropout_p=dropout_p, seed=seed,
    )
    dbias = _check_return_dbias(return_dbias, vargs, problem)
    return choose_backward_spec(
        problem, causal, _check_flag(deterministic, "deterministic"), views, vargs.variant, dbias
    )


def _check_return_dbias(return_dbias, vargs, problem: _Problem) -> bool:
    """return_dbias needs a bias with its own query and key axes (a gradient summed
    over a broadcast query or key axis is not what dS is)."""
    if not _check_flag(return_dbias, "return_dbias"):
        return False
    if vargs.bias_shape is None:
        raise ValueError("return_dbias: requires a bias")
    shape = vargs.bias_shape
    expected = (problem.seqlen_q, problem.seqlen_k)
    if len(shape) < 2 or tuple(shape[-2:]) != expected:
        raise ValueError(
            f"return_dbias: bias of shape {shape} is broadcast along the query or key axis; "
            f"its last two axes must be (seqlen_q, seqlen_k) = {expected}"
        )
    return True


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
        _check_unit_head_dim_stride(name, view)
    else:
        view = a[None] if problem.squeeze else a
    if writable and any(s == 0 for s, n in zip(a.strides, a.shape) if n > 1):
        raise ValueError(f"{name}: broadcast (zero-stride) arrays cannot be written")
    return op, view


def _check_all(ops, do, out, lse, grads, causal, deterministic, scale, layout, options):
    """Validate every argument of attention_backward; return what the run needs."""
    problem, views = _validate(*ops, layout)
    causal = _check_flag(causal, "causal")
    deterministic = _check_flag(deterministic, "deterministic")
    scale = _check_scale(scale, problem.head_dim)
    q = ops[0].array
    return_dbias = options.pop("return_dbias")
    vargs = variants.check_variants(problem, q, causal=causal, **options)
    dbias = _check_return_dbias(return_dbias, vargs, problem)
    do_op, do_view = _check_array(do, "do", problem, q, problem.out_shape())
    out_op, out_view = _check_array(out, "out", problem, q, problem.out_shape())
    lse_dtypes = (arrays.FLOAT32, arrays.FLOAT64) if problem.dtype == arrays.FLOAT64 else (arrays.FLOAT32,)
    lse_op, lse_view = _check_array(lse, "lse", problem, q, problem.lse_shape(), lse_dtypes, bshd=False)
    inputs = {"q": q, "k": ops[1].array, "v": ops[2].array, "do": do_op.array, "out": out_op.array, "lse": lse_op.array}
    given = {}
    for name, g, like in zip(("dq", "dk", "dv"), grads, ops):
        if g is not None:
            given[name] = _check_array(g, name, problem, q, like.array.shape, writable=True)[0].array
    if given:  # each array's byte range once (a CuPy attribute read is ~µs), then the pairs
        ranges = {name: arrays.byte_range(x) for name, x in inputs.items()}
        names = list(given)
        for i, name in enumerate(names):
            here = ranges[name] = arrays.byte_range(given[name])
            for other in list(inputs) + names[:i]:
                if arrays.ranges_overlap(here, ranges[other]):
                    raise ValueError(f"{name}: overlaps {other} in memory; pass a separate buffer")
    return problem, views, (do_view, out_view, lse_view), given, causal, deterministic, scale, vargs, dbias


def attention_backward(
    do, q, k, v, out, lse, *, causal=False, scale=None, layout="bshd", deterministic=False,
    dq=None, dk=None, dv=None, window=None, softcap=0.0, alibi_slopes=None, bias=None, mask=None,
    dropout_p=0.0, seed=None, return_dbias=False,
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
            kernels always are (no atomics). Without it the Hopper (wgmma) kernels add
            dQ in float32 reductions whose order varies (dq differs between runs in
            its last bits; dk and dv do not); with it they take the two-kernel path
            (from 2% faster to 8% slower on the H100, perf/NOTES.md session 8).
        dq, dk, dv: optional arrays of q's, k's and v's shapes and q's dtype to write
            into; they must not overlap any input or each other.
        window, softcap, alibi_slopes, bias, mask, dropout_p, seed: the forward's
            variants, exactly as given to :func:`nbflash.attention` (same meanings and
            refusals): window (left, right) ints >= -1 or None; softcap a float >= 0
            (0 off); alibi_slopes float32 (heads_q,) or (batch, heads_q); bias a float16,
            bfloat16, float32 or float64 array broadcastable to (batch, heads_q,
            seqlen_q, seqlen_k) ((heads_q, seqlen_q, seqlen_k) for 3-D inputs); mask a
            bool array broadcastable the same way (True attends); dropout_p in [0, 1)
            with seed an int (required when dropout_p > 0; the same seed gives the
            forward's dropout mask). P is recomputed from the modified scores.
        return_dbias: also return the gradient of bias. Requires a bias whose last two
            axes are (seqlen_q, seqlen_k) (not broadcast along the query or key axis;
            batch and head axes may broadcast and are summed over).

    Arrays are CuPy arrays, ``__cuda_array_interface__`` / ``__dlpack__`` objects (read
    in place) or NumPy arrays (through the GPU and back; on the simulator without a
    GPU), all on the same side; every array but lse needs a unit-stride last axis.

    Returns:
        (dq, dk, dv): the shapes of q, k, v, q's dtype and layout. For GQA, dk and dv
        sum over the query heads that share a kv head. Rows that see no key get a zero
        dq and add nothing to dk and dv. With return_dbias, (dq, dk, dv, dbias): dbias
        in bias's shape and dtype, summed over the axes bias broadcasts along.

    Accumulation is float32 (float64 for float64 inputs); P and dS are never rounded to
    the storage dtype. Extra memory: delta, (batch, heads_q, seqlen_q) in accumulation
    precision (plus, for float64 with a float32 lse, a float64 lse and a scratch
    output; with return_dbias, dS as (batch, heads_q, seqlen_q, seqlen_k) in
    accumulation precision).
    Computed on CuPy's current stream, without synchronizing. A call on CuPy arrays
    with 16-byte aligned data pointers whose shapes, strides, dtypes and flags repeat
    an earlier one, and that passes none of the variant arguments (softcap None or a
    Python number 0, dropout_p a Python number 0), replays that call's prepared launches without
    validating again (backward_plans.py); other calls are validated in full every time.
    """
    key = None
    if not device.SIMULATOR and _plain(window, softcap, alibi_slopes, bias, mask, dropout_p, seed, return_dbias):
        key = backward_plans.memo_key(do, q, k, v, out, lse, dq, dk, dv, causal, scale, layout, deterministic)
        if key is not None:
            grads = backward_plans.memoized_backward(key, do, q, k, v, out, lse, dq, dk, dv)
            if grads is not None:
                return grads
    ops = [arrays.intake(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v"))]
    options = dict(window=window, softcap=softcap, alibi_slopes=alibi_slopes, bias=bias, mask=mask,
                   dropout_p=dropout_p, seed=seed, return_dbias=return_dbias)
    problem, views, (do_view, out_view, lse_view), given, causal, deterministic, scale, vargs, dbias = _check_all(
        ops, do, out, lse, (dq, dk, dv), causal, deterministic, scale, layout, dict(options)
    )
    if problem.on_device or device.SIMULATOR:
        recording = backward_plans.Recording() if key is not None and problem.on_device else None
        grads = _backward(problem, views, do_view, out_view, lse_view, given, ops, causal, deterministic, scale,
                          vargs, dbias, recording)
        if recording is not None:  # keyed by the arguments as given (scale=None, not its value)
            buffers = dict(q=q, k=k, v=v, do=do, out=out, lse=lse, dq=grads[0], dk=grads[1], dv=grads[2])
            backward_plans.remember(key, recording, buffers, problem.dtype)
        return grads
    return _backward_via_gpu(do, q, k, v, out, lse, given, causal, deterministic, scale, layout, options)


def _backward_via_gpu(do, q, k, v, out, lse, given, causal, deterministic, scale, layout, options):
    """NumPy inputs with a GPU present: there and back, into the caller's buffers if given."""
    import cupy

    dev = [cupy.asarray(x) for x in (do, q, k, v, out, lse)]
    options = dict(options)
    for name in ("alibi_slopes", "bias", "mask"):
        if options[name] is not None:
            options[name] = cupy.asarray(options[name])
    grads = attention_backward(*dev, causal=causal, scale=scale, layout=layout, deterministic=deterministic,
                               **options)
    result = []
    for name, g in zip(("dq", "dk", "dv"), grads):
        host = given.get(name)
        if host is None:
            host = np.empty(g.shape, g.dtype)
        host[...] = g.get()
        result.append(host)
    if len(grads) == 4:
        result.append(grads[3].get())
    return tuple(result)


def _backward(problem, views, do_view, out_view, lse_view, given, ops, causal, deterministic, scale,
              vargs=variants.NO_VARIANTS, dbias=False, recording=None):
    """Allocate what the caller did not give, recompute a float64 lse if needed, launch
    (reporting the launches to ``recording``, a backward_plans.Recording, unless an
    extra lse pass makes the call unfit to replay)."""
    grads = []
    for name, op in zip(("dq", "dk", "dv"), ops):
        grads.append(given[name] if name in given else _empty(problem, op.array.shape, problem.dtype))
    acc_type = np.float64 if problem.dtype == arrays.FLOAT64 else np.float32
    ds = None
    if dbias:  # dS of every (batch, head, query, key), summed to bias's shape at the end
        ds = _zeros(problem, (problem.batch, problem.heads_q, problem.seqlen_q, problem.seqlen_k), acc_type)
    if min(problem.batch, problem.seqlen_q, problem.seqlen_k, problem.heads_q) == 0:
        for g in grads:  # no query sees a key: every gradient is 0
            g[...] = 0
        return tuple(grads) + ((_dbias(ds, vargs, problem),) if dbias else ())
    grad_views = [_bshd(g, problem.layout, problem.squeeze) for g in grads]
    spec = choose_backward_spec(problem, causal, deterministic, [*views, do_view, *grad_views], vargs.variant, dbias)
    if lse_view.dtype != acc_type:  # float64 inputs with the forward's float32 lse
        recording = None
        if vargs.variant:
            lse_view = _float64_variant_lse(spec, problem, views, vargs, scale)
        else:
            lse_view = _float64_lse(problem, views, causal, scale)
    delta = _empty(problem, (problem.batch, problem.heads_q, problem.seqlen_q), acc_type)
    if recording is not None:
        recording.allocated("delta", delta, zeroed=False)
    _launch_backward(spec, problem, views, do_view, out_view, lse_view, delta, grad_views, acc_type(scale),
                     deterministic, vargs, ds, recording=recording)
    return tuple(grads) + ((_dbias(ds, vargs, problem),) if dbias else ())


def _dbias(ds, vargs, problem):
    """dS summed over the axes the bias broadcasts along (in accumulation precision),
    in the bias's shape and dtype."""
    shape = vargs.bias_shape
    x = ds[0] if problem.squeeze else ds
    lead = x.ndim - len(shape)
    if lead:
        x = x.sum(axis=tuple(range(lead)))
    axes = tuple(a for a, n in enumerate(shape) if n == 1 and x.shape[a] != 1)
    if axes:
        x = x.sum(axis=axes, keepdims=True)
    return _cast(x.reshape(shape), vargs.bias.dtype)


def _cast(x, dtype):
    """float32/float64 x to ``dtype``, rounding to nearest even; bfloat16 on CuPy (which has
    no bfloat16 arithmetic) by rounding the bits."""
    if isinstance(x, np.ndarray) or dtype != arrays.BFLOAT16:
        return x.astype(dtype)
    import cupy

    x = cupy.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    rounded = cupy.where(cupy.isnan(x), np.uint32(0x7FC0), rounded)
    return rounded.astype(np.uint16).view(arrays.BFLOAT16)


_dummy_variant_arrays: dict = {}


def _variant_args(problem, views, vargs, acc_type):
    """The ten KERNEL_ARGS values as kernel arguments (softcap and keep_scale in
    accumulation precision, so float64 stays float64 in the portable kernels)."""

    def dummy(shape, dtype):
        cache = _dummy_variant_arrays.setdefault((shape, np.dtype(dtype).str), {})
        return _dummy(problem, views, cache, shape, dtype)

    values = variants.kernel_values(vargs, dummy)
    values[2] = acc_type(vargs.softcap)
    values[7] = acc_type(1.0) / acc_type(1.0 - vargs.dropout_p)  # keep_scale
    return [launch.numba_view(x) if hasattr(x, "shape") and x.ndim else x for x in values]


def _float64_variant_lse(spec, problem, views, vargs, scale):
    """The float64 lse of a variant problem, by the portable row_lse kernel."""
    simt = spec if spec.module == "backward_simt" else _simt_spec(problem, spec.causal, vargs.variant)
    lse = _empty(problem, (problem.batch, problem.heads_q, problem.seqlen_q), np.float64)
    q, k, _ = views
    args = [launch.numba_view(q), launch.numba_view(k), launch.numba_view(lse), np.float64(scale)]
    args += _variant_args(problem, views, vargs, np.float64)
    grid = (-(-problem.seqlen_q // simt.threads), problem.heads_q, problem.batch)
    launch.launch(launch.compiled(simt).row_lse, grid, simt.threads, args)
    return lse


def _launch_backward(spec, problem, views, do_view, out_view, lse_view, delta, grad_views, scale, deterministic,
                     vargs=variants.NO_VARIANTS, ds=None, varlen=None, recording=None):
    """delta = rowsum(dO * O) (kernels/backward_delta.py for the tensor-core families
    where O's rows are 16-byte aligned, the portable preprocess otherwise), then one family's
    kernels (contract: kernels/backward_simt.py's docstring) with the variant values
    and the dS buffer for dbias appended. ``varlen``: a packed batch for the
    tensor-core family (see kernels.backward_mma.launch_backward). ``recording``: a
    backward_plans.Recording each launch is reported to, with its per-call arrays'
    names."""
    b, hq, hkv = problem.batch, problem.heads_q, problem.heads_kv
    cdiv = lambda n, d: -(-n // d)  # noqa: E731
    simt = spec if spec.module == "backward_simt" else _simt_spec(problem, spec.causal)
    kernels = launch.compiled(simt)
    extra = _variant_args(problem, views, vargs, type(scale))
    if ds is None:
        ds = _dummy(problem, views, _dummy_variant_arrays.setdefault("dbias", {}), (1, 1, 1, 1), np.float32)
    extra.append(launch.numba_view(ds))
    view = lambda a: launch.numba_view(arrays.kernel_view(a))  # noqa: E731

    def run(kernel, grid, threads, args, shared, names):
        backward_plans.launch_named(recording, kernel, grid, threads, args, shared, names)

    if spec.module in ("backward_mma", "backward_wgmma") and _rows_16_byte_aligned(out_view):
        # dO's rows are aligned (the tensor-core family asks for it); O's may not be
        rows = DeltaSpec(spec.dtype, problem.head_dim_v, tuning.delta_threads(device.SIMULATOR))
        run(
            launch.compiled(rows), (cdiv(problem.seqlen_q * hq, rows.rows_per_cta()), b), rows.threads,
            [launch.numba_view(arrays.kernel_view(a, True)) for a in (do_view, out_view)]
            + [launch.numba_view(delta)], 0, ("do", "out", "delta"),
        )
    else:
        run(
            kernels.preprocess, (cdiv(problem.seqlen_q, simt.threads), hq, b), simt.threads,
            [view(do_view), view(out_view), launch.numba_view(delta)], 0, ("do", "out", "delta"),
        )
    q, k, v = views
    dq, dk, dv = grad_views
    if spec.module in ("backward_mma", "backward_wgmma"):  # one launcher for both families
        from .kernels import backward_mma

        raw = lambda a: arrays.kernel_view(a, True)  # noqa: E731
        backward_mma.launch_backward(
            spec, raw(q), raw(k), raw(v), raw(do_view), lse_view, delta, raw(dq), raw(dk), raw(dv),
            scale, hq // hkv, deterministic, extra, varlen, recording,
        )
        return
    args = [
        view(q), view(k), view(v), view(do_view), launch.numba_view(lse_view), launch.numba_view(delta),
        view(dq), view(dk), view(dv), scale, hq // hkv, *extra,
    ]
    shared = launch.shared_bytes(spec)
    names = ("q", "k", "v", "do", "lse", "delta", "dq", "dk", "dv")
    run(kernels.dkdv, (cdiv(problem.seqlen_k, spec.block_n), hkv, b), spec.threads, args, shared, names)
    run(kernels.dq, (cdiv(problem.seqlen_q, spec.block_m), hq, b), spec.threads, args, shared, names)


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


def _zeros(problem, shape, dtype):
    if problem.on_device:
        import cupy

        return cupy.zeros(shape, dtype)
    return np.zeros(shape, dtype)


def attention_vjp(q, k, v, *, causal=False, scale=None, layout="bshd", deterministic=False, window=None,
                  softcap=0.0, alibi_slopes=None, bias=None, mask=None, dropout_p=0.0, seed=None,
                  return_dbias=False):
    """Attention and its vector-Jacobian product, as a functional pair (JAX's ``vjp``).

    Args:
        q, k, v, causal, scale, layout: as in :func:`nbflash.attention`.
        deterministic: as in :func:`attention_backward`.
        window, softcap, alibi_slopes, bias, mask, dropout_p, seed: the variants, as in
            :func:`nbflash.attention` (shapes and dtypes there); the forward and the
            backward both get them.
        return_dbias: vjp(do) also returns the gradient of bias (see
            :func:`attention_backward`).

    Returns:
        (out, vjp): out as :func:`nbflash.attention` returns it, and a function
        ``vjp(do) -> (dq, dk, dv)`` (``(dq, dk, dv, dbias)`` with return_dbias) with
        ``do`` of out's shape and dtype, results as :func:`attention_backward` returns
        them. The forward runs once and keeps its lse (float64 for float64 inputs
        without variants, so no recompute is needed) and references to q, k, v, out and
        the variant arrays (not copies: change them and the gradients change).
    """
    from .api import _forward

    ops = [arrays.intake(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v"))]
    problem, views = _validate(*ops, layout)
    causal = _check_flag(causal, "causal")
    deterministic = _check_flag(deterministic, "deterministic")
    scale = _check_scale(scale, problem.head_dim)
    options = dict(window=window, softcap=softcap, alibi_slopes=alibi_slopes, bias=bias, mask=mask,
                   dropout_p=dropout_p, seed=seed)
    vargs = variants.check_variants(problem, ops[0].array, causal=causal, **options)
    _check_return_dbias(return_dbias, vargs, problem)
    # plain attention (every variant off) keeps the plain forward and its float64 lse
    given = {name: x for name, x in options.items() if not _is_default(name, x)} if vargs.variant else {}

    host_via_gpu = not problem.on_device and not device.SIMULATOR
    if host_via_gpu:  # keep device copies for the backward, hand NumPy back
        import cupy

        ops = [arrays.Operand(cupy.asarray(op.array), True) for op in ops]
        problem, views = _validate(*ops, layout)
        given = {name: (cupy.asarray(x) if name in ("alibi_slopes", "bias", "mask") else x)
                 for name, x in given.items()}
    saved = [op.array for op in ops]
    if given:  # the variant forward (nbflash.attention) with its lse
        from . import api

        out, lse = api.attention(*saved, causal=causal, scale=scale, layout=layout, return_lse=True, **given)
    elif problem.dtype == arrays.FLOAT64 and min(problem.batch, problem.seqlen_q, problem.heads_q) > 0:
        out = _empty(problem, problem.out_shape(), problem.dtype)
        lse = _float64_lse(problem, views, causal, scale, _bshd(out, layout, problem.squeeze))
        lse = lse[0] if problem.squeeze else lse
    else:
        out, lse = _forward(problem, views, None, causal, scale, True)
    backward_options = dict(given, return_dbias=return_dbias)

    def vjp(do):
        """(dq, dk, dv) (and dbias with return_dbias) for the gradient ``do`` of the loss
        with respect to out."""
        if host_via_gpu:
            import cupy

            if not isinstance(do, np.ndarray):
                raise TypeError(f"do: expected a host array like q; got {type(do).__name__}")
            grads = attention_backward(
                cupy.asarray(do), *saved, out, lse,
                causal=causal, scale=scale, layout=layout, deterministic=deterministic, **backward_options,
            )
            return tuple(g.get() for g in grads)
        return attention_backward(
            do, *saved, out, lse, causal=causal, scale=scale, layout=layout, deterministic=deterministic,
            **backward_options,
        )

    return (out.get() if host_via_gpu else out), vjp


_VARIANT_DEFAULTS = {"window": None, "softcap": 0.0, "alibi_slopes": None, "bias": None, "mask": None,
                     "dropout_p": 0.0, "seed": None}


def _is_default(name, value) -> bool:
    """The variant argument is left at its default (so plain attention's forward runs)."""
    default = _VARIANT_DEFAULTS[name]
    if default is None:
        return value is None
    return not isinstance(value, (np.ndarray,)) and value == default
