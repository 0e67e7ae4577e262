"""nbflash.plan: results equal to nbflash.attention's while batch and seqlens vary,
clear refusals of inputs that do not match the plan (nothing written), and (GPU tier)
the prepared-launch path against attention at larger sizes."""

from __future__ import annotations

import types

import numpy as np
import pytest

import nbflash
from helpers import (
    DTYPES, assert_close, assert_lse_close, new_rng, random_array, strided_pair, to_device, to_host,
)


def qkv(rng, dtype, batch, seqlen_q, seqlen_k, heads_q=4, heads_kv=2, head_dim=8, head_dim_v=None, layout="bshd"):
    head_dim_v = head_dim if head_dim_v is None else head_dim_v

    def shape(seqlen, heads, dim):
        return (batch, seqlen, heads, dim) if layout == "bshd" else (batch, heads, seqlen, dim)

    host = [random_array(rng, shape(n, h, d), dtype) for n, h, d in (
        (seqlen_q, heads_q, head_dim), (seqlen_k, heads_kv, head_dim), (seqlen_k, heads_kv, head_dim_v))]
    return host, [to_device(a) for a in host]


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("dtype", [DTYPES[0], DTYPES[2]], ids=str)
def test_plan_equals_attention_while_batch_and_seqlens_vary(dtype, layout):
    rng, seed = new_rng()
    causal = bool(rng.integers(2))
    _, first = qkv(rng, dtype, 1, 5, 7, layout=layout)
    plan = nbflash.plan(*first, causal=causal, scale=0.3, layout=layout, return_lse=True)
    assert plan.spec == nbflash.forward_spec(*first, causal=causal, layout=layout, return_lse=True)
    for batch, seqlen_q, seqlen_k in ((1, 5, 7), (2, 3, 9), (1, 5, 7)):
        host, dev = qkv(rng, dtype, batch, seqlen_q, seqlen_k, layout=layout)
        out, lse = plan(*dev)
        want, want_lse = nbflash.attention(*dev, causal=causal, scale=0.3, layout=layout, return_lse=True)
        assert np.array_equal(to_host(out), to_host(want), equal_nan=True), f"seed {seed}"
        assert np.array_equal(to_host(lse), to_host(want_lse)), f"seed {seed}"
        ref, ref_lse = nbflash.reference.attention(*host, causal=causal, scale=0.3, layout=layout, return_lse=True)
        assert_close(out, ref, dtype, seed=seed)
        assert_lse_close(lse, ref_lse, seed=seed)


def test_plan_run_writes_into_out_and_reads_strided_inputs():
    rng, seed = new_rng()
    dtype = np.dtype(np.float32)
    shapes = ((2, 6, 4, 8), (2, 9, 2, 8), (2, 9, 2, 8))
    pairs = [strided_pair(rng, s, dtype) for s in shapes]
    host, dev = [p[0] for p in pairs], [p[1] for p in pairs]
    plan = nbflash.plan(*dev)
    out = to_device(np.full(shapes[0], np.nan, dtype))
    got = plan.run(*dev, out=out)
    assert got is out
    assert_close(got, nbflash.reference.attention(*host), dtype, seed=seed)


def test_plan_without_batch_axis():
    rng, seed = new_rng()
    dtype = np.dtype(np.float16)
    host, dev = qkv(rng, dtype, 1, 4, 6)
    host, dev = [a[0] for a in host], [a[0] for a in dev]
    plan = nbflash.plan(*dev, causal=True)
    assert_close(plan(*dev), nbflash.reference.attention(*host, causal=True), dtype, seed=seed)


def refused(plan, exc, match, q, k, v, out_shape=(1, 5, 4, 8), dtype=np.float32):
    out = to_device(np.full(out_shape, np.nan, dtype))
    with pytest.raises(exc, match=match):
        plan(q, k, v, out=out)
    assert np.isnan(to_host(out)).all(), "out was written"


@pytest.fixture
def plan_f32():
    rng, _ = new_rng()
    _, dev = qkv(rng, np.float32, 1, 5, 7)
    return nbflash.plan(*dev, causal=True), rng


def test_plan_refuses_another_dtype(plan_f32):
    plan, rng = plan_f32
    _, dev = qkv(rng, np.float64, 1, 5, 7)
    refused(plan, TypeError, r"q: dtype fp64 differs from the plan's fp32", *dev, dtype=np.float64)


def test_plan_refuses_another_head_dim(plan_f32):
    plan, rng = plan_f32
    _, dev = qkv(rng, np.float32, 1, 5, 7, head_dim=16)
    refused(plan, ValueError, r"q: head_dim 16 differs from the plan's 8", *dev, out_shape=(1, 5, 4, 16))


def test_plan_refuses_another_head_dim_v(plan_f32):
    plan, rng = plan_f32
    _, dev = qkv(rng, np.float32, 1, 5, 7, head_dim_v=4)
    refused(plan, ValueError, r"v: head_dim 4 differs from the plan's 8", *dev, out_shape=(1, 5, 4, 4))


def test_plan_refuses_other_head_counts(plan_f32):
    plan, rng = plan_f32
    _, dev = qkv(rng, np.float32, 1, 5, 7, heads_q=8)
    refused(plan, ValueError, r"q: heads 8 differs from the plan's 4", *dev, out_shape=(1, 5, 8, 8))
    _, dev = qkv(rng, np.float32, 1, 5, 7, heads_q=4, heads_kv=4)
    refused(plan, ValueError, r"k: heads 4 differs from the plan's 2", *dev)


def test_plan_refuses_another_number_of_dims(plan_f32):
    plan, rng = plan_f32
    _, dev = qkv(rng, np.float32, 1, 5, 7)
    refused(plan, ValueError, r"q, k, v: 3 dims; the plan was made for 4", *(a[0] for a in dev), out_shape=(5, 4, 8))


def test_plan_still_validates_like_attention(plan_f32):
    plan, rng = plan_f32
    _, dev = qkv(rng, np.float32, 1, 5, 7)
    q, k, v = dev
    refused(plan, ValueError, r"v: seqlen 6 differs from k's seqlen 7", q, k, v[:, :6])
    refused(plan, ValueError, r"out: expected shape \(1, 5, 4, 8\); got \(1, 5, 4, 7\)", q, k, v, out_shape=(1, 5, 4, 7))
    with pytest.raises(ValueError, match=r"out: overlaps q in memory"):
        plan(q, k, v, out=q)
    with pytest.raises(TypeError, match=r"q: expected a CuPy or NumPy array"):
        plan([1.0], k, v)


def test_plan_refuses_bad_flags_at_plan_time():
    rng, _ = new_rng()
    _, dev = qkv(rng, np.float32, 1, 5, 7)
    with pytest.raises(TypeError, match=r"causal: expected a bool; got int"):
        nbflash.plan(*dev, causal=1)
    with pytest.raises(ValueError, match=r"scale: expected a positive finite number"):
        nbflash.plan(*dev, scale=-1.0)
    with pytest.raises(ValueError, match=r"layout: expected one of"):
        nbflash.plan(*dev, layout="sbhd")


def test_plan_names_its_kernel():
    rng, _ = new_rng()
    _, dev = qkv(rng, np.float16, 1, 5, 7)
    plan = nbflash.plan(*dev)
    assert plan.spec.key in repr(plan)


# --- GPU tier ----------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128, 40])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_gpu_plan_equals_attention_bit_for_bit(head_dim, layout):
    import cupy

    rng, seed = new_rng()
    dtype = np.dtype(np.float16)
    causal = bool(rng.integers(2))
    _, first = qkv(rng, dtype, 2, 300, 300, heads_q=8, heads_kv=2, head_dim=head_dim, layout=layout)
    plan = nbflash.plan(*first, causal=causal, layout=layout, return_lse=True)
    for _ in range(3):
        batch, nq, nk = int(rng.integers(1, 4)), int(rng.integers(1, 700)), int(rng.integers(1, 700))
        host, dev = qkv(rng, dtype, batch, nq, nk, heads_q=8, heads_kv=2, head_dim=head_dim, layout=layout)
        for _ in range(2):  # the second call takes the prepared launch
            out, lse = plan(*dev)
        want, want_lse = nbflash.attention(*dev, causal=causal, layout=layout, return_lse=True)
        cupy.cuda.get_current_stream().synchronize()
        assert np.array_equal(to_host(out).view(np.uint16), to_host(want).view(np.uint16)), f"seed {seed}"
        assert np.array_equal(to_host(lse), to_host(want_lse)), f"seed {seed}"
        ref = nbflash.reference.attention(*host, causal=causal, layout=layout)
        assert_close(out, ref, dtype, seed=seed)


@pytest.mark.gpu
def test_gpu_plan_refuses_misaligned_rows_and_overlapping_out_on_the_prepared_path():
    import cupy

    rng, _ = new_rng()
    dtype = np.dtype(np.float16)
    _, (q, k, v) = qkv(rng, dtype, 1, 128, 128, heads_q=8, heads_kv=8, head_dim=64)
    plan = nbflash.plan(q, k, v)
    assert plan.spec.kernel in ("mma", "wgmma")  # a tensor-core kernel (wgmma on sm_90): 16-byte rows
    plan(q, k, v)
    plan(q, k, v)  # prepared
    flat = cupy.empty(q.size + 1, q.dtype)[1:]  # 2-byte offset: rows not 16-byte aligned
    flat[...] = q.ravel()
    shifted = flat.reshape(q.shape)
    with pytest.raises(ValueError, match=r"q: the plan's tensor-core kernel .* needs 16-byte aligned rows"):
        plan(shifted, k, v)
    out = cupy.full(q.shape, cupy.nan, q.dtype)
    plan(q, k, v, out=out)
    with pytest.raises(ValueError, match=r"out: overlaps k in memory"):
        plan(q, k, v, out=k)
    with pytest.raises(ValueError, match=r"out: overlaps k in memory"):
        nbflash.attention(q, k, v, out=k)  # attention's memoized path checks it too


@pytest.mark.gpu
def test_gpu_plan_on_a_side_stream():
    import cupy

    rng, seed = new_rng()
    dtype = np.dtype(np.float16)
    host, dev = qkv(rng, dtype, 2, 333, 333, heads_q=8, heads_kv=4, head_dim=64)
    plan = nbflash.plan(*dev, causal=True)
    stream = cupy.cuda.Stream(non_blocking=True)
    cupy.cuda.get_current_stream().synchronize()
    for _ in range(3):
        out = plan(*dev, stream=stream)
    stream.synchronize()
    assert_close(out, nbflash.reference.attention(*host, causal=True), dtype, seed=seed)


# --- The fast paths of attention's memo and of plans (no GPU needed) ----------------
# Real cupy.ndarray objects over unowned addresses (CuPy makes them without a device;
# nothing reads or writes them: the prepared launch is a recorder), so the key is
# built from CuPy's own attributes; a plain class stands in where CuPy is missing.


class _FakeMemory:
    def __init__(self, ptr):
        self.ptr, self.device_id = ptr, 0


class _FakeDeviceArray:
    """The attributes of a CuPy array the fast paths read."""

    def __init__(self, shape, dtype, ptr, strides=None):
        self.shape, self.dtype, self.data = shape, np.dtype(dtype), _FakeMemory(ptr)
        contiguous = tuple(int(s) for s in np.empty(shape, dtype).strides)
        self.strides = contiguous if strides is None else strides
        self._c_contiguous = self.strides == contiguous
        self.size = int(np.prod(shape))
        self.itemsize = self.dtype.itemsize


def _device_arrays():
    """(make(shape, dtype, ptr, strides=None), ndarray type, allocator context)."""
    import contextlib

    try:
        import cupy
        from cupy.cuda import memory

        def make(shape, dtype, ptr, strides=None):
            mem = memory.MemoryPointer(memory.UnownedMemory(ptr, 1 << 20, None, device_id=0), 0)
            return cupy.ndarray(shape, dtype, memptr=mem, strides=strides)

        make((1,), np.float32, 0x1000)
    except Exception:
        return _FakeDeviceArray, _FakeDeviceArray, contextlib.nullcontext()
    next_ptr = [0x7000_0000]

    def alloc(size):
        next_ptr[0] += 1 << 20
        return memory.MemoryPointer(memory.UnownedMemory(next_ptr[0], max(size, 1), None, device_id=0), 0)

    return make, cupy.ndarray, cupy.cuda.using_allocator(alloc)


class _Stream:
    ptr = 0x5151


def _recording_entry(problem_shape, with_lse, extents):
    """A real _Prepared whose launch records its pointers."""
    import types

    launches = []
    problem = types.SimpleNamespace(out_shape=lambda: problem_shape, dtype=np.dtype(np.float16),
                                    lse_shape=lambda: (problem_shape[0], problem_shape[2], problem_shape[1]))
    entry = nbflash.plans._Prepared(lambda *ptrs: launches.append(ptrs), problem, with_lse, (), extents,
                                    None, None, 0)
    return entry, launches


def _c_hot_path():
    """nbflash._fastlaunch.run, or None where the extension was not built (pip builds it
    where a C compiler is present: CI checks it is there, tests/test_launch.py)."""
    try:
        from nbflash import _fastlaunch
    except ImportError:
        return None
    return _fastlaunch.run


@pytest.fixture(params=["c", "python"])
def hot_path(request, monkeypatch):
    """The remembered-call hot path under test: the C one (nbflash._fastlaunch.run) or
    the Python one (plans._hot_run None)."""
    run = _c_hot_path() if request.param == "c" else None
    if request.param == "c" and run is None:
        pytest.skip("nbflash._fastlaunch is not built in this install")
    monkeypatch.setattr(nbflash.plans, "_hot_run", run)
    return request.param


def test_memo_and_plan_fast_paths_build_the_keys_the_slow_paths_store_under(monkeypatch, hot_path):
    # The fast paths build their keys inline (they run on every call); a key that
    # differs from _memo_key's / _call_key's by one element would mean they never hit.
    plans = nbflash.plans
    make, nd, allocator = _device_arrays()
    monkeypatch.setattr(plans, "_ndarray_type", nd)
    monkeypatch.setattr(plans, "_get_current_stream", lambda: _Stream)
    monkeypatch.setattr(plans, "_memo", {})
    shape = (1, 16, 4, 8)
    q, k, v, out = (make(shape, np.float16, 0x100000 * (i + 1)) for i in range(4))
    strided = make(shape, np.float16, 0x500000, strides=(4096, 256, 64, 2))  # not C-contiguous
    extents = [plans._extent(a) for a in (q, k, v, out)]
    plan = plans.AttentionPlan.__new__(plans.AttentionPlan)
    plan._entries, plan.return_lse = {}, False
    with allocator:
        monkeypatch.setattr(plans, "_empty", plans._resolve_empty(nd))
        for qq in (q, strided):
            for call in ((False, None, "bshd", False, None), (True, 0.25, "bhsd", True, out),
                         (False, 1, "bshd", False, out), (True, None, "bshd", True, None)):
                causal, scale, layout, return_lse, o = call
                entry, launches = _recording_entry(shape, return_lse, extents)
                plans._memo[plans._memo_key(qq, k, v, *call)] = entry
                got = plans.memoized_attention(qq, k, v, *call, None)
                assert len(launches) == 1, call
                sp, qp, kp, vp, op = launches[0][:5]
                assert (sp, qp, kp, vp) == (_Stream.ptr, qq.data.ptr, k.data.ptr, v.data.ptr)
                result_out = got[0] if return_lse else got
                assert op == result_out.data.ptr and (o is None or result_out is o)
                if return_lse:
                    assert got[1].shape == (1, 4, 16) and launches[0][5] == got[1].data.ptr
                plan.return_lse = return_lse
                plan_entry, plan_launches = _recording_entry(shape, return_lse, extents)
                plan._entries[plans._call_key(qq, k, v, o)] = plan_entry
                plan(qq, k, v, out=o)
                assert len(plan_launches) == 1 and plan_launches[0][1:4] == (qq.data.ptr, k.data.ptr, v.data.ptr)
    assert plans._call_key(q, k, v, None) != plans._call_key(strided, k, v, None)
    assert plans.memoized_attention(q, k, v, 1, None, "bshd", False, None, None) is None  # causal not a bool
    assert plans.memoized_attention(q, k, v, False, 0.5, "bshd", False, None, None) is None  # not remembered


def test_memo_keys_light_variant_calls_by_their_values(monkeypatch):
    """A call whose only variants are a window, softcap and / or ALiBi slopes is
    remembered under a key holding those values as given (the slopes by address,
    shape, strides, dtype and device): it hits for the same values and the same slopes
    array only, never for a plain call or another window; other forms (a list, NumPy
    scalars, a bool, host slopes) are not memoized at all (validated every time)."""
    plans = nbflash.plans
    make, nd, allocator = _device_arrays()
    monkeypatch.setattr(plans, "_ndarray_type", nd)
    monkeypatch.setattr(plans, "_ndarray", lambda: nd)
    key = plans.variant_key
    assert key(None, 0.0, None) is None and key(None, None, None) is None
    assert key((8, 0), 0.0, None) == ((8, 0), 0.0, None)
    assert key(None, 30.0, None) == (None, 30.0, None)
    assert key((4, -1), 2, None) == ((4, -1), 2, None)
    for refused in ([8, 0], (8,), (np.int64(8), 0), (8, True), (8.0, 0)):
        assert key(refused, 0.0, None) is None, refused
    assert key(None, np.float32(30.0), None) is None
    slopes = make((4,), np.float32, 0x900000)
    other_slopes = make((4,), np.float32, 0x900100)
    assert key(None, 0.0, slopes) == (None, 0.0, (slopes.data.ptr, (4,), (4,), np.dtype(np.float32), 0))
    assert key(None, 0.0, np.ones(4, np.float32)) is None  # host slopes: the validated path
    monkeypatch.setattr(plans, "_get_current_stream", lambda: _Stream)
    monkeypatch.setattr(plans, "_memo", {})
    shape = (1, 16, 4, 8)
    q, k, v, out = (make(shape, np.float16, 0x100000 * (i + 1)) for i in range(4))
    extents = [plans._extent(a) for a in (q, k, v, out)]
    variant = key((8, 0), 30.0, slopes)
    with allocator:
        monkeypatch.setattr(plans, "_empty", plans._resolve_empty(nd))
        for o in (None, out):
            call = (True, None, "bshd", False, o)
            entry, launches = _recording_entry(shape, False, extents)
            plans._memo[plans._memo_key(q, k, v, *call, variant)] = entry
            got = plans.memoized_attention(q, k, v, *call, None, variant)
            assert len(launches) == 1 and launches[0][1:4] == (q.data.ptr, k.data.ptr, v.data.ptr)
            assert o is None or got is o
            assert plans.memoized_attention(q, k, v, *call, None) is None  # the plain call
            for other in (key((8, 0), 0.0, slopes), key((9, 0), 30.0, slopes), key(None, 30.0, slopes),
                          key((8, 0), 30.0, other_slopes), key((8, 0), 30.0, None)):
                assert plans.memoized_attention(q, k, v, *call, None, other) is None, other
            assert len(launches) == 1


@pytest.mark.gpu
def test_gpu_repeated_window_softcap_alibi_call_skips_validation(monkeypatch):
    """The second attention call with the same window, softcap and slopes array replays
    the first's launch (variant validation must not be reached) and writes the same
    bits; another window, or other slopes, are validated again (and read)."""
    import cupy

    rng, _ = new_rng()
    seqlen = int(rng.integers(100, 300))
    q, k, v = (cupy.asarray(random_array(rng, (2, seqlen, 4, 64), np.float16)) for _ in range(3))
    slopes = cupy.asarray(rng.uniform(0.0, 0.5, 4).astype(np.float32))
    first = nbflash.attention(q, k, v, causal=True, window=(40, 0), softcap=20.0, alibi_slopes=slopes)
    calls = []
    real = nbflash.variants.check_variants
    monkeypatch.setattr(nbflash.variants, "check_variants", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    again = nbflash.attention(q, k, v, causal=True, window=(40, 0), softcap=20.0, alibi_slopes=slopes)
    assert calls == [] and bool((again == first).all())
    entries = [e for e in nbflash.plans._memo.values() if e.memo_key[4] is not None]
    assert entries and all(a.ptr != slopes.data.ptr for e in entries for a in e.keep)  # slopes not pinned
    slopes[...] = 0  # the packed pointer reads the caller's slopes at each launch
    flat = nbflash.attention(q, k, v, causal=True, window=(40, 0), softcap=20.0, alibi_slopes=slopes)
    assert calls == []
    fresh = nbflash.attention(q, k, v, causal=True, window=(40, 0), softcap=20.0, alibi_slopes=slopes.copy())
    assert calls == [1]  # other slopes array: validated
    assert bool((flat == fresh).all()) and not bool((flat == first).all())
    nbflash.attention(q, k, v, causal=True, window=(41, 0), softcap=20.0, alibi_slopes=slopes)
    assert calls == [1, 1]


def test_memo_and_plan_fast_paths_refuse_an_overlapping_out(monkeypatch, hot_path):
    plans = nbflash.plans
    make, nd, allocator = _device_arrays()
    monkeypatch.setattr(plans, "_ndarray_type", nd)
    monkeypatch.setattr(plans, "_get_current_stream", lambda: _Stream)
    monkeypatch.setattr(plans, "_memo", {})
    shape = (1, 16, 4, 8)
    q, k, v, out = (make(shape, np.float16, 0x100000 * (i + 1)) for i in range(4))
    k_as_out = make(shape, np.float16, k.data.ptr + 64)  # same shape, inside k's bytes
    entry, launches = _recording_entry(shape, False, [plans._extent(a) for a in (q, k, v, out)])
    plans._memo[plans._memo_key(q, k, v, False, None, "bshd", False, out)] = entry
    plan = plans.AttentionPlan.__new__(plans.AttentionPlan)
    plan._entries, plan.return_lse = {plans._call_key(q, k, v, out): entry}, False
    with allocator:
        monkeypatch.setattr(plans, "_empty", plans._resolve_empty(nd))
        for run in (lambda o: plans.memoized_attention(q, k, v, False, None, "bshd", False, o, None),
                    lambda o: plan(q, k, v, out=o)):
            with pytest.raises(ValueError, match=r"out: overlaps k in memory"):
                run(k_as_out)
            assert launches == []
            run(make(shape, np.float16, v.data.ptr + shape[1] * 64 * 2 * 4))  # just past v: no overlap
            assert len(launches) == 1
            launches.clear()


def test_c_hot_path_keys_like_call_key_and_launches_only_on_a_hit(monkeypatch):
    """nbflash._fastlaunch.run: the key of plans._call_key after the prefix (strided and
    contiguous arrays, with and without out), nothing launched or allocated on a miss or
    for another array type, go's LaunchError raised as is."""
    run = _c_hot_path()
    if run is None:
        pytest.skip("nbflash._fastlaunch is not built in this install")
    from nbflash import _fastlaunch, launch

    plans = nbflash.plans
    make, nd, allocator = _device_arrays()
    if nd is _FakeDeviceArray:
        pytest.skip("no CuPy arrays to key")
    shape = (1, 16, 4, 8)
    q, k, v, out = (make(shape, np.float16, 0x100000 * (i + 1)) for i in range(4))
    strided = make(shape, np.float16, 0x500000, strides=(4096, 256, 64, 2))
    unaligned = make(shape, np.float16, 0x600008)
    prefix = ("bshd", True, 0.5, False, None)
    for qq in (q, strided, unaligned):
        for o in (None, out):
            assert _fastlaunch.key(prefix, qq, k, v, o) == prefix + plans._call_key(qq, k, v, o)
            assert _fastlaunch.key((), qq, k, v, o) == plans._call_key(qq, k, v, o)
    allocated = []

    def empty(shape_, dtype):
        allocated.append(shape_)
        return make(shape_, dtype, 0x900000)

    extents = [plans._extent(a) for a in (q, k, v, out)]
    entry, launches = _recording_entry(shape, False, extents)
    table = {prefix + plans._call_key(strided, k, v, None): entry, prefix + plans._call_key(q, k, v, out): entry}
    assert run(table, prefix, q, k, v, None, nd, empty, lambda: _Stream) is None  # a miss: q's layout differs
    assert run(table, prefix, strided, k, v, None, np.ndarray, empty, lambda: _Stream) is None  # not nd
    assert run(table, ("bhsd",) + prefix[1:], q, k, v, out, nd, empty, lambda: _Stream) is None
    assert launches == [] and allocated == []
    got = run(table, prefix, strided, k, v, None, nd, empty, lambda: _Stream)
    assert allocated == [shape] and got.data.ptr == 0x900000
    assert launches == [(_Stream.ptr, strided.data.ptr, k.data.ptr, v.data.ptr, 0x900000)]
    assert run(table, prefix, q, k, v, out, nd, empty, lambda: _Stream) is out
    assert launches[-1] == (_Stream.ptr, q.data.ptr, k.data.ptr, v.data.ptr, out.data.ptr) and len(allocated) == 1

    def failing(*ptrs):
        raise launch.LaunchError("CUresult 1")

    entry.go = failing
    with pytest.raises(launch.LaunchError, match="CUresult 1"):
        run(table, prefix, q, k, v, out, nd, empty, lambda: _Stream)


def test_a_failed_prepared_launch_is_not_retried_and_leaves_the_fast_paths(monkeypatch, hot_path):
    """go raising LaunchError (nothing launched): the memo forgets the entry and the call
    returns None (attention validates it), the plan drops its entries and validates the
    call; neither launches the failing entry again."""
    from nbflash import launch

    plans = nbflash.plans
    make, nd, allocator = _device_arrays()
    monkeypatch.setattr(plans, "_ndarray_type", nd)
    monkeypatch.setattr(plans, "_get_current_stream", lambda: _Stream)
    monkeypatch.setattr(plans, "_memo", {})
    monkeypatch.setattr(launch, "_launchers", {})
    monkeypatch.setattr(launch, "_warned", set())
    shape = (1, 16, 4, 8)
    q, k, v, out = (make(shape, np.float16, 0x100000 * (i + 1)) for i in range(4))
    extents = [plans._extent(a) for a in (q, k, v, out)]
    tries = []

    def failing(*ptrs):
        tries.append(ptrs)
        raise launch.LaunchError("CUresult 700")

    checked = []
    plan = plans.AttentionPlan.__new__(plans.AttentionPlan)
    plan.return_lse = False
    monkeypatch.setattr(plan, "_run_checked", lambda *a: checked.append(a) or "validated", raising=False)
    with allocator:
        monkeypatch.setattr(plans, "_empty", plans._resolve_empty(nd))
        for o in (None, out):
            entry, _ = _recording_entry(shape, False, extents)
            entry.go, entry.kernel, entry.sig = failing, failing, ()
            key = plans._memo_key(q, k, v, False, None, "bshd", False, o)
            entry.memo_key = key
            plans._memo[key] = entry
            tries.clear()
            assert plans.memoized_attention(q, k, v, False, None, "bshd", False, o, None) is None
            assert len(tries) == 1 and key not in plans._memo
            plan._entries = {plans._call_key(q, k, v, o): entry}
            tries.clear()
            assert plan(q, k, v, out=o) == "validated"
            assert len(tries) == 1 and plan._entries == {} and len(checked) == 1
            checked.clear()


def test_fast_output_allocation_makes_what_cupy_ndarray_makes():
    """The hot paths allocate outputs through CuPy's Cython constructor directly
    (plans._resolve_empty): with this CuPy it must be taken (not the fallback), and
    its arrays must be cupy.ndarray's in every attribute, from the current allocator."""
    cupy = pytest.importorskip("cupy")
    from cupy.cuda import memory

    plans = nbflash.plans
    rng, seed = new_rng()
    handed = []

    def alloc(size):
        ptr = 0x7000_0000 + 0x100000 * (len(handed) + 1)
        handed.append(ptr)
        return memory.MemoryPointer(memory.UnownedMemory(ptr, max(size, 1), None, device_id=0), 0)

    with cupy.cuda.using_allocator(alloc):
        empty = plans._resolve_empty(cupy.ndarray)
        assert empty is not cupy.ndarray, "the fast allocation fell back to cupy.ndarray"
        for _ in range(4):
            shape = tuple(int(n) for n in rng.integers(0, 5, int(rng.integers(0, 5))))
            dtype = np.dtype(rng.choice([np.float16, np.float32, np.float64, np.int32]))
            a, b = empty(shape, dtype), cupy.ndarray(shape, dtype)
            assert type(a) is cupy.ndarray and a.data.ptr == handed[-2] and b.data.ptr == handed[-1], seed
            for attr in ("shape", "strides", "dtype", "size", "nbytes", "ndim", "base", "_c_contiguous"):
                assert getattr(a, attr) == getattr(b, attr), (attr, shape, dtype, seed)
            assert (a.flags.c_contiguous, a.flags.f_contiguous, a.flags.owndata) == (
                b.flags.c_contiguous, b.flags.f_contiguous, b.flags.owndata), (shape, dtype, seed)
            assert a.data.mem.size == b.data.mem.size and a.data.device_id == b.data.device_id, seed


def test_attention_remembers_under_the_arguments_as_given(monkeypatch):
    # The lookup sees the caller's arguments (scale=None), so the stored key must be
    # made of them too, never of their validated forms (scale=1/sqrt(d)).
    import dataclasses

    from nbflash import api

    seen = []
    real_validate = api._validate
    monkeypatch.setattr(api, "_validate", lambda *a: (lambda p, v: (dataclasses.replace(p, on_device=True), v))(
        *real_validate(*a)))
    monkeypatch.setattr(api, "_forward", lambda *a, **kw: ("out", "lse"))
    monkeypatch.setattr(nbflash.plans, "remember", lambda *a: seen.append(a))
    rng, _ = new_rng()
    host, _ = qkv(rng, np.dtype(np.float32), 1, 3, 5)
    nbflash.attention(*host)
    nbflash.attention(*host, causal=True, scale=2, layout="bshd", return_lse=True)
    assert [a[3:8] for a in seen] == [(False, None, "bshd", False, None), (True, 2, "bshd", True, None)]


@pytest.mark.gpu
def test_gpu_repeated_calls_skip_validation():
    # The second call of a signature goes straight to the prepared launch: with the
    # validation made to fail, it must still succeed (attention, attention(out=), plan).
    import cupy

    from nbflash import api

    rng, seed = new_rng()
    dtype = np.dtype(np.float16)
    host, (q, k, v) = qkv(rng, dtype, 1, 128, 128, heads_q=8, heads_kv=8, head_dim=64)
    out = cupy.full(q.shape, cupy.nan, q.dtype)
    plan = nbflash.plan(q, k, v)
    nbflash.attention(q, k, v)
    nbflash.attention(q, k, v, out=out)
    plan(q, k, v)
    real = api._validate

    def refuse(*a):
        raise AssertionError("validated again: the memo missed")

    api._validate = refuse
    try:
        got = nbflash.attention(q, k, v)
        nbflash.attention(q, k, v, out=out)
        from_plan = plan(q, k, v)
    finally:
        api._validate = real
    cupy.cuda.get_current_stream().synchronize()
    want = nbflash.reference.attention(*host)
    for x in (got, out, from_plan):
        assert_close(x, want, dtype, seed=seed)
    # the memo's outputs came from the fast allocation (CuPy's memory pool took the probe)
    assert nbflash.plans._empty is not cupy.ndarray, "output allocation fell back to cupy.ndarray"


# --- plan.capture: one launch on fixed buffers, replayed (a CUDA graph on a GPU) ------


@pytest.mark.parametrize("return_lse", [False, True], ids=["out", "out+lse"])
def test_captured_graph_replays_into_the_same_buffers_with_new_contents(return_lse):
    rng, seed = new_rng()
    dtype = np.dtype(np.float32)
    causal = bool(rng.integers(2))
    host, dev = qkv(rng, dtype, 2, 5, 7)
    plan = nbflash.plan(*dev, causal=causal, return_lse=return_lse)
    out = to_device(np.full((2, 5, 4, 8), np.nan, dtype)) if rng.random() < 0.5 else None
    graph = plan.capture(*dev, out=out)
    assert isinstance(graph, nbflash.AttentionGraph) and plan.spec.key in repr(graph)
    assert out is None or graph.out is out
    for step in range(2):
        if step:  # new contents, same buffers: the replay reads what they hold now
            for h, d in zip(host, dev):
                h[...] = random_array(rng, h.shape, dtype)
                d[...] = to_device(h)
        got = graph()
        ref, ref_lse = nbflash.reference.attention(*host, causal=causal, return_lse=True)
        if return_lse:
            assert got[0] is graph.out and got[1] is graph.lse
            assert_close(got[0], ref, dtype, seed=seed)
            assert_lse_close(got[1], ref_lse, seed=seed)
        else:
            assert got is graph.out and graph.lse is None
            assert_close(got, ref, dtype, seed=seed)


def test_capture_refuses_like_run_before_capturing(plan_f32):
    plan, rng = plan_f32
    _, (q, k, v) = qkv(rng, np.float32, 1, 5, 7, head_dim=16)
    with pytest.raises(ValueError, match=r"q: head_dim 16 differs from the plan's 8"):
        plan.capture(q, k, v)
    _, (q, k, v) = qkv(rng, np.float32, 1, 5, 7)
    with pytest.raises(ValueError, match=r"out: overlaps q in memory"):
        plan.capture(q, k, v, out=q)
    out = to_device(np.full((1, 5, 4, 7), np.nan, np.float32))
    with pytest.raises(ValueError, match=r"out: expected shape \(1, 5, 4, 8\); got \(1, 5, 4, 7\)"):
        plan.capture(q, k, v, out=out)
    assert np.isnan(to_host(out)).all()


@pytest.mark.gpu
def test_gpu_captured_graph_equals_attention_bit_for_bit_and_replays_without_validating():
    import cupy

    from nbflash import api

    rng, seed = new_rng()
    dtype = np.dtype(np.float16)
    host, (q, k, v) = qkv(rng, dtype, 2, 1, 777, heads_q=16, heads_kv=4, head_dim=128)  # a decode step
    plan = nbflash.plan(q, k, v, causal=True, return_lse=True)
    graph = plan.capture(q, k, v)
    assert graph.graph is not None, repr(graph)
    real = api._validate
    api._validate = lambda *a: (_ for _ in ()).throw(AssertionError("a replay validated"))
    try:
        stream = cupy.cuda.Stream(non_blocking=True)
        for s in (None, stream):
            q[...] = to_device(random_array(rng, q.shape, dtype))  # new contents, same buffer
            out, lse = graph(stream=s)
            (stream if s is not None else cupy.cuda.get_current_stream()).synchronize()
            api._validate = real
            want, want_lse = nbflash.attention(q, k, v, causal=True, return_lse=True)
            cupy.cuda.get_current_stream().synchronize()
            api._validate = lambda *a: (_ for _ in ()).throw(AssertionError("a replay validated"))
            assert out is graph.out and lse is graph.lse
            assert np.array_equal(to_host(out).view(np.uint16), to_host(want).view(np.uint16)), f"seed {seed}"
            assert np.array_equal(to_host(lse), to_host(want_lse)), f"seed {seed}"
    finally:
        api._validate = real


def test_varlen_memo_fast_path_launches_with_the_callers_pointers_and_keys_on_metadata(monkeypatch):
    # attention_varlen(check_seqlens=False) repeats skip validation (plans.memoized_varlen):
    # each call's seven pointers reach the launch (cu_seqlens included: their values are
    # never read on the host), the key holds every metadata the slow path checks, and an
    # overlapping out is refused before anything launches.
    plans = nbflash.plans
    make, nd, allocator = _device_arrays()
    monkeypatch.setattr(plans, "_ndarray_type", nd)
    monkeypatch.setattr(plans, "_get_current_stream", lambda: _Stream)
    monkeypatch.setattr(plans, "_varlen_memo", {})
    total, heads, dim = 24, 2, 8
    q, k, v, out = (make((total, heads, dim), np.float16, 0x100000 * (i + 1)) for i in range(4))
    cu_q, cu_k = (make((4,), np.int32, 0x900000 + 0x1000 * i) for i in range(2))
    extents = [plans._extent(a[None]) for a in (q, k, v, out)]
    with allocator:
        monkeypatch.setattr(plans, "_empty", plans._resolve_empty(nd))
        for return_lse, o in ((False, out), (True, None)):
            launches = []
            problem = types.SimpleNamespace(out_shape=lambda: (total, heads, dim), dtype=np.dtype(np.float16),
                                            lse_shape=lambda: (heads, total))
            entry = plans._Prepared(lambda *ptrs: launches.append(ptrs), problem, return_lse, (), extents,
                                    None, None, 0)
            key = plans.varlen_key(q, k, v, cu_q, cu_k, 9, None, True, None, return_lse, o)
            plans._varlen_memo[key] = (entry, None if return_lse else 0xABC0)
            got = plans.memoized_varlen(key, q, k, v, cu_q, cu_k, o, return_lse, None)
            result_out = got[0] if return_lse else got
            assert o is None or result_out is o
            lse_ptr = got[1].data.ptr if return_lse else 0xABC0
            assert launches == [(_Stream.ptr, q.data.ptr, k.data.ptr, v.data.ptr, result_out.data.ptr, lse_ptr,
                                 cu_q.data.ptr, cu_k.data.ptr)]
            if return_lse:
                assert got[1].shape == (heads, total) and got[1].dtype == np.float32
        key = plans.varlen_key(q, k, v, cu_q, cu_k, 9, None, True, None, False, out)
        other_cu = (make((5,), np.int32, 0xA00000), make((4,), np.int32, 0xA00000, strides=(8,)),
                    make((4,), np.int64, 0xA00000))
        for cu in other_cu:  # another batch, strides, dtype: another key (the slow path checks it)
            assert plans.varlen_key(q, k, v, cu, cu_k, 9, None, True, None, False, out) != key
            assert plans.varlen_key(q, k, v, cu_q, cu, 9, None, True, None, False, out) != key
        assert plans.varlen_key(q, k, v, cu_q, cu_k, 10, None, True, None, False, out) != key
        assert plans.varlen_key(q, k, v, cu_q, cu_k, 9, 3, True, None, False, out) != key
        for bad in (dict(max_seqlen_q=9.0), dict(max_seqlen_q=True), dict(max_seqlen_k=True), dict(causal=1),
                    dict(scale="2"), dict(cu_q=np.zeros(4, np.int32))):
            args = dict(cu_q=cu_q, max_seqlen_q=9, max_seqlen_k=None, causal=True, scale=None)
            args.update(bad)
            assert plans.varlen_key(q, k, v, args["cu_q"], cu_k, args["max_seqlen_q"], args["max_seqlen_k"],
                                    args["causal"], args["scale"], False, out) is None, bad
        k_as_out = make((total, heads, dim), np.float16, k.data.ptr + 64)
        overlap_key = plans.varlen_key(q, k, v, cu_q, cu_k, 9, None, True, None, False, k_as_out)
        launches = []
        entry = plans._Prepared(lambda *ptrs: launches.append(ptrs), problem, False, (), extents, None, None, 0)
        plans._varlen_memo[overlap_key] = (entry, 0xABC0)
        with pytest.raises(ValueError, match=r"out: overlaps k in memory"):
            plans.memoized_varlen(overlap_key, q, k, v, cu_q, cu_k, k_as_out, False, None)
        assert launches == []
