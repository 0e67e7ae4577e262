"""nbflash.attention_varlen against the float64 oracle on random packed batches, and
every refusal (error type, message naming the argument, buffers left as they were)."""

from __future__ import annotations

import numpy as np
import pytest

import nbflash
from helpers import (
    DTYPES, SIMULATOR, assert_close, assert_lse_close, draw_varlen, new_rng, random_array, to_device,
    to_host, VarlenShape,
)
from helpers import check_varlen_forward as run_and_check
from nbflash import plans, tuning

HALF_DTYPES = DTYPES[:2]
SHIPPED = sorted(tuning.MMA_TILES)
SIM_HEAD_DIM = 32  # the cheapest shipped tensor-core head_dim to emulate


@pytest.fixture(autouse=True)
def mma_sync_for_mma_tests(request, monkeypatch):
    """Tests named for the mma kernel pin it (on sm_90 varlen at head_dim 64 / 128 takes
    the wgmma forward), those named for wgmma turn that one on (also on the simulator)."""
    if "mma" in request.node.name:
        monkeypatch.setenv("NBFLASH_WGMMA", "1" if "wgmma" in request.node.name else "0")
        plans.forget()
        yield
        plans.forget()
    else:
        yield


# --- the portable kernel, every dtype -------------------------------------------------

@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_batches_match_oracle(dtype, causal):
    rng, seed = new_rng()
    shape = draw_varlen(rng)
    run_and_check(shape, dtype, causal=causal, rng=rng, seed=seed, kernel="simt")


@pytest.mark.parametrize("group", [2, 4])
def test_gqa_batches_match_oracle(group):
    rng, seed = new_rng()
    shape = draw_varlen(rng, group=group)
    run_and_check(shape, np.dtype(np.float32), causal=bool(rng.integers(2)), rng=rng, seed=seed, max_seqlens=True)


def test_sequences_without_queries_or_keys():
    """No keys: out 0 and lse -inf; no queries: nothing; causal with seqlen_q > seqlen_k:
    the first rows see nothing."""
    rng, seed = new_rng()
    shape = VarlenShape([3, 0, 1, 9, 0], [0, 5, 1, 4, 0], heads_q=2, heads_kv=1, head_dim=5, head_dim_v=7)
    got, lse = run_and_check(shape, np.dtype(np.float32), causal=True, rng=rng, seed=seed)
    got, lse = to_host(got), to_host(lse)
    assert np.all(got[:3] == 0) and np.all(np.isneginf(lse[:, :3]))
    assert np.all(got[4:9] == 0) and np.all(np.isneginf(lse[:, 4:9]))  # rows 0..4 of the 4th see no key
    assert np.all(np.isfinite(lse[:, 9:]))


def test_equal_lengths_match_dense_attention_bit_for_bit():
    """Equal lengths packed = the dense batch: the same kernel arithmetic, only offsets differ."""
    rng, _ = new_rng()
    batch, nq, nk, hq, hkv, d = 3, int(rng.integers(1, 30)), int(rng.integers(1, 30)), 2, 1, 8
    q = random_array(rng, (batch, nq, hq, d), np.float32)
    k, v = (random_array(rng, (batch, nk, hkv, d), np.float32) for _ in range(2))
    dense, dense_lse = nbflash.attention(*(to_device(a) for a in (q, k, v)), causal=True, return_lse=True)
    cu_q = np.arange(batch + 1, dtype=np.int32) * nq
    cu_k = np.arange(batch + 1, dtype=np.int32) * nk
    packed = [to_device(a.reshape(-1, *a.shape[2:])) for a in (q, k, v)]
    out, lse = nbflash.attention_varlen(*packed, cu_q, cu_k, causal=True, return_lse=True)
    assert np.array_equal(to_host(out), to_host(dense).reshape(-1, hq, d))
    assert np.array_equal(to_host(lse), to_host(dense_lse).transpose(1, 0, 2).reshape(hq, -1))


def test_bounds_larger_than_needed_and_no_lse():
    rng, seed = new_rng()
    shape = draw_varlen(rng, batch=3)
    q, k, v = (random_array(rng, s, np.float64) for s in shape.qkv_shapes())
    cu_q, cu_k = shape.cu_seqlens()
    out = nbflash.attention_varlen(*(to_device(a) for a in (q, k, v)), cu_q, cu_k,
                                   max_seqlen_q=max(shape.seqlens_q) + 40, max_seqlen_k=1000, scale=0.3)
    assert not isinstance(out, tuple) and out.dtype == np.float64
    assert_close(out, nbflash.reference.attention_varlen(q, k, v, cu_q, cu_k, scale=0.3), np.float64, seed=seed)


def test_empty_batches():
    rng, _ = new_rng()
    q, k, v = (to_device(random_array(rng, (0, 2, 4), np.float16)) for _ in range(3))
    for cu in (np.zeros(1, np.int32), np.zeros(4, np.int32)):  # batch 0, and 3 empty sequences
        out, lse = nbflash.attention_varlen(q, k, v, cu, cu, return_lse=True)
        assert out.shape == (0, 2, 4) and lse.shape == (2, 0)
    # keys but no queries anywhere
    k, v = (to_device(random_array(rng, (5, 2, 4), np.float16)) for _ in range(2))
    out = nbflash.attention_varlen(q, k, v, np.zeros(3, np.int32), np.array([0, 2, 5], np.int32))
    assert out.shape == (0, 2, 4)


@pytest.mark.parametrize("kernel", ["simt", "mma"])
def test_neighbouring_sequences_never_leak(kernel):
    """Key-only filler sequences full of NaN between the real ones: a read past a
    sequence's end into softmax or P V would turn its rows NaN."""
    rng, seed = new_rng()
    dtype, dim = (np.dtype(np.float16), SIM_HEAD_DIM) if kernel == "mma" else (np.dtype(np.float32), 6)
    real_q = [int(rng.integers(1, 20)), int(rng.integers(1, 20))]
    real_k = [int(rng.integers(1, 20)), int(rng.integers(1, 20))]
    shape = VarlenShape([0, real_q[0], 0, real_q[1], 0], [3, real_k[0], 5, real_k[1], 7], 1, 1, dim, dim)
    q, k, v = (random_array(rng, s, dtype) for s in shape.qkv_shapes())
    cu_q, cu_k = shape.cu_seqlens()
    for b in (0, 2, 4):
        k[cu_k[b]:cu_k[b + 1]] = np.nan
        v[cu_k[b]:cu_k[b + 1]] = np.nan
    run_and_check(shape, dtype, causal=bool(rng.integers(2)), rng=rng, seed=seed, kernel=kernel, values=(q, k, v))


# --- the tensor-core kernel on the simulator (fp16/bf16, head_dim 32) ----------------

@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_mma_kernel_random_batches_match_oracle(dtype, causal):
    rng, seed = new_rng()
    shape = draw_varlen(rng, batch=3, group=int(rng.choice([1, 2])), head_dim=SIM_HEAD_DIM)
    shape.heads_kv, shape.heads_q = 1, shape.heads_q // shape.heads_kv
    run_and_check(shape, dtype, causal=causal, rng=rng, seed=seed, kernel="mma")


def test_mma_kernel_wide_head_dim_batches_match_oracle():
    """head_dim 192 or 256, where the key loop's exit at a sequence's end is a warp vote
    (kernels/forward_mma.py, WIDE): sequences of 0 to 2 key tiles beside each other."""
    rng, seed = new_rng()
    head_dim = int(rng.choice([192, 256]))
    pairs = [(int(rng.integers(1, 17)), int(rng.integers(17, 32))), (int(rng.integers(0, 9)), int(rng.integers(0, 9)))]
    pairs = [pairs[i] for i in rng.permutation(2)]
    shape = VarlenShape([p[0] for p in pairs], [p[1] for p in pairs], heads_q=1, heads_kv=1,
                        head_dim=head_dim, head_dim_v=head_dim)
    run_and_check(shape, HALF_DTYPES[int(rng.integers(2))], causal=bool(rng.integers(2)), rng=rng, seed=seed,
                  kernel="mma")


# --- the GPU tier: thousands of tokens -------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_random_batches_match_oracle(dtype, causal):
    rng, seed = new_rng()
    shape = draw_varlen(rng, large=True)
    run_and_check(shape, dtype, causal=causal, rng=rng, seed=seed, device_seqlens=bool(rng.integers(2)))


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", SHIPPED)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_mma_kernel_large_batches_every_shipped_head_dim(dtype, causal, head_dim):
    rng, seed = new_rng()
    shape = draw_varlen(rng, large=True, head_dim=head_dim)
    run_and_check(shape, dtype, causal=causal, rng=rng, seed=seed, kernel="mma")


@pytest.mark.gpu
@pytest.mark.parametrize("max_seqlens", [False, True], ids=["host-copy", "trusted"])
def test_device_cu_seqlens(max_seqlens):
    """Device cu_seqlens: copied and checked by default, trusted with
    check_seqlens=False and max_seqlen_q (a loose bound only adds CTAs that exit at once)."""
    rng, seed = new_rng()
    shape = draw_varlen(rng, large=True, head_dim=int(rng.choice(SHIPPED)))
    run_and_check(shape, HALF_DTYPES[0], causal=True, rng=rng, seed=seed, max_seqlens=max_seqlens,
                  slack=int(rng.integers(0, 300)), device_seqlens=True, check_seqlens=not max_seqlens)


@pytest.mark.skipif(SIMULATOR, reason="NumPy-in, NumPy-out through the GPU needs a GPU")
@pytest.mark.gpu
def test_numpy_inputs_round_trip_through_the_gpu():
    rng, seed = new_rng()
    shape = draw_varlen(rng, large=True)
    q, k, v = (random_array(rng, s, np.float32) for s in shape.qkv_shapes())
    cu_q, cu_k = shape.cu_seqlens()
    out, lse = nbflash.attention_varlen(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
    assert isinstance(out, np.ndarray) and isinstance(lse, np.ndarray)
    ref, ref_lse = nbflash.reference.attention_varlen(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
    assert_close(out, ref, np.float32, seed=seed)
    assert_lse_close(lse, ref_lse, seed=seed)


# --- refusals ----------------------------------------------------------------------

TQ, TK, HQ, HKV, D = 9, 12, 4, 2, 8
CU_Q = [0, 4, 4, 9]
CU_K = [0, 5, 7, 12]


def operands(dtype=np.float32, **shapes):
    rng, _ = new_rng()
    s = {"q": (TQ, HQ, D), "k": (TK, HKV, D), "v": (TK, HKV, D), "out": (TQ, HQ, D)}
    s.update(shapes)
    made = {name: to_device(rng.standard_normal(shape).astype(dtype)) for name, shape in s.items()}
    made["cu_q"] = to_device(np.array(CU_Q, np.int32))
    made["cu_k"] = to_device(np.array(CU_K, np.int32))
    return made


def refused(exc, match, a, **kwargs):
    """Call attention_varlen on the operands in ``a`` (overridden by kwargs), expect
    ``exc`` matching ``match``, and check that every array is bit for bit what it was."""
    args = {"q": a["q"], "k": a["k"], "v": a["v"], "cu_seqlens_q": a["cu_q"], "cu_seqlens_k": a["cu_k"],
            "out": a["out"]}
    args.update(kwargs)
    arrays_ = {name: x for name, x in args.items() if hasattr(x, "shape")}
    before = {name: to_host(x).copy() for name, x in arrays_.items()}
    with pytest.raises(exc, match=match):
        nbflash.attention_varlen(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("cu_seqlens_q"),
                                 args.pop("cu_seqlens_k"), **args)
    for name, x in arrays_.items():
        assert np.array_equal(to_host(x), before[name], equal_nan=True), f"{name} was modified"


def test_cu_seqlens_of_wrong_dtype():
    a = operands()
    refused(TypeError, r"cu_seqlens_q: expected dtype int32; got int64", a, cu_seqlens_q=to_device(np.array(CU_Q, np.int64)))


def test_cu_seqlens_not_an_array():
    a = operands()
    refused(TypeError, r"cu_seqlens_k: expected a CuPy or NumPy array", a, cu_seqlens_k=CU_K)


def test_cu_seqlens_of_wrong_ndim():
    a = operands()
    refused(ValueError, r"cu_seqlens_k: expected 1 dim \(batch \+ 1,\); got shape \(1, 4\)", a,
            cu_seqlens_k=to_device(np.array([CU_K], np.int32)))


def test_cu_seqlens_empty():
    a = operands()
    refused(ValueError, r"cu_seqlens_q: expected batch \+ 1 >= 1 entries; got an empty array", a,
            cu_seqlens_q=to_device(np.zeros(0, np.int32)))


def test_cu_seqlens_lengths_differ():
    a = operands()
    refused(ValueError, r"cu_seqlens_q, cu_seqlens_k: expected the same length \(batch \+ 1\); got 4 and 3", a,
            cu_seqlens_k=to_device(np.array([0, 5, 12], np.int32)))


def test_cu_seqlens_not_starting_at_zero():
    a = operands()
    refused(ValueError, r"cu_seqlens_q: expected to start at 0; got 1", a,
            cu_seqlens_q=to_device(np.array([1, 4, 4, 9], np.int32)))


def test_cu_seqlens_decreasing():
    a = operands()
    refused(ValueError, r"cu_seqlens_k: expected non-decreasing values; got 3 after 5 at index 2", a,
            cu_seqlens_k=to_device(np.array([0, 5, 3, 12], np.int32)))


@pytest.mark.parametrize("which", ["q", "k"])
def test_cu_seqlens_not_ending_at_total(which):
    a = operands()
    if which == "q":
        refused(ValueError, r"cu_seqlens_q: expected to end at total_q \(q.shape\[0\]\) = 9; got 8", a,
                cu_seqlens_q=to_device(np.array([0, 4, 4, 8], np.int32)))
    else:
        refused(ValueError, r"cu_seqlens_k: expected to end at total_k \(k.shape\[0\]\) = 12; got 13", a,
                cu_seqlens_k=to_device(np.array([0, 5, 7, 13], np.int32)))


def test_batch_over_the_grid_limit():
    a = operands(q=(0, HQ, D), k=(0, HKV, D), v=(0, HKV, D), out=(0, HQ, D))
    cu = to_device(np.zeros(65537, np.int32))
    refused(ValueError, r"cu_seqlens_q: batch 65536 exceeds the supported 65535", a, cu_seqlens_q=cu, cu_seqlens_k=cu)


def test_max_seqlen_smaller_than_a_sequence():
    a = operands()
    refused(ValueError, r"max_seqlen_q: 4 is smaller than the longest sequence in cu_seqlens \(5\)", a, max_seqlen_q=4)
    refused(ValueError, r"max_seqlen_k: 4 is smaller than the longest sequence in cu_seqlens \(5\)", a, max_seqlen_k=4)


def test_max_seqlen_of_wrong_type_or_sign():
    a = operands()
    refused(TypeError, r"max_seqlen_q: expected a non-negative int or None; got float", a, max_seqlen_q=5.0)
    refused(TypeError, r"max_seqlen_k: expected a non-negative int or None; got bool", a, max_seqlen_k=True)
    refused(ValueError, r"max_seqlen_q: expected a non-negative int; got -1", a, max_seqlen_q=-1)


def test_inputs_with_a_batch_axis():
    a = operands(q=(1, TQ, HQ, D))
    refused(ValueError, r"q: expected 3 dims \(total_q, heads_q, head_dim\); got shape \(1, 9, 4, 8\)", a)


def test_heads_and_dims_mismatch():
    a = operands(k=(TK, 3, D), v=(TK, 3, D))
    refused(ValueError, r"heads_q \(4\) must be a multiple of heads_kv \(3\)", a)
    a = operands(k=(TK, HKV, D + 1))
    refused(ValueError, r"k: head_dim 9 differs from q's head_dim 8", a)
    a = operands(v=(TK + 1, HKV, D))
    refused(ValueError, r"v: seqlen 13 differs from k's seqlen 12", a)


def test_dtypes_mismatch():
    a = operands()
    refused(TypeError, r"k: dtype float16 differs from q's dtype float32", a, k=a["k"].astype(np.float16))


def test_out_of_wrong_shape_or_dtype():
    a = operands(out=(TQ, HQ, D + 1))
    refused(ValueError, r"out: expected shape \(9, 4, 8\); got \(9, 4, 9\)", a)
    a = operands()
    refused(TypeError, r"out: expected dtype float32 \(q's\); got float64", a, out=a["out"].astype(np.float64))


def test_flags_and_scale():
    a = operands()
    refused(TypeError, r"causal: expected a bool; got str", a, causal="yes")
    refused(TypeError, r"return_lse: expected a bool; got int", a, return_lse=1)
    refused(ValueError, r"scale: expected a positive finite number", a, scale=-1.0)


@pytest.mark.skipif(not SIMULATOR, reason="the simulator's tile choice is what is overridden")
@pytest.mark.parametrize("tiles", [(16, 16, 32, 2, True), (64, 32, 64, 2, False)], ids=["q-in-registers", "two-slices-per-warp"])
def test_mma_kernel_variants_on_simulator(tiles, monkeypatch):
    """Q kept in registers, and warps owning two 16-row slices, on packed sequences."""
    monkeypatch.setattr(tuning, "MMA_TILES_SIMULATOR", tiles)
    rng, seed = new_rng()
    shape = draw_varlen(rng, batch=4, group=1, head_dim=SIM_HEAD_DIM)
    shape.heads_kv = shape.heads_q = 1
    shape.seqlens_q[int(np.argmax(shape.seqlens_q))] = int(rng.integers(40, 70))  # several row tiles
    run_and_check(shape, HALF_DTYPES[int(rng.integers(2))], causal=True, rng=rng, seed=seed, kernel="mma")


# --- check_seqlens=False: values trusted, spans clamped by the kernels (issue 5) ------

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def _clamped_spans(cu, total):
    """The kernels' clamp (kernels/varlen.sequence_span): start = clip(cu[b], 0, total),
    end = clip(cu[b + 1], start, total)."""
    spans = []
    for b in range(len(cu) - 1):
        start = min(max(int(cu[b]), 0), total)
        spans.append((start, min(max(int(cu[b + 1]), start), total)))
    return spans


def _guarded(rng, shape, dtype, guard, fill):
    """(device buffer, the inner view, host copy of the inner values): ``shape``'s
    array inside a buffer with ``guard`` extra rows of ``fill`` on both ends of axis 0."""
    host = rng.standard_normal(shape).astype(dtype) if fill is None else np.full(shape, np.nan, dtype)
    big = np.full((shape[0] + 2 * guard, *shape[1:]), np.nan, dtype)
    big[guard:guard + shape[0]] = host
    dev = to_device(big)
    return dev, dev[guard:guard + shape[0]], host


def _assert_guards_nan(name, buffer, guard, seed):
    big = to_host(buffer)
    assert np.isnan(big[:guard]).all() and np.isnan(big[-guard:]).all(), f"{name}: a guard row changed (seed {seed})"


@pytest.mark.parametrize("kernel", ["simt", "mma", "wgmma"])
def test_unchecked_bad_cu_seqlens_are_clamped_and_stay_inside_the_tensors(kernel, monkeypatch):
    """check_seqlens=False never reads cu_seqlens on the host (the host check is made
    to fail), and malformed values (negative, past total, decreasing, int32 extremes)
    neither read nor write outside q, k, v, out: the tensors sit between NaN guard
    rows that must stay NaN and must not leak into the output. Query spans are kept
    disjoint so the result is defined: each sequence's rows are attention over its
    clamped spans, rows of no span stay unwritten; then fully random cu_seqlens (spans
    overlapping) must still keep every guard."""
    from nbflash import api_varlen

    def no_host_check(*args, **kwargs):
        raise AssertionError("cu_seqlens were read on the host")

    monkeypatch.setattr(api_varlen, "_check_prefix_sums", no_host_check)
    rng, seed = new_rng()
    dtype, dim = {"simt": (np.dtype(np.float32), 8), "mma": (np.dtype(np.float16), SIM_HEAD_DIM),
                  "wgmma": (np.dtype(np.float16), 64)}[kernel]
    total_q, total_k, heads_kv, group, guard = int(rng.integers(8, 14)), int(rng.integers(6, 12)), 1, 2, 3
    heads_q = heads_kv * group
    bufs = {}
    for name, shape, fill in (("q", (total_q, heads_q, dim), None), ("k", (total_k, heads_kv, dim), None),
                              ("v", (total_k, heads_kv, dim), None), ("out", (total_q, heads_q, dim), np.nan)):
        bufs[name] = _guarded(rng, shape, dtype, guard, fill)
    dq, dk, dv, dout = (bufs[n][1] for n in ("q", "k", "v", "out"))
    hq, hk, hv = (bufs[n][2] for n in ("q", "k", "v"))
    # queries: starts below 0, a run past total_q, repeated values: disjoint clamped spans
    cuts = np.sort(rng.integers(1, total_q, 2))
    cu_q = np.array([-int(rng.integers(1, 9)), cuts[0], cuts[0], cuts[1], total_q + int(rng.integers(1, 50)),
                     INT32_MAX], np.int32)
    # keys: anything (reads may overlap): decreasing, negative, past total_k, extremes
    cu_k = np.array([int(rng.integers(-5, 3)), int(rng.integers(0, total_k + 5)), INT32_MIN,
                     int(rng.integers(0, total_k)), INT32_MAX, int(rng.integers(-3, total_k))], np.int32)
    causal = bool(rng.integers(2))
    max_q = int(rng.choice([total_q, INT32_MAX]))  # a loose bound (clamped to total_q)
    assert nbflash.forward_spec_varlen(dq, dk, dv, causal=causal, return_lse=True).kernel == kernel
    got, lse = nbflash.attention_varlen(dq, dk, dv, to_device(cu_q), to_device(cu_k), max_seqlen_q=max_q,
                                        causal=causal, return_lse=True, out=dout, check_seqlens=False)
    assert got is dout
    host_out, host_lse = to_host(got).astype(np.float64), to_host(lse).astype(np.float64)
    covered = np.zeros(total_q, bool)
    for (qs, qe), (ks, ke) in zip(_clamped_spans(cu_q, total_q), _clamped_spans(cu_k, total_k)):
        if qs == qe:
            continue
        covered[qs:qe] = True
        ref, ref_lse = nbflash.reference.attention(hq[qs:qe], hk[ks:ke], hv[ks:ke], causal=causal, return_lse=True)
        assert_close(host_out[qs:qe], ref, dtype, seed=seed)
        assert_lse_close(host_lse[:, qs:qe], ref_lse, seed=seed)
    assert np.isnan(host_out[~covered]).all(), f"rows of no sequence were written (seed {seed})"
    for name in ("q", "k", "v", "out"):
        _assert_guards_nan(name, bufs[name][0], guard, seed)

    # fully random values, spans overlapping anywhere: garbage out, guards kept
    wild = lambda n: rng.choice(np.array([INT32_MIN, -1, 0, 1, n // 2, n, n + 1, INT32_MAX], np.int64), 5)  # noqa: E731
    nbflash.attention_varlen(dq, dk, dv, to_device(wild(total_q).astype(np.int32)),
                             to_device(wild(total_k).astype(np.int32)), max_seqlen_q=total_q, causal=causal,
                             out=dout, check_seqlens=False)
    for name in ("q", "k", "v", "out"):
        _assert_guards_nan(name, bufs[name][0], guard, seed)
    assert np.array_equal(to_host(dq), hq) and np.array_equal(to_host(dk), hk) and np.array_equal(to_host(dv), hv)


def test_unchecked_cu_seqlens_need_max_seqlen_q_and_keep_metadata_checks():
    a = operands()
    refused(ValueError, r"max_seqlen_q: required with check_seqlens=False", a, check_seqlens=False)
    refused(TypeError, r"check_seqlens: expected a bool; got int", a, check_seqlens=0, max_seqlen_q=5)
    refused(TypeError, r"cu_seqlens_q: expected dtype int32; got int64", a, check_seqlens=False, max_seqlen_q=5,
            cu_seqlens_q=to_device(np.array(CU_Q, np.int64)))
    refused(ValueError, r"cu_seqlens_q, cu_seqlens_k: expected the same length", a, check_seqlens=False,
            max_seqlen_q=5, cu_seqlens_k=to_device(np.array(CU_K[:-1], np.int32)))
    refused(TypeError, r"max_seqlen_q: expected a non-negative int or None; got float", a, check_seqlens=False,
            max_seqlen_q=5.0)
    # checked (the default), a bound is still checked against the values
    refused(ValueError, r"max_seqlen_q: 4 is smaller than the longest sequence", a, max_seqlen_q=4)


@pytest.mark.gpu
@pytest.mark.skipif(SIMULATOR, reason="needs a GPU stream to stay busy")
def test_gpu_unchecked_cu_seqlens_do_not_synchronize_and_match_the_checked_call():
    """check_seqlens=False with device cu_seqlens: the call returns while a spin kernel
    still holds the stream (no device-to-host copy), and its result is the checked
    call's, bit for bit."""
    import time

    import cupy

    rng, seed = new_rng()
    shape = draw_varlen(rng, large=True, head_dim=int(rng.choice(SHIPPED)))
    q, k, v = (to_device(random_array(rng, s, np.float16)) for s in shape.qkv_shapes())
    cu_q, cu_k = (to_device(c) for c in shape.cu_seqlens())
    bounds = dict(max_seqlen_q=max(shape.seqlens_q), max_seqlen_k=max(shape.seqlens_k))
    want = nbflash.attention_varlen(q, k, v, cu_q, cu_k, causal=True, **bounds)
    nbflash.attention_varlen(q, k, v, cu_q, cu_k, causal=True, check_seqlens=False, **bounds)  # warm
    cupy.cuda.get_current_stream().synchronize()
    spin = cupy.RawKernel(r'''extern "C" __global__ void spin(long long n) {
        long long t0 = clock64(); while (clock64() - t0 < n) { } }''', "spin")
    spin((1,), (1,), (cupy.int64(cupy.cuda.Device().attributes["ClockRate"] * 200),))  # ~200 ms
    start = time.perf_counter()
    got = nbflash.attention_varlen(q, k, v, cu_q, cu_k, causal=True, check_seqlens=False, **bounds)
    took = time.perf_counter() - start
    busy = not cupy.cuda.get_current_stream().done
    cupy.cuda.get_current_stream().synchronize()
    assert busy and took < 0.1, f"the call waited for the stream ({took:.3f} s)"
    assert np.array_equal(to_host(got).view(np.uint16), to_host(want).view(np.uint16)), f"seed {seed}"


@pytest.mark.gpu
@pytest.mark.skipif(SIMULATOR, reason="the memo serves device arrays on a GPU")
def test_gpu_repeated_unchecked_calls_skip_validation_and_read_each_calls_cu_seqlens(monkeypatch):
    """Repeats of a check_seqlens=False call (same shapes, new cu_seqlens values and
    buffers each time) go through the memo: no validation, and each result is bit for
    bit the checked call's for that call's cu_seqlens."""
    from nbflash import api_varlen

    rng, seed = new_rng()
    dim = int(rng.choice(SHIPPED))
    total_q, total_k, batch = 700, 900, 4
    q, k, v = (to_device(random_array(rng, (n, 4, dim), np.float16)) for n in (total_q, total_k, total_k))

    def cu(total):
        cuts = np.sort(rng.integers(0, total + 1, batch - 1))
        return to_device(np.concatenate([[0], cuts, [total]]).astype(np.int32))

    calls = []
    real = api_varlen._validate_3d
    monkeypatch.setattr(api_varlen, "_validate_3d", lambda ops: calls.append(1) or real(ops))
    for i in range(4):
        cu_q, cu_k = cu(total_q), cu(total_k)
        got, lse = nbflash.attention_varlen(q, k, v, cu_q, cu_k, max_seqlen_q=total_q, causal=True,
                                            return_lse=True, check_seqlens=False)
        n = len(calls)
        want, want_lse = nbflash.attention_varlen(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
        assert np.array_equal(to_host(got).view(np.uint16), to_host(want).view(np.uint16)), f"call {i}, seed {seed}"
        assert np.array_equal(to_host(lse), to_host(want_lse)), f"call {i}, seed {seed}"
        if i:
            assert n == i + 1, f"call {i} was validated again ({n} validations before the checked call)"
