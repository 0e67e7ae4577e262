"""attention_backward's memo (backward_plans.py): a recorded call names every per-call
buffer it passes, a replay sends each launch the caller's own pointers and refuses
overlapping gradients like the validated path (no GPU needed), and (GPU tier) a
repeated call skips validation and gives the first call's bits."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import nbflash
from helpers import DTYPES, SIMULATOR, assert_grads_close, new_rng, random_array, to_device, to_host
from nbflash import api_backward, backward_plans, plans, tuning
from test_plan import _device_arrays, _Stream


def _problem(rng, dtype, head_dim, causal=False):
    batch, seqlen_q, seqlen_k = 1, int(rng.integers(1, 40)), int(rng.integers(1, 40))
    heads_kv, group = 1, int(rng.integers(1, 3))
    q = random_array(rng, (batch, seqlen_q, heads_kv * group, head_dim), dtype)
    k = random_array(rng, (batch, seqlen_k, heads_kv, head_dim), dtype)
    v = random_array(rng, (batch, seqlen_k, heads_kv, head_dim), dtype)
    do = random_array(rng, q.shape, dtype)
    out, lse = nbflash.reference.attention(q, k, v, causal=causal, return_lse=True)
    return [to_device(x) for x in (do, q, k, v, out.astype(dtype), lse.astype(np.float32))]


def _address(x):
    """The data address behind a kernel argument (a simulator FakeCUDAArray or an array)."""
    a = getattr(x, "_ary", x)
    return a.__array_interface__["data"][0] if isinstance(a, np.ndarray) else a.data.ptr


@pytest.mark.skipif(not SIMULATOR, reason="reads the simulator's argument wrappers")
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "determ"])
@pytest.mark.parametrize("family", ["wgmma", "mma", "simt"])
def test_recorded_launches_name_the_buffers_they_pass(monkeypatch, family, deterministic):
    """Each recorded launch's leading array arguments are the buffers its names say,
    in order (a wrong name would send a replay the wrong pointer), and the scratch
    buffers a replay must allocate (delta; the zeroed dQ accumulator of the atomic
    tensor-core path) are reported."""
    rng, seed = new_rng()
    monkeypatch.setenv("NBFLASH_WGMMA", "1" if family == "wgmma" else "0")
    plans.forget()
    dtype = DTYPES[2] if family == "simt" else DTYPES[0]
    do, q, k, v, out, lse = _problem(rng, dtype, 64)
    if family != "simt" and not deterministic:  # the simulator's tuning ships the separate dQ kernel
        choose = api_backward.choose_backward_spec

        def atomic(*a, **kw):  # as helpers.run_backward_kernels does (the fused dQ takes 64-row tiles)
            spec = choose(*a, **kw)
            return dataclasses.replace(spec, dq_atomics=True, **({"block_m": 64} if spec.wgmma else {}))

        monkeypatch.setattr(api_backward, "choose_backward_spec", atomic)
    ops = [nbflash.arrays.intake(x, n) for x, n in ((q, "q"), (k, "k"), (v, "v"))]
    options = dict(window=None, softcap=0.0, alibi_slopes=None, bias=None, mask=None, dropout_p=0.0, seed=None,
                   return_dbias=False)
    problem, views, (do_view, out_view, lse_view), given, causal, determ, scale, vargs, dbias = api_backward._check_all(
        ops, do, out, lse, (None, None, None), False, deterministic, None, "bshd", options)
    recording = backward_plans.Recording()
    grads = api_backward._backward(problem, views, do_view, out_view, lse_view, given, ops, causal, determ, scale,
                                   vargs, dbias, recording)
    plans.forget()
    buffers = dict(q=q, k=k, v=v, do=do, out=out, lse=lse, dq=grads[0], dk=grads[1], dv=grads[2])
    buffers.update({name: array for name, (array, _) in recording.scratch.items()})
    modules = {backward_plans_module(r[0]) for r in recording.launches}
    assert modules == {"backward_wgmma" if family == "wgmma" else
                       "backward_mma" if family == "mma" else "backward_simt", "backward_delta"} - (
        {"backward_delta"} if family == "simt" else set()), (modules, seed)
    named = set()
    for kernel, grid, threads, args, shared, names in recording.launches:
        arrays = [a for a in args if hasattr(a, "shape") and np.ndim(a) > 0]
        assert [_address(a) for a in arrays[:len(names)]] == [_address(buffers[n]) for n in names], (names, seed)
        named.update(names)
    assert named >= {"q", "k", "v", "do", "out", "lse", "dq", "dk", "dv", "delta"}, seed
    atomic = family != "simt" and not deterministic
    assert {n: z for n, (_, z) in recording.scratch.items()} == (
        {"delta": False, "dq_acc": True} if atomic else {"delta": False}), seed
    assert named == set(backward_plans.BUFFERS) - (set() if atomic else {"dq_acc"}), seed


def backward_plans_module(kernel):
    """The kernels/ module a compiled kernel came from (the simt family's preprocess is
    backward_simt's)."""
    return getattr(kernel, "py_func", kernel).__module__.rsplit(".", 1)[-1]


def _fake_replay(monkeypatch, shapes, dtype):
    """A real _Replay over three recorded steps whose launches record their pointers,
    with CuPy-like arrays over unowned addresses (nothing reads them)."""
    make, nd, allocator = _device_arrays()
    monkeypatch.setattr(plans, "_ndarray_type", nd)
    monkeypatch.setattr(plans, "_get_current_stream", lambda: _Stream)
    zeroed = []
    monkeypatch.setattr(backward_plans, "_zero", lambda a: zeroed.append(a.data.ptr))
    launches = []
    names = (("do", "out", "delta"), ("q", "k", "v", "do", "lse", "delta", "dk", "dv", "dq_acc"), ("dq_acc", "dq"))
    steps = tuple(((lambda i: lambda *p: launches.append((i,) + p))(i), tuple(backward_plans._INDEX[n] for n in ns))
                  for i, ns in enumerate(names))
    q_shape, kv_shape, lse_shape = shapes
    arrays = {n: make(s, dtype if n != "lse" else np.float32, 0x100000 * (i + 1))
              for i, (n, s) in enumerate((("q", q_shape), ("k", kv_shape), ("v", kv_shape), ("do", q_shape),
                                         ("out", q_shape), ("lse", lse_shape)))}
    extents = {n: plans._extent(a) for n, a in arrays.items()}
    extents.update(dq=extents["q"], dk=extents["k"], dv=extents["v"])
    scratch = ((backward_plans._INDEX["delta"], lse_shape, np.dtype(np.float32), False),
               (backward_plans._INDEX["dq_acc"], (4, 4), np.dtype(np.float32), True))
    replay = backward_plans._Replay(steps, (q_shape, kv_shape, kv_shape), np.dtype(dtype), scratch, extents, ())
    return replay, arrays, make, allocator, launches, names, zeroed


def test_replay_sends_each_launch_the_callers_pointers(monkeypatch):
    shapes = ((1, 16, 4, 8), (1, 16, 2, 8), (1, 4, 16))
    replay, a, make, allocator, launches, names, zeroed = _fake_replay(monkeypatch, shapes, np.float16)
    with allocator:
        monkeypatch.setattr(plans, "_empty", plans._resolve_empty(plans._ndarray_type))
        for given in (None, make(shapes[1], np.float16, 0x900000)):  # dk allocated, then the caller's
            launches.clear()
            zeroed.clear()
            dq, dk, dv = replay.run(a["do"], a["q"], a["k"], a["v"], a["out"], a["lse"], (None, given, None))
            assert (dq.shape, dk.shape, dv.shape) == (shapes[0], shapes[1], shapes[1])
            assert dq.dtype == np.float16 and (given is None or dk is given)
            assert [step[0] for step in launches] == [0, 1, 2] and all(step[1] == _Stream.ptr for step in launches)
            by_name = {n: x.data.ptr for n, x in a.items()}
            by_name.update(dq=dq.data.ptr, dk=dk.data.ptr, dv=dv.data.ptr)
            delta, dq_acc = launches[0][4], launches[1][10]
            assert launches[2][2] == dq_acc and zeroed == [dq_acc]  # the accumulator is zeroed, once
            by_name.update(delta=delta, dq_acc=dq_acc)
            assert len(set(by_name.values())) == len(by_name)  # every buffer its own
            for step, ns in zip(launches, names):
                assert step[2:] == tuple(by_name[n] for n in ns), ns


def test_replay_refuses_overlapping_gradients_before_launching(monkeypatch):
    shapes = ((1, 16, 4, 8), (1, 16, 2, 8), (1, 4, 16))
    replay, a, make, allocator, launches, names, zeroed = _fake_replay(monkeypatch, shapes, np.float16)
    dk_in_k = make(shapes[1], np.float16, a["k"].data.ptr + 64)
    dv_past_v = make(shapes[1], np.float16, a["v"].data.ptr + 16 * 2 * 8 * 2)  # just past v
    dq_in_dv = make(shapes[0], np.float16, dv_past_v.data.ptr + 16)  # clear of every input, inside dv
    with allocator:
        monkeypatch.setattr(plans, "_empty", plans._resolve_empty(plans._ndarray_type))
        args = (a["do"], a["q"], a["k"], a["v"], a["out"], a["lse"])
        with pytest.raises(ValueError, match=r"dk: overlaps k in memory"):
            replay.run(*args, (None, dk_in_k, None))
        with pytest.raises(ValueError, match=r"dv: overlaps dq in memory"):
            replay.run(*args, (dq_in_dv, None, dv_past_v))
        assert launches == [] and zeroed == []
        replay.run(*args, (None, None, dv_past_v))
        assert len(launches) == 3


def test_memo_key_only_for_cupy_arrays_aligned_and_plain_flags(monkeypatch):
    make, nd, _ = _device_arrays()
    monkeypatch.setattr(plans, "_ndarray_type", nd)
    q, k, v, do, out = (make((1, 16, 2, 8), np.float16, 0x100000 * (i + 1)) for i in range(5))
    lse = make((1, 2, 16), np.float32, 0x700000)
    call = dict(causal=False, scale=None, layout="bshd", deterministic=False)
    key = backward_plans.memo_key(do, q, k, v, out, lse, None, None, None, **call)
    assert key is not None
    assert key != backward_plans.memo_key(do, q, k, v, out, lse, None, None, None, **dict(call, deterministic=True))
    assert key != backward_plans.memo_key(do, q, k, v, out, lse, None, None, None, **dict(call, scale=0.5))
    dk = make((1, 16, 2, 8), np.float16, 0x800000)
    assert key != backward_plans.memo_key(do, q, k, v, out, lse, None, dk, None, **call)
    misaligned = make((1, 16, 2, 8), np.float16, 0x900008)
    for bad in (
        dict(causal=1), dict(deterministic=None), dict(scale=np.float32(0.5)), dict(layout=None),
    ):
        assert backward_plans.memo_key(do, q, k, v, out, lse, None, None, None, **dict(call, **bad)) is None, bad
    assert backward_plans.memo_key(do, misaligned, k, v, out, lse, None, None, None, **call) is None
    assert backward_plans.memo_key(do, q, k, v, out, lse, misaligned, None, None, **call) is None
    host = np.zeros((1, 16, 2, 8), np.float16)
    assert backward_plans.memo_key(host, q, k, v, out, lse, None, None, None, **call) is None


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "determ"])
@pytest.mark.parametrize("dtype", [DTYPES[0], DTYPES[2]], ids=str)
def test_gpu_repeated_backward_skips_validation_and_repeats_the_first_calls_result(monkeypatch, dtype,
                                                                                   deterministic):
    """The second call of a signature replays the first's launches (validation made
    to fail must not be reached) and gives its gradients: bit for bit where the
    path is deterministic, within the dtype's tolerance of the oracle otherwise; into
    the caller's dq / dk / dv too."""
    import cupy

    rng, seed = new_rng()
    head_dim = 64
    shape = dict(batch=2, seqlen_q=int(rng.integers(100, 300)), seqlen_k=int(rng.integers(100, 300)))
    q = random_array(rng, (shape["batch"], shape["seqlen_q"], 4, head_dim), dtype)
    k = random_array(rng, (shape["batch"], shape["seqlen_k"], 2, head_dim), dtype)
    v = random_array(rng, (shape["batch"], shape["seqlen_k"], 2, head_dim), dtype)
    do = random_array(rng, q.shape, dtype)
    want = nbflash.reference.attention_backward(do, q, k, v, causal=True)
    dq_d, dk_d, dv_d, do_d = (cupy.asarray(x) for x in (q, k, v, do))
    out, lse = nbflash.attention(dq_d, dk_d, dv_d, causal=True, return_lse=True)
    first = nbflash.attention_backward(do_d, dq_d, dk_d, dv_d, out, lse, causal=True, deterministic=deterministic)
    into = [cupy.full(x.shape, cupy.nan, x.dtype) for x in (dq_d, dk_d, dv_d)]
    nbflash.attention_backward(do_d, dq_d, dk_d, dv_d, out, lse, causal=True, deterministic=deterministic,
                               dq=into[0], dk=into[1], dv=into[2])

    def refuse(*a, **kw):
        raise AssertionError("validated again: the backward memo missed")

    monkeypatch.setattr(api_backward, "_check_all", refuse)
    again = nbflash.attention_backward(do_d, dq_d, dk_d, dv_d, out, lse, causal=True, deterministic=deterministic)
    into_again = [cupy.full(x.shape, cupy.nan, x.dtype) for x in (dq_d, dk_d, dv_d)]
    returned = nbflash.attention_backward(do_d, dq_d, dk_d, dv_d, out, lse, causal=True,
                                          deterministic=deterministic, dq=into_again[0], dk=into_again[1],
                                          dv=into_again[2])
    assert all(r is g for r, g in zip(returned, into_again))
    with pytest.raises(ValueError, match=r"dk: overlaps k in memory"):
        nbflash.attention_backward(do_d, dq_d, dk_d, dv_d, out, lse, causal=True, deterministic=deterministic,
                                   dq=into_again[0], dk=dk_d, dv=into_again[2])
    cupy.cuda.get_current_stream().synchronize()
    for grads in (first, into, again, into_again):
        assert_grads_close(grads, want, dtype, seed=seed)
    if deterministic or dtype == DTYPES[2]:  # the portable kernels use no atomics either
        for grads in (into, again, into_again):
            for g, f in zip(grads, first):
                assert np.array_equal(to_host(g).view(np.uint8), to_host(f).view(np.uint8)), seed
