"""Repeated backward calls with the least host work: the memo behind
nbflash.attention_backward.

The first validated call of a signature (plain attention on a tensor-core family,
CuPy arrays, every data pointer 16-byte aligned) records its launches; a later call
with the same signature only checks what can still change (array types, pointer
alignment, overlap of the gradients it is given), allocates outputs and scratch, and
replays the recorded launches with its own data pointers (launch.Bound.fixed),
skipping validation, dispatch and argument packing (~0.3 ms of Python per call).
"""

from __future__ import annotations

import threading

from . import arrays, launch, plans

_MEMO_LIMIT = 256
_memo: dict[tuple, "_Replay"] = {}
_refused: set = set()  # keys whose replay failed once: always the validated path
_lock = threading.Lock()

# The per-call buffers a recorded launch may name, in the order _Replay.run gathers
# their data pointers.
BUFFERS = ("q", "k", "v", "do", "out", "lse", "dq", "dk", "dv", "delta", "dq_acc")
_INDEX = {name: i for i, name in enumerate(BUFFERS)}
_INPUTS = ("q", "k", "v", "do", "out", "lse")


class Recording:
    """The launches of one validated backward call, for the memo: each kernel with
    its grid, block, shared bytes and packed arguments, the names (from BUFFERS) of
    the per-call buffers its leading array arguments are, and the scratch buffers
    the call allocated (name -> array)."""

    def __init__(self):
        self.launches = []
        self.scratch = {}

    def launch(self, kernel, grid, threads, args, shared, names):
        """Launch as launch.launch does, and remember it; ``names`` label ``args``'
        first len(names) array arguments."""
        launch.launch(kernel, grid, threads, args, shared)
        self.launches.append((kernel, grid, threads, args, shared, tuple(names)))

    def allocated(self, name, array, zeroed):
        """A per-call scratch buffer (``zeroed``: its contents must start at 0)."""
        self.scratch[name] = (array, zeroed)


def launch_named(recording, kernel, grid, threads, args, shared, names):
    """launch.launch, also reported to ``recording`` (a Recording, or None) with the
    names (from BUFFERS) of ``args``' first len(names) array arguments."""
    if recording is None:
        launch.launch(kernel, grid, threads, args, shared)
    else:
        recording.launch(kernel, grid, threads, args, shared, names)


def _signature(a):
    return None if a is None else (a.shape, a._c_contiguous or a.strides, a.dtype, a.data.device_id)


def memo_key(do, q, k, v, out, lse, dq, dk, dv, causal, scale, layout, deterministic):
    """Everything validation and dispatch read of a plain backward call, or None when
    the call is not of the memoizable kind (CuPy arrays with 16-byte aligned data
    pointers, bool flags, a float / int / None scale, str layout)."""
    nd = plans._ndarray()
    if nd is None:
        return None
    inputs = (q, k, v, do, out, lse)
    grads = (dq, dk, dv)
    if any(type(a) is not nd for a in inputs) or any(g is not None and type(g) is not nd for g in grads):
        return None
    if type(causal) is not bool or type(deterministic) is not bool or type(layout) is not str:
        return None
    if not (scale is None or type(scale) is float or type(scale) is int):
        return None
    ptrs = 0
    for a in inputs + grads:
        if a is not None:
            ptrs |= a.data.ptr
    if ptrs & 15:
        return None
    return (layout, causal, scale, deterministic) + tuple(_signature(a) for a in inputs + grads)


def _zero(array):
    """Zero a scratch buffer on CuPy's current stream (as cupy.zeros does)."""
    array.data.memset_async(0, array.nbytes)


class _Replay:
    """One recorded backward call: its launches as prepared launch functions, and
    what a call allocates."""

    __slots__ = ("steps", "grad_shapes", "dtype", "scratch", "extents", "keep")

    def __init__(self, steps, grad_shapes, dtype, scratch, extents, keep):
        self.steps = steps  # ((go, indices into BUFFERS of its varying pointers), ...)
        self.grad_shapes = grad_shapes  # dq, dk, dv shapes (the caller's layout)
        self.dtype = dtype
        self.scratch = scratch  # ((index, shape, dtype, zeroed), ...)
        self.extents = extents  # name -> (lo, hi) byte offsets, for the overlap checks
        self.keep = keep  # the dummies behind the packed pointers (DeviceArgs holding them)

    def run(self, do, q, k, v, out, lse, grads):
        """Allocate, check the given gradients for overlap, launch; (dq, dk, dv).
        Raises ValueError (nothing launched) for an overlapping gradient, and
        launch.LaunchError (some launches may have run) when the driver refuses."""
        given = {}
        for name, g in zip(("dq", "dk", "dv"), grads):
            if g is not None:
                given[name] = g
        if given:
            self._check_overlap(dict(zip(_INPUTS, (q, k, v, do, out, lse))), given)
        empty = plans._empty
        result = []
        for g, shape in zip(grads, self.grad_shapes):
            result.append(empty(shape, self.dtype) if g is None else g)
        ptrs = [q.data.ptr, k.data.ptr, v.data.ptr, do.data.ptr, out.data.ptr, lse.data.ptr,
                result[0].data.ptr, result[1].data.ptr, result[2].data.ptr, 0, 0]
        for index, shape, dtype, zeroed in self.scratch:
            buffer = empty(shape, dtype)
            if zeroed:
                _zero(buffer)
            ptrs[index] = buffer.data.ptr
            result.append(buffer)  # alive until the launches are queued (the pool orders reuse)
        sp = plans._get_current_stream().ptr
        for go, indices in self.steps:
            go(sp, *[ptrs[i] for i in indices])
        return result[0], result[1], result[2]

    def _check_overlap(self, inputs, given):
        """The validated path's rule: a given gradient overlaps no input and no other
        given gradient (checked in that order, named as it names them)."""
        ext = self.extents

        def span(name, a):
            p = a.data.ptr
            lo, hi = ext[name]
            return p + lo, p + hi

        spans = {name: span(name, a) for name, a in inputs.items()}
        for name, g in given.items():
            here = span(name, g)
            for other, there in spans.items():
                if arrays.ranges_overlap(here, there):
                    raise ValueError(f"{name}: overlaps {other} in memory; pass a separate buffer")
            spans[name] = here


def memoized_backward(key, do, q, k, v, out, lse, dq, dk, dv):
    """(dq, dk, dv) when ``key`` (from :func:`memo_key`) names a remembered call,
    else None (nothing launched, or a replay the driver refused: the caller then
    takes the validated path, which rewrites every output)."""
    entry = _memo.get(key)
    if entry is None:
        return None
    try:
        return entry.run(do, q, k, v, out, lse, (dq, dk, dv))
    except launch.LaunchError:
        with _lock:
            _memo.pop(key, None)
            _refused.add(key)
        return None


def remember(key, recording: Recording, buffers: dict, problem_dtype):
    """After a validated call on a GPU: keep its launches for the next call with the
    same key. ``buffers``: the call's arrays by BUFFERS name (q ... dv as the caller
    sees them). Nothing is kept where a launch has no prepared launcher, or where a
    recorded launch's named arguments are not the named buffers (then the names
    would send the wrong pointers)."""
    if key is None or key in _memo or key in _refused or not recording.launches:
        return
    everything = dict(buffers)
    for name, (array, _) in recording.scratch.items():
        everything[name] = array
    if any(a.size == 0 for a in everything.values()):
        return
    ptrs = {name: a.data.ptr for name, a in everything.items()}
    per_call = set(ptrs.values())
    if len(per_call) != len(ptrs):  # q is k, say: a name could not tell them apart
        return
    steps = []
    for kernel, grid, threads, args, shared, names in recording.launches:
        fast = launch.launcher_for(kernel, args, shared)
        if fast is None:
            return
        array_args = [a for a in args if type(a) is launch.DeviceArg]
        if [a.ptr for a in array_args[:len(names)]] != [ptrs.get(n) for n in names]:
            return
        if any(a.ptr in per_call for a in array_args[len(names):]):  # an unnamed per-call buffer: stale on replay
            return
        try:
            go = fast.bind(args).fixed(grid, threads, shared, varying=len(names))
        except launch.LaunchError:
            return
        steps.append((go, tuple(_INDEX[n] for n in names)))
    grad_shapes = tuple(buffers[n].shape for n in ("dq", "dk", "dv"))
    scratch = tuple((_INDEX[name], array.shape, array.dtype, zeroed)
                    for name, (array, zeroed) in recording.scratch.items())
    extents = {name: plans._extent(buffers[name]) for name in _INPUTS + ("dq", "dk", "dv")}  # none empty
    # the dummies behind the packed pointers; never the first call's arrays (they would live on)
    keep = tuple(a for r in recording.launches for a in r[3] if type(a) is launch.DeviceArg and a.ptr not in per_call)
    with _lock:
        if len(_memo) >= _MEMO_LIMIT:
            _memo.clear()
        _memo[key] = _Replay(tuple(steps), grad_shapes, problem_dtype, scratch, extents, keep)


def forget():
    """Drop every remembered call (after tile configurations change)."""
    with _lock:
        _memo.clear()
        _refused.clear()
