"""Plan once, run many: forward attention with the least host work per call.

A prepared call (:class:`_Prepared`) is a validated forward problem whose shapes,
strides, dtypes and flags are fixed: its kernel parameters stay packed, and a call
only checks what can still change (array types, dtypes, devices, pointer alignment,
overlap of ``out``), allocates the outputs and writes five data pointers before one
driver call. ``nbflash.attention`` keeps such calls per signature (a memo), and
:func:`plan` gives callers one for a signature they fix up front.
"""

from __future__ import annotations

import threading

import numpy as np

from . import api, arrays, device, launch, variants

_MEMO_LIMIT = 1024
_memo: dict[tuple, "_Prepared"] = {}
# nbflash._fastlaunch.run where the extension was built: the hot paths below in C (the
# same key, lookup, overlap check, allocation and launch), else None
_hot_run = launch.fast_run()
_ndarray_type = None
_empty = None  # _empty(shape, dtype): a new C-contiguous cupy.ndarray (see _resolve_empty)


def _ndarray():
    """cupy.ndarray (None on the simulator, without CuPy, or with a CuPy whose arrays
    lack the ``_c_contiguous`` flag the call keys read)."""
    global _ndarray_type, _empty
    if _ndarray_type is None:
        cupy = device.cupy_or_none()
        nd = cupy.ndarray if cupy is not None and hasattr(cupy.ndarray, "_c_contiguous") else False
        if nd:
            _empty = _resolve_empty(nd)
        _ndarray_type = nd
    return _ndarray_type or None


def _resolve_empty(nd):
    """What the hot paths allocate outputs with: ``empty(shape, dtype)`` is
    ``cupy.ndarray(shape, dtype)`` (C order, from CuPy's allocator on the current
    stream) without cupy.ndarray's Python-level ``__new__`` (a frame, *args / **kwargs
    packing): the Cython ``_ndarray_base.__new__`` and ``_init`` that it calls. 0.3-0.4
    us less per allocating call (perf/stub_host_path.py). Used only after a probe
    array made both ways agrees in every observable attribute; otherwise (another
    CuPy) ``nd`` itself."""
    try:
        from cupy._core.core import _ndarray_base

        new, init = _ndarray_base.__new__, _ndarray_base._init

        def empty(shape, dtype):
            a = new(nd)
            init(a, shape, dtype)
            return a

        for shape, dtype in (((2, 1, 3), _FLOAT32), ((0, 4), np.dtype(np.float16)), ((), np.dtype(np.float64))):
            a, b = empty(shape, dtype), nd(shape, dtype)
            if not (type(a) is nd and a.shape == b.shape and a.strides == b.strides and a.dtype == b.dtype
                    and a.size == b.size and a.nbytes == b.nbytes and a.base is None and b.base is None
                    and a._c_contiguous == b._c_contiguous and a.flags.owndata == b.flags.owndata
                    and a.flags.f_contiguous == b.flags.f_contiguous
                    and a.data.device_id == b.data.device_id and a.data.mem.size == b.data.mem.size):
                return nd
        return empty
    except Exception:  # a CuPy without these internals
        return nd


def _extent(a):
    """(first, last) byte offsets from a's data pointer that a can touch, or None when empty."""
    if a.size == 0:
        return None
    lo = sum(min(0, s * (n - 1)) for s, n in zip(a.strides, a.shape))
    hi = sum(max(0, s * (n - 1)) for s, n in zip(a.strides, a.shape)) + a.itemsize - 1
    return lo, hi


def _call_key(q, k, v, out):
    """What a prepared call depends on of its CuPy arrays: shapes, strides, dtypes,
    devices, and whether q, k, v start on 16 bytes (the kernel choice reads it).

    A C-contiguous array stands for its strides by True: its shape and itemsize fix
    every stride that matters (CuPy's flag ignores axes of length 1, whose strides no
    index reaches), and reading the flag costs a fifth of building the strides tuple.
    The hot paths (memoized_attention, AttentionPlan.run) build this tuple inline;
    tests check that they build exactly this one."""
    qm, km, vm = q.data, k.data, v.data
    key = (q.shape, q._c_contiguous or q.strides, k.shape, k._c_contiguous or k.strides,
           v.shape, v._c_contiguous or v.strides, q.dtype, k.dtype, v.dtype,
           qm.device_id, km.device_id, vm.device_id, not ((qm.ptr | km.ptr | vm.ptr) & 15))
    if out is not None:
        key += (out.shape, out._c_contiguous or out.strides, out.dtype, out.data.device_id)
    return key


class _Prepared:
    """One validated forward call with fixed shapes and strides, packed for launch."""

    __slots__ = ("go", "out_shape", "dtype", "lse_shape", "with_lse", "keep", "ov", "kernel", "sig",
                 "dev", "memo_key")

    def __init__(self, go, problem, with_lse, keep, extents, kernel, sig, dev):
        # go(stream, q, k, v, out[, lse] data pointers): launch.Bound.fixed, the other
        # array arguments (the dummy lse without with_lse, cu_seqlens) stay as packed
        self.go = go
        self.out_shape = problem.out_shape()
        self.dtype = problem.dtype
        self.lse_shape = problem.lse_shape()
        self.with_lse = with_lse
        self.keep = keep  # the arrays behind the packed pointers go() never rewrites
        # A caller's out overlaps input i exactly when (input i's pointer - out's
        # pointer) lies in [lo_i, hi_i]: ov = (lo_q, hi_q, lo_k, hi_k, lo_v, hi_v), an
        # empty range (1, 0) for an empty input; None when out is empty.
        out_ext = extents[3]
        self.ov = None
        if out_ext is not None:
            ov = []
            for ext in extents[:3]:
                ov += (1, 0) if ext is None else (out_ext[0] - ext[1], out_ext[1] - ext[0])
            self.ov = tuple(ov)
        self.kernel = kernel
        self.sig = sig
        self.dev = dev
        self.memo_key = None

    def overlap_error(self, out_ptr, qp, kp, vp):
        """The ValueError for an out the hot paths found overlapping an input (they
        test ``ov`` inline)."""
        ov = self.ov
        for i, p in enumerate((qp, kp, vp)):
            if ov[2 * i] <= p - out_ptr <= ov[2 * i + 1]:
                return ValueError(f"out: overlaps {'qkv'[i]} in memory; pass a separate buffer")
        raise AssertionError("no overlap")

    def allocate(self, out, with_lse, stream):
        """(stream handle, out, lse): out allocated when None, lse when ``with_lse``
        (else None), on ``stream``'s memory pool (None: CuPy's current stream, no
        stream switch)."""
        lse = None
        if stream is None:
            sp = _get_current_stream().ptr
            if out is None:
                out = _empty(self.out_shape, self.dtype)
            if with_lse:
                lse = _empty(self.lse_shape, _FLOAT32)
        else:
            sp = launch.stream_handle(stream)
            with _allocation_stream(stream, sp):
                if out is None:
                    out = _empty(self.out_shape, self.dtype)
                if with_lse:
                    lse = _empty(self.lse_shape, _FLOAT32)
        return sp, out, lse

    def run(self, qp, kp, vp, out, with_lse, stream):
        """Allocate what is missing and launch; (out, lse), or None when the fast
        launch failed (nothing launched; the caller takes the validated slow path).
        ``with_lse`` is the entry's own (its key holds return_lse). The hot paths
        inline this for stream=None."""
        sp, out, lse = self.allocate(out, with_lse, stream)
        try:
            if lse is None:
                self.go(sp, qp, kp, vp, out.data.ptr)
            else:
                self.go(sp, qp, kp, vp, out.data.ptr, lse.data.ptr)
        except launch.LaunchError as error:
            self.disable(error)
            return None
        return out, lse

    def disable(self, error):
        if self.memo_key is not None:
            _memo.pop(self.memo_key, None)
        launch._disable(self.kernel, self.sig, self.dev, error)


_FLOAT32 = np.dtype(np.float32)


def _get_current_stream():
    """cupy.cuda.get_current_stream(), resolved on first use."""
    import cupy

    global _get_current_stream
    _get_current_stream = cupy.cuda.get_current_stream
    return _get_current_stream()


_cupy_stream_type = None


def _allocation_stream(stream, ptr):
    """A context making CuPy allocate on the launch stream (its pool reuses memory per
    stream): a CuPy stream is its own context; any other stream's CuPy object is made
    once per handle (launch.cupy_stream). cupy.cuda.Stream is resolved once (an import
    statement per call costs ~0.1 us)."""
    global _cupy_stream_type
    if _cupy_stream_type is None:
        import cupy

        _cupy_stream_type = cupy.cuda.Stream
    if isinstance(stream, _cupy_stream_type):
        return stream
    return launch.cupy_stream(ptr)


def _prepare(problem, spec, views, out_view, lse, scale, dev, var=variants.NO_VARIANTS):
    """A _Prepared for this validated call (None where only Numba's launch can run it);
    ``var``: the call's variants.VariantArgs (window and softcap values packed for good)."""
    kernel, grid, args, shared = api.forward_launch_args(problem, spec, views, out_view, lse, scale, var)
    launcher = launch.launcher_for(kernel, args, shared)
    if launcher is None:
        return None, (kernel, grid, args, shared)
    sig = launch.signature_of(args)
    try:
        # go() rewrites q, k, v, out (and lse when returned); the dummies stay packed
        go = launcher.bind(args).fixed(grid, (spec.threads, 1, 1), shared, varying=5 if lse is not None else 4)
    except launch.LaunchError as error:  # e.g. the shared-memory opt-in: Numba's launch reports it
        launch._disable(kernel, sig, dev, error)
        return None, (kernel, grid, args, shared)
    extents = [_extent(a) for a in (*views, out_view)]
    with_lse = lse is not None
    # the dummies behind packed pointers (lse, cu_seqlens, variants off) stay alive; the
    # caller's ALiBi slopes do not: a hit passes an array at that address (variant_key),
    # and pinning them would keep CuPy's pool from handing the same address to a caller
    # who makes the slopes afresh each call
    keep = tuple(a for a in args[4 + with_lse:]
                 if type(a) is launch.DeviceArg and (var.alibi is None or a.owner is not var.alibi))
    prepared = _Prepared(go, problem, with_lse, keep, extents, kernel, sig, dev)
    return prepared, (kernel, grid, args, shared)


# ---------------------------------------------------------------------------
# The memo behind nbflash.attention
# ---------------------------------------------------------------------------


def _memo_key(q, k, v, causal, scale, layout, return_lse, out, variant=None):
    """Everything validation and dispatch depend on, or None when a call is not of the
    memoizable kind (CuPy arrays, bool flags, a float / int / None scale, str layout);
    ``variant``: variant_key's part for a call with window / softcap / ALiBi, else None."""
    nd = _ndarray()
    if nd is None or type(q) is not nd or type(k) is not nd or type(v) is not nd:
        return None
    if type(causal) is not bool or type(return_lse) is not bool or type(layout) is not str:
        return None
    if not (scale is None or type(scale) is float or type(scale) is int):
        return None
    if out is not None and type(out) is not nd:
        return None
    return (layout, causal, scale, return_lse, variant) + _call_key(q, k, v, out)


def variant_key(window, softcap, alibi_slopes):
    """The memo key's part for a call whose only variants are a window, a softcap and /
    or ALiBi slopes given as a window tuple of two ints, a float or int softcap, and a
    CuPy array: (window, softcap, and the slopes' pointer, shape, strides, dtype and
    device); None for a plain call or any other form (those are validated every time).
    The slopes' validation depends on those alone, and a hit requires an array at the
    same address, so the launch packed at the first call reads the caller's slopes."""
    if window is None and (softcap is None or softcap == 0) and alibi_slopes is None:
        return None
    if window is not None and not (type(window) is tuple and len(window) == 2 and type(window[0]) is int
                                   and type(window[1]) is int):
        return None
    if softcap is not None and type(softcap) is not float and type(softcap) is not int:
        return None
    slopes = None
    if alibi_slopes is not None:
        nd = _ndarray()
        if nd is None or type(alibi_slopes) is not nd:
            return None
        memory = alibi_slopes.data
        slopes = (memory.ptr, alibi_slopes.shape, alibi_slopes.strides, alibi_slopes.dtype, memory.device_id)
    return window, softcap, slopes


def memoized_attention(q, k, v, causal, scale, layout, return_lse, out, stream, variant=None):
    """What nbflash.attention returns (out, or (out, lse) with return_lse) when this
    call repeats a remembered signature, else None (nothing launched).

    The key of :func:`_memo_key`, built inline, and _Prepared.run inlined for CuPy's
    current stream: this runs on every call, and each attribute read and frame counts
    (perf/stub_host_path.py)."""
    nd = _ndarray_type
    if nd is None:
        nd = _ndarray()
    if (
        not nd or type(q) is not nd or type(k) is not nd or type(v) is not nd
        or type(causal) is not bool or type(return_lse) is not bool or type(layout) is not str
        or not (scale is None or type(scale) is float or type(scale) is int)
    ):
        return None
    if _hot_run is not None and stream is None and not return_lse:
        try:
            got = _hot_run(_memo, (layout, causal, scale, return_lse, variant), q, k, v, out, nd, _empty,
                           _get_current_stream)
        except launch.LaunchError as error:  # nothing launched: the validated path from now on
            entry = _memo.get(_memo_key(q, k, v, causal, scale, layout, return_lse, out, variant))
            if entry is not None:
                entry.disable(error)
            return None
        if got is not None:
            return got
    qm = q.data
    km = k.data
    vm = v.data
    qp = qm.ptr
    kp = km.ptr
    vp = vm.ptr
    if out is None:
        entry = _memo.get((layout, causal, scale, return_lse, variant, q.shape, q._c_contiguous or q.strides,
                           k.shape, k._c_contiguous or k.strides, v.shape, v._c_contiguous or v.strides,
                           q.dtype, k.dtype, v.dtype, qm.device_id, km.device_id, vm.device_id,
                           not ((qp | kp | vp) & 15)))
        if entry is None:
            return None
        if stream is not None:
            result = entry.run(qp, kp, vp, None, return_lse, stream)
            return result if result is None or return_lse else result[0]
        out = _empty(entry.out_shape, entry.dtype)
        op = out.data.ptr
    else:
        if type(out) is not nd:
            return None
        om = out.data
        entry = _memo.get((layout, causal, scale, return_lse, variant, q.shape, q._c_contiguous or q.strides,
                           k.shape, k._c_contiguous or k.strides, v.shape, v._c_contiguous or v.strides,
                           q.dtype, k.dtype, v.dtype, qm.device_id, km.device_id, vm.device_id,
                           not ((qp | kp | vp) & 15),
                           out.shape, out._c_contiguous or out.strides, out.dtype, om.device_id))
        if entry is None:
            return None
        op = om.ptr
        ov = entry.ov
        if ov is not None and (ov[0] <= qp - op <= ov[1] or ov[2] <= kp - op <= ov[3] or ov[4] <= vp - op <= ov[5]):
            raise entry.overlap_error(op, qp, kp, vp)
        if stream is not None:
            result = entry.run(qp, kp, vp, out, return_lse, stream)
            return result if result is None or return_lse else result[0]
    sp = _get_current_stream().ptr
    try:
        if return_lse:
            lse = _empty(entry.lse_shape, _FLOAT32)
            entry.go(sp, qp, kp, vp, op, lse.data.ptr)
            return out, lse
        entry.go(sp, qp, kp, vp, op)
        return out
    except launch.LaunchError as error:
        entry.disable(error)
        return None


def remember(q, k, v, causal, scale, layout, return_lse, out, problem, views, result, var=variants.NO_VARIANTS,
             variant=None):
    """After a validated device call: keep its prepared launch for the next call with
    the same signature (``variant`` and ``var``: variant_key's part and the
    validated variants of a window / softcap / ALiBi call)."""
    if problem.seqlen_q == 0 or problem.batch == 0 or problem.heads_q == 0:
        return
    key = _memo_key(q, k, v, causal, scale, layout, return_lse, out, variant)
    if key is None or key in _memo:
        return
    out_array, lse = result
    spec = api.choose_forward_spec(problem, causal, return_lse, views, var.variant)
    out_view = api._bshd(out_array, problem.layout, problem.squeeze)
    scale_value = api._check_scale(scale, problem.head_dim)
    prepared, _ = _prepare(problem, spec, views, out_view, lse, scale_value, arrays.device_id(views[0]), var)
    if prepared is None:
        return
    prepared.memo_key = key
    if len(_memo) >= _MEMO_LIMIT:
        _memo.clear()
    _memo[key] = prepared


def forget():
    """Drop every remembered call, the backward's too (after tile configurations change)."""
    _memo.clear()
    _varlen_memo.clear()
    from . import backward_plans

    backward_plans.forget()


# ---------------------------------------------------------------------------
# The memo behind nbflash.attention_varlen(check_seqlens=False) (serving loops)
# ---------------------------------------------------------------------------

_varlen_memo: dict[tuple, tuple] = {}  # key -> (_Prepared, data pointer of the dummy lse)


def varlen_key(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, causal, scale, return_lse, out):
    """What an attention_varlen call with check_seqlens=False and no variant depends
    on, or None when it is not of the memoizable kind (CuPy arrays, cu_seqlens
    included; bool flags; int max_seqlen_q; int or None max_seqlen_k; a float / int /
    None scale). The values of cu_seqlens are not in it: such a call never reads them
    on the host; their shape, strides, dtype and device are."""
    nd = _ndarray_type
    if nd is None:
        nd = _ndarray()
    if (
        not nd or type(q) is not nd or type(k) is not nd or type(v) is not nd
        or type(cu_q) is not nd or type(cu_k) is not nd
        or type(causal) is not bool or type(return_lse) is not bool or type(max_seqlen_q) is not int
        or not (max_seqlen_k is None or type(max_seqlen_k) is int)
        or not (scale is None or type(scale) is float or type(scale) is int)
        or (out is not None and type(out) is not nd)
    ):
        return None
    return (causal, scale, return_lse, max_seqlen_q, max_seqlen_k,
            cu_q.shape, cu_q._c_contiguous or cu_q.strides, cu_q.dtype, cu_q.data.device_id,
            cu_k.shape, cu_k._c_contiguous or cu_k.strides, cu_k.dtype, cu_k.data.device_id) + _call_key(q, k, v, out)


def memoized_varlen(key, q, k, v, cu_q, cu_k, out, return_lse, stream):
    """What attention_varlen returns when ``key`` (:func:`varlen_key`) was remembered,
    else None (nothing launched): the out overlap check, the allocations, seven data
    pointers written and one driver call."""
    found = _varlen_memo.get(key)
    if found is None:
        return None
    entry, lse_dummy = found
    qp = q.data.ptr
    kp = k.data.ptr
    vp = v.data.ptr
    if out is not None:
        op = out.data.ptr
        ov = entry.ov
        if ov is not None and (ov[0] <= qp - op <= ov[1] or ov[2] <= kp - op <= ov[3] or ov[4] <= vp - op <= ov[5]):
            raise entry.overlap_error(op, qp, kp, vp)
    sp, out, lse = entry.allocate(out, return_lse, stream)
    try:
        entry.go(sp, qp, kp, vp, out.data.ptr, lse_dummy if lse is None else lse.data.ptr, cu_q.data.ptr,
                 cu_k.data.ptr)
    except launch.LaunchError as error:
        _varlen_memo.pop(key, None)
        launch._disable(entry.kernel, entry.sig, entry.dev, error)
        return None
    return (out, lse) if return_lse else out


def remember_varlen(key, problem, views, out_view, with_lse, kernel, grid, threads, args, shared):
    """After a validated varlen launch (``args`` as launched: q, k, v, out, lse, scale,
    group, cu_seqlens_q, cu_seqlens_k, variant arguments): keep it for the next call
    under ``key``. Every call rewrites the first seven array pointers (q, k, v, out,
    lse or its dummy, both cu_seqlens); the variant dummies stay packed."""
    if key in _varlen_memo:
        return
    launcher = launch.launcher_for(kernel, args, shared)
    if launcher is None:
        return
    sig = launch.signature_of(args)
    dev = arrays.device_id(views[0])
    try:
        go = launcher.bind(args).fixed(grid, (threads, 1, 1), shared, varying=7)
    except launch.LaunchError as error:
        launch._disable(kernel, sig, dev, error)
        return
    extents = [_extent(a) for a in (*views, out_view)]
    keep = tuple(a for a in args[4:] if type(a) is launch.DeviceArg)  # the dummies behind packed pointers
    entry = _Prepared(go, problem, with_lse, keep, extents, kernel, sig, dev)
    if len(_varlen_memo) >= _MEMO_LIMIT:
        _varlen_memo.clear()
    _varlen_memo[key] = (entry, None if with_lse else args[4].ptr)


# ---------------------------------------------------------------------------
# Plans
# ---------------------------------------------------------------------------


class AttentionPlan:
    """A forward-attention signature fixed once; call it (or ``run``) many times.

    Fixed by the plan: dtype, head_dim, head_dim_v, heads_q, heads_kv, layout, number
    of dims (3 or 4), device, causal, scale, return_lse, and so the kernel
    specialization (``plan.spec``, named by ``plan.spec.key``). May vary between calls:
    batch, seqlen_q, seqlen_k, strides (the head_dim axis keeps unit stride; a
    tensor-core plan needs 16-byte aligned rows) and the buffers themselves. A call
    whose shapes and strides repeat an earlier one's writes five pointers and makes
    one driver call; a new shape is validated in full once, then remembered.
    """

    def __init__(self, q, k, v, *, causal=False, scale=None, layout="bshd", return_lse=False):
        _ndarray()  # resolve cupy.ndarray once, for run's type checks
        ops = [arrays.intake(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v"))]
        problem, views = api._validate(*ops, layout)
        self.causal = api._check_flag(causal, "causal")
        self.return_lse = api._check_flag(return_lse, "return_lse")
        self.scale = api._check_scale(scale, problem.head_dim)
        self.layout = layout
        self.dtype = problem.dtype
        self.head_dim, self.head_dim_v = problem.head_dim, problem.head_dim_v
        self.heads_q, self.heads_kv = problem.heads_q, problem.heads_kv
        self.ndim = 3 if problem.squeeze else 4
        self.on_device = problem.on_device
        self.device = arrays.device_id(views[0]) if problem.on_device else None
        self.spec = api.choose_forward_spec(problem, self.causal, self.return_lse, views)
        self._aligned = self.spec.kernel != "simt"  # cp.async: 16-byte aligned rows
        self._entries: dict[tuple, _Prepared] = {}
        self._lock = threading.Lock()
        if problem.on_device and problem.batch and problem.seqlen_q and problem.heads_q:
            launch.compiled(self.spec)
            self._shape_entry(problem, views, [op.array for op in ops], None, None, None)  # compiles now

    def __repr__(self):
        return (f"AttentionPlan({self.spec.key}, dtype={arrays.short_name(self.dtype)}, "
                f"heads={self.heads_q}/{self.heads_kv}, layout={self.layout!r}, "
                f"scale={self.scale:.6g}, return_lse={self.return_lse})")

    def run(self, q, k, v, out=None, stream=None):
        """Attention of q, k, v under the plan; arguments, shapes and the return
        value as :func:`nbflash.attention` (``out`` and ``stream`` as there)."""
        nd = _ndarray_type
        if nd and _hot_run is not None and stream is None and not self.return_lse:
            try:
                got = _hot_run(self._entries, (), q, k, v, out, nd, _empty, _get_current_stream)
            except launch.LaunchError as error:  # nothing launched: drop the entries, validate this call
                entry = self._entries.get(_call_key(q, k, v, out))
                if entry is not None:
                    entry.disable(error)
                self._entries.clear()
                return self._run_checked(q, k, v, out, stream)
            if got is not None:
                return got
        if nd and type(q) is nd and type(k) is nd and type(v) is nd:
            # a remembered shape: the key of _call_key, built inline (dtype, device and
            # alignment are in it, so any change misses and _run_checked explains it)
            qm = q.data
            km = k.data
            vm = v.data
            qp = qm.ptr
            kp = km.ptr
            vp = vm.ptr
            entry = None
            if out is None:
                entry = self._entries.get((
                    q.shape, q._c_contiguous or q.strides, k.shape, k._c_contiguous or k.strides,
                    v.shape, v._c_contiguous or v.strides, q.dtype, k.dtype, v.dtype,
                    qm.device_id, km.device_id, vm.device_id, not ((qp | kp | vp) & 15)))
                if entry is not None and stream is None:
                    out = _empty(entry.out_shape, entry.dtype)
                    op = out.data.ptr
            elif type(out) is nd:
                om = out.data
                entry = self._entries.get((
                    q.shape, q._c_contiguous or q.strides, k.shape, k._c_contiguous or k.strides,
                    v.shape, v._c_contiguous or v.strides, q.dtype, k.dtype, v.dtype,
                    qm.device_id, km.device_id, vm.device_id, not ((qp | kp | vp) & 15),
                    out.shape, out._c_contiguous or out.strides, out.dtype, om.device_id))
                if entry is not None:
                    op = om.ptr
                    ov = entry.ov
                    if ov is not None and (ov[0] <= qp - op <= ov[1] or ov[2] <= kp - op <= ov[3]
                                           or ov[4] <= vp - op <= ov[5]):
                        raise entry.overlap_error(op, qp, kp, vp)
            if entry is not None:
                if stream is None:
                    try:
                        if self.return_lse:
                            lse = _empty(entry.lse_shape, _FLOAT32)
                            entry.go(_get_current_stream().ptr, qp, kp, vp, op, lse.data.ptr)
                            return out, lse
                        entry.go(_get_current_stream().ptr, qp, kp, vp, op)
                        return out
                    except launch.LaunchError as error:
                        entry.disable(error)
                else:
                    result = entry.run(qp, kp, vp, out, self.return_lse, stream)
                    if result is not None:
                        return result if self.return_lse else result[0]
                self._entries.clear()
        return self._run_checked(q, k, v, out, stream)

    __call__ = run  # one Python frame less per call than a method calling run

    def _check_fixed(self, problem, views):
        """The plan's fixed dimensions against a call's (clear errors, nothing launched)."""
        names = arrays.short_name
        if problem.dtype != self.dtype:
            raise TypeError(f"q: dtype {names(problem.dtype)} differs from the plan's {names(self.dtype)}")
        ndim = 3 if problem.squeeze else 4
        if ndim != self.ndim:
            raise ValueError(f"q, k, v: {ndim} dims; the plan was made for {self.ndim}")
        for name, got, want in (
            ("q: head_dim", problem.head_dim, self.head_dim),
            ("v: head_dim", problem.head_dim_v, self.head_dim_v),
            ("q: heads", problem.heads_q, self.heads_q),
            ("k: heads", problem.heads_kv, self.heads_kv),
        ):
            if got != want:
                raise ValueError(f"{name} {got} differs from the plan's {want}")
        if problem.on_device != self.on_device:
            where = "device" if self.on_device else "host"
            raise TypeError(f"q, k, v: the plan was made for {where} arrays")
        if problem.on_device and arrays.device_id(views[0]) != self.device:
            raise ValueError(f"q: on device {arrays.device_id(views[0])}; the plan is for device {self.device}")
        if self._aligned and not all(api._rows_16_byte_aligned(a) for a in views):
            bad = [n for n, a in zip(("q", "k", "v"), views) if not api._rows_16_byte_aligned(a)]
            raise ValueError(
                f"{', '.join(bad)}: the plan's tensor-core kernel ({self.spec.key}) needs 16-byte "
                f"aligned rows (data pointer and strides); make a plan from these arrays, or "
                f"call nbflash.attention"
            )

    def _run_checked(self, q, k, v, out, stream):
        """Full validation, the plan's checks, one launch; remembers the shape."""
        stream_ptr = launch.stream_handle(stream) if stream is not None else None
        ops = [arrays.intake(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v"))]
        problem, views = api._validate(*ops, self.layout)
        self._check_fixed(problem, views)
        out_op = api._check_out(out, problem, [op.array for op in ops]) if out is not None else None
        if not problem.on_device and not device.SIMULATOR:  # NumPy inputs on a GPU machine
            result = api._forward_via_gpu(problem, ops, out_op, self.causal, self.scale, self.return_lse, stream_ptr)
            return result if self.return_lse else result[0]
        with api._on_stream(stream_ptr):
            out_array = out_op[0].array if out_op is not None else api._empty(problem, problem.out_shape(), problem.dtype)
            lse = api._empty(problem, problem.lse_shape(), np.float32) if self.return_lse else None
        if problem.seqlen_q and problem.batch and problem.heads_q:
            out_view = out_op[1] if out_op is not None else api._bshd(out_array, problem.layout, problem.squeeze)
            kernel, grid, args, shared = self._shape_entry(
                problem, views, [op.array for op in ops], out_view, lse, out_op[0].array if out_op else None
            )
            launch.launch(kernel, grid, self.spec.threads, args, shared, stream_ptr)
        return (out_array, lse) if self.return_lse else out_array

    def capture(self, q, k, v, out=None) -> "AttentionGraph":
        """Capture the plan's launch on fixed buffers into a CUDA graph, for hot loops
        whose arrays never move (decoding with a static cache, a fixed layer).

        ``q``, ``k``, ``v`` and ``out`` as in :meth:`run` (checked the same way, with
        the same errors, before anything is captured); ``out`` None: one output
        buffer is allocated now (and one lse buffer with return_lse). Returns an
        :class:`AttentionGraph`: ``g()`` (or ``g(stream=...)``) replays the launch
        with one cudaGraphLaunch and returns the same buffers every time (out, or
        (out, lse)), computed from what q, k, v hold when the replay runs. Nothing
        is checked per replay: the arrays must stay alive (the graph keeps
        references to them) and their contents may change, but a new shape or new
        buffer needs a new capture. The graph replays on the plan's device.

        On Numba's simulator there are no graphs: a replay launches the kernel
        into the same buffers (the same results, none of the speed)."""
        ops = [arrays.intake(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v"))]
        problem, views = api._validate(*ops, self.layout)
        self._check_fixed(problem, views)
        out_op = api._check_out(out, problem, [op.array for op in ops]) if out is not None else None
        if not problem.on_device and not device.SIMULATOR:
            raise TypeError("q, k, v: a captured graph needs device (CuPy) arrays; got NumPy arrays")
        out_array = out_op[0].array if out_op is not None else api._empty(problem, problem.out_shape(), problem.dtype)
        lse = api._empty(problem, problem.lse_shape(), np.float32) if self.return_lse else None
        result = (out_array, lse) if self.return_lse else out_array
        keep = (ops, out_array, lse)
        if not (problem.seqlen_q and problem.batch and problem.heads_q):
            return AttentionGraph(self, None, None, result, keep)
        out_view = out_op[1] if out_op is not None else api._bshd(out_array, problem.layout, problem.squeeze)
        launch_args = self._shape_entry(problem, views, [op.array for op in ops], out_view, lse,
                                        out_op[0].array if out_op else None)
        if device.SIMULATOR:
            return AttentionGraph(self, None, launch_args, result, keep)
        import cupy

        kernel, grid, args, shared = launch_args
        with cupy.cuda.Device(self.device):
            stream = cupy.cuda.Stream(non_blocking=True)  # capture needs a stream other than the legacy one
            stream.begin_capture()
            try:
                launch.launch(kernel, grid, self.spec.threads, args, shared, stream.ptr)
            finally:
                graph = stream.end_capture()
            graph.upload(cupy.cuda.get_current_stream())
        return AttentionGraph(self, graph, launch_args, result, keep)

    def _shape_entry(self, problem, views, qkv, out_view, lse, out):
        """Prepare (and, on a GPU, remember) this shape; the launch arguments. ``qkv``
        and ``out`` are the caller's arrays (they key the entry), ``out_view`` the
        kernel's view of the output (None: a scratch one, for its strides)."""
        if out_view is None:
            out_view = api._bshd(api._empty(problem, problem.out_shape(), problem.dtype), problem.layout, problem.squeeze)
        if self.return_lse and lse is None:
            lse = api._empty(problem, problem.lse_shape(), np.float32)
        prepared, launch_args = _prepare(problem, self.spec, views, out_view, lse, self.scale, self.device)
        if prepared is not None:
            key = _call_key(*qkv, out)
            with self._lock:
                if len(self._entries) >= 64:
                    self._entries.clear()
                self._entries[key] = prepared
        return launch_args


class AttentionGraph:
    """One plan launch on fixed buffers, captured as a CUDA graph (see
    :meth:`AttentionPlan.capture`): call it to replay. ``out`` (and ``lse`` with
    return_lse) are the buffers every replay writes and returns."""

    __slots__ = ("plan", "graph", "out", "lse", "_exec", "_launch_args", "_result", "_keep")

    def __init__(self, plan, graph, launch_args, result, keep):
        self.plan = plan
        self.graph = graph  # cupy.cuda.graph.Graph (None: no launch to replay, or the simulator)
        self._exec = graph.graphExec if graph is not None else None
        self._launch_args = launch_args  # the kernel arguments: their DeviceArgs keep the dummies alive
        self._result = result
        self.out, self.lse = (result if plan.return_lse else (result, None))
        self._keep = keep

    def __repr__(self):
        kind = "CUDA graph" if self.graph is not None else "no graph (simulator)" if self._launch_args else "empty"
        return f"AttentionGraph({self.plan.spec.key}, out {tuple(self.out.shape)}, {kind})"

    def __call__(self, stream=None):
        """Replay on ``stream`` (default CuPy's current stream; any stream as
        :func:`nbflash.attention` takes); returns out, or (out, lse)."""
        ex = self._exec
        if ex is not None:
            _graph_launch(ex, _get_current_stream().ptr if stream is None else launch.stream_handle(stream))
        elif self._launch_args is not None:
            kernel, grid, args, shared = self._launch_args
            launch.launch(kernel, grid, self.plan.spec.threads, args, shared,
                          None if stream is None else launch.stream_handle(stream))
        return self._result

    replay = __call__


def _graph_launch(graph_exec, stream_ptr):
    """cudaGraphLaunch through CuPy's Cython binding, resolved on first use."""
    from cupy_backends.cuda.api.runtime import graphLaunch

    global _graph_launch
    _graph_launch = graphLaunch
    graphLaunch(graph_exec, stream_ptr)


def plan(q, k, v, *, causal=False, scale=None, layout="bshd", return_lse=False) -> AttentionPlan:
    """Fix a forward-attention signature once; run it many times with the least host work.

    ``q``, ``k``, ``v`` are example arrays with the shapes, dtypes and layout of the
    calls to come (arguments as :func:`nbflash.attention`: q (batch, seqlen_q,
    heads_q, head_dim) for "bshd" or (batch, heads_q, seqlen_q, head_dim) for "bhsd",
    k (..., seqlen_k, heads_kv, head_dim), v (..., seqlen_k, heads_kv, head_dim_v);
    float16, bfloat16, float32 or float64; 3-D without the batch axis also works).
    The kernel is compiled (or loaded from the disk cache) now.

    Returns an :class:`AttentionPlan`: ``plan(q, k, v, out=None, stream=None)`` or
    ``plan.run(...)`` returns what :func:`nbflash.attention` would (out, and lse with
    ``return_lse``); ``plan.capture(q, k, v, out=None)`` records the launch on fixed
    buffers as a CUDA graph whose replays cost one cudaGraphLaunch
    (:class:`AttentionGraph`). dtype, head_dim, head_dim_v, heads_q, heads_kv, number of dims,
    device, layout, causal, scale and return_lse are fixed; batch, seqlen_q, seqlen_k
    and strides may vary (a tensor-core plan needs 16-byte aligned rows). Inputs that
    do not match raise ValueError / TypeError naming the argument, before anything runs.
    """
    return AttentionPlan(q, k, v, causal=causal, scale=scale, layout=layout, return_lse=return_lse)

