"""nbflash.plan: results equal to nbflash.attention's while batch and seqlens vary,
clear refusals of inputs that do not match the plan (nothing written), and (GPU tier)
the prepared-launch path against attention at larger sizes."""

from __future__ import annotations

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
    assert plan.spec.kernel == "mma"
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


# --- The memo behind nbflash.attention (no GPU needed: fake device arrays) --------


class _FakeMemory:
    def __init__(self, ptr):
        self.ptr, self.device_id = ptr, 0


class _FakeDeviceArray:
    """The attributes of a CuPy array the memo key reads."""

    def __init__(self, shape, dtype, ptr):
        self.shape, self.dtype, self.data = shape, np.dtype(dtype), _FakeMemory(ptr)
        self.strides = tuple(int(s) for s in np.empty(shape, dtype).strides)


class _Entry:
    def __init__(self):
        self.runs, self.overlap_checks = [], []

    def check_overlap(self, out_ptr, qp, kp, vp):
        self.overlap_checks.append((out_ptr, qp, kp, vp))

    def run(self, qp, kp, vp, out, with_lse, stream):
        self.runs.append((qp, kp, vp, out, with_lse, stream))
        return "out", None


def test_memo_lookup_builds_the_key_remember_stores_under(monkeypatch):
    # memoized_attention builds its key inline (it runs on every call); a key that
    # differs from _memo_key's by one element would mean the memo never hits.
    plans = nbflash.plans
    monkeypatch.setattr(plans, "_ndarray_type", _FakeDeviceArray)
    monkeypatch.setattr(plans, "_memo", {})
    q, k, v, out = (_FakeDeviceArray((1, 16, 4, 8), np.float16, 0x1000 * (i + 1)) for i in range(4))
    for call in ((False, None, "bshd", False, None), (True, 0.25, "bhsd", True, out), (False, 1, "bshd", False, out)):
        entry = plans._memo[plans._memo_key(q, k, v, *call)] = _Entry()
        assert plans.memoized_attention(q, k, v, *call, "s") == ("out", None)
        assert entry.runs == [(0x1000, 0x2000, 0x3000, call[4], call[3], "s")]
        assert entry.overlap_checks == ([] if call[4] is None else [(0x4000, 0x1000, 0x2000, 0x3000)])
    causal, scale, layout, return_lse, out_arg = call
    assert plans.memoized_attention(q, k, v, not causal, scale, layout, return_lse, out_arg, None) is None
    assert plans.memoized_attention(q, k, v, causal, 0.5, layout, return_lse, out_arg, None) is None
    assert plans.memoized_attention(q, k, v, causal, scale, layout, return_lse, None, None) is None
    assert plans.memoized_attention(q, k, v, 1, scale, layout, return_lse, out_arg, None) is None  # not a bool


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
