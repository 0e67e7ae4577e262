"""nbflash.attention_backward and attention_vjp against the float64 oracle
(reference.attention_backward) on random shapes drawn fresh each run. The forward's
out and lse come from nbflash.attention, as a user's would."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import nbflash
from helpers import (
    DTYPES, SIMULATOR, assert_grads_close, draw_shape, gradient_magnitudes, new_rng, poisoned, random_array,
    strided_pair, to_device, to_host,
)
from nbflash import tuning

TIERS = [pytest.param(False, id="small"), pytest.param(True, id="large", marks=pytest.mark.gpu)]


def draw(rng, large=False, **pinned):
    """draw_shape, with at most 8 (batch, query head) pairs on the simulator tier: the
    backward does about 3.5x the forward's work per pair, and the simulator is slow."""
    shape = draw_shape(rng, large=large, **pinned)
    if not large:
        if shape.heads_q > 8:
            shape.heads_kv, shape.heads_q = 1, shape.heads_q // shape.heads_kv
        if shape.heads_q > 2:
            shape.batch = 1
    return shape


def out_shape(shape, layout):
    if layout == "bshd":
        return (shape.batch, shape.seqlen_q, shape.heads_q, shape.head_dim_v)
    return (shape.batch, shape.heads_q, shape.seqlen_q, shape.head_dim_v)


def strided_poisoned(shape, dtype):
    """(view, whole buffer): a NaN-filled strided window of a larger device buffer."""
    big = poisoned(tuple(2 * n for n in shape[:-1]) + (shape[-1] + 3,), dtype)
    window = tuple(slice(None, None, 2) for _ in shape[:-1]) + (slice(1, 1 + shape[-1]),)
    return big[window], big


def run_and_check(shape, dtype, *, causal, rng, seed, layout="bshd", strided=False, scale=None, squeeze=False,
                  deterministic=False):
    """Forward with nbflash, backward into NaN-poisoned buffers, compare with the oracle."""
    shapes = [*shape.qkv_shapes(layout), out_shape(shape, layout)]
    if squeeze:
        shapes = [s[1:] for s in shapes]
    if strided:
        (q, dq_), (k, dk_), (v, dv_), (do, ddo) = (strided_pair(rng, s, dtype) for s in shapes)
    else:
        q, k, v, do = (random_array(rng, s, dtype) for s in shapes)
        dq_, dk_, dv_, ddo = (to_device(a) for a in (q, k, v, do))
    out, lse = nbflash.attention(dq_, dk_, dv_, causal=causal, layout=layout, scale=scale, return_lse=True)
    if strided:
        buffers = [strided_poisoned(s, dtype) for s in shapes[:3]]
        out_strided, _ = strided_poisoned(shapes[3], dtype)
        out_strided[...] = out
        out = out_strided
    else:
        buffers = [(poisoned(s, dtype), None) for s in shapes[:3]]
    grads = nbflash.attention_backward(
        ddo, dq_, dk_, dv_, out, lse, causal=causal, layout=layout, scale=scale, deterministic=deterministic,
        dq=buffers[0][0], dk=buffers[1][0], dv=buffers[2][0],
    )
    for g, (buf, _) in zip(grads, buffers):
        assert g is buf
    refs = nbflash.reference.attention_backward(do, q, k, v, causal=causal, scale=scale, layout=layout)
    sizes = gradient_magnitudes(do, q, k, v, causal=causal, scale=scale, layout=layout)
    assert_grads_close(grads, refs, dtype, seed=seed, magnitudes=sizes)
    if strided:  # nothing outside the windows was written
        for g, (_, big) in zip(grads, buffers):
            outside = np.isnan(to_host(big).astype(np.float64)).sum()
            assert outside == big.size - g.size, f"wrote outside the strided window (seed {seed})"
    return grads


@pytest.mark.parametrize("large", TIERS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_shapes_match_oracle(dtype, causal, large):
    rng, seed = new_rng()
    shape = draw(rng, large=large)
    run_and_check(shape, dtype, causal=causal, layout=str(rng.choice(["bshd", "bhsd"])), rng=rng, seed=seed)


@pytest.mark.parametrize("large", TIERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bhsd_layout_matches_oracle(dtype, large):
    rng, seed = new_rng()
    shape = draw(rng, large=large)
    run_and_check(shape, dtype, causal=bool(rng.integers(2)), layout="bhsd", rng=rng, seed=seed)


@pytest.mark.parametrize("large", TIERS)
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_gqa_ratios_sum_over_the_group(group, large):
    rng, seed = new_rng()
    shape = draw(rng, large=large, group=group)
    run_and_check(shape, np.dtype(np.float32), causal=bool(rng.integers(2)), rng=rng, seed=seed)


@pytest.mark.parametrize("large", TIERS)
@pytest.mark.parametrize("relation", ["q<k", "q=k", "q>k"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_causal_with_unequal_seqlens_is_bottom_right_aligned(dtype, relation, large):
    rng, seed = new_rng()
    n = int(rng.integers(2, 700 if large else 40))
    m = int(rng.integers(1, n))
    seqlen_q, seqlen_k = {"q<k": (m, n), "q=k": (n, n), "q>k": (n, m)}[relation]
    shape = draw(rng, large=large, seqlen_q=seqlen_q, seqlen_k=seqlen_k)
    run_and_check(shape, dtype, causal=True, rng=rng, seed=seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_without_visible_keys_get_zero_gradients(dtype):
    rng, seed = new_rng()
    # causal with seqlen_q > seqlen_k: the first seqlen_q - seqlen_k rows see no key
    shape = draw(rng, seqlen_q=int(rng.integers(12, 30)), seqlen_k=int(rng.integers(1, 8)))
    dq, _, _ = run_and_check(shape, dtype, causal=True, rng=rng, seed=seed)
    hidden = shape.seqlen_q - shape.seqlen_k
    assert np.all(to_host(dq)[:, :hidden] == 0), f"seed {seed}"


@pytest.mark.parametrize("seqlens", [(1, 1), (1, 29), (29, 1)], ids=["1x1", "1xN", "Nx1"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_seqlen_one(seqlens, causal):
    rng, seed = new_rng()
    shape = draw(rng, seqlen_q=seqlens[0], seqlen_k=seqlens[1])
    run_and_check(shape, np.dtype(np.float16), causal=causal, rng=rng, seed=seed)


@pytest.mark.parametrize("head_dim", [1, 3, 17])
def test_odd_head_dims(head_dim):
    rng, seed = new_rng()
    shape = draw(rng, head_dim=head_dim)
    run_and_check(shape, np.dtype(np.float32), causal=False, rng=rng, seed=seed)


def test_value_head_dim_differs_from_query_head_dim():
    rng, seed = new_rng()
    shape = draw(rng)
    shape.head_dim, shape.head_dim_v = 6, 19
    run_and_check(shape, np.dtype(np.float32), causal=True, rng=rng, seed=seed)


@pytest.mark.parametrize("large", TIERS)
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_strided_views_are_read_and_written_in_place(layout, large):
    rng, seed = new_rng()
    shape = draw(rng, large=large)
    run_and_check(shape, np.dtype(np.float16), causal=True, layout=layout, strided=True, rng=rng, seed=seed)


def test_inputs_without_batch_axis():
    rng, seed = new_rng()
    shape = draw(rng)
    shape.batch = 1
    run_and_check(shape, np.dtype(np.float32), causal=True, layout="bhsd", rng=rng, seed=seed, squeeze=True)


def test_explicit_scale_float64():
    rng, seed = new_rng()
    shape = draw(rng)
    run_and_check(shape, np.dtype(np.float64), causal=False, scale=float(rng.uniform(0.01, 2.0)), rng=rng, seed=seed)


def draw_inputs(rng, shape, dtype, layout="bshd"):
    shapes = [*shape.qkv_shapes(layout), out_shape(shape, layout)]
    return [random_array(rng, s, dtype) for s in shapes]


@pytest.mark.parametrize("dtype", [np.dtype(np.float16), np.dtype(np.float64)], ids=str)
def test_vjp_equals_attention_backward(dtype):
    rng, seed = new_rng()
    shape = draw(rng)
    q, k, v, do = (to_device(a) for a in draw_inputs(rng, shape, dtype))
    out, vjp = nbflash.attention_vjp(q, k, v, causal=True)
    want_out, lse = nbflash.attention(q, k, v, causal=True, return_lse=True)
    assert np.array_equal(to_host(out), to_host(want_out), equal_nan=True), f"seed {seed}"
    got = vjp(do)
    want = nbflash.attention_backward(do, q, k, v, want_out, lse, causal=True)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert np.array_equal(to_host(g), to_host(w)), f"{name} (seed {seed})"


def test_deterministic_runs_are_bitwise_equal():
    rng, seed = new_rng()
    shape = draw(rng, group=4)
    q, k, v, do = (to_device(a) for a in draw_inputs(rng, shape, np.float32))
    out, lse = nbflash.attention(q, k, v, return_lse=True)
    first = nbflash.attention_backward(do, q, k, v, out, lse, deterministic=True)
    second = nbflash.attention_backward(do, q, k, v, out, lse, deterministic=True)
    for name, a, b in zip(("dq", "dk", "dv"), first, second):
        assert np.array_equal(to_host(a), to_host(b)), f"{name} (seed {seed})"


def test_float64_lse_is_used_as_given():
    """float64 inputs with the oracle's float64 lse: no recompute, same gradients."""
    rng, seed = new_rng()
    shape = draw(rng)
    q, k, v, do = draw_inputs(rng, shape, np.float64)
    out, lse = nbflash.reference.attention(q, k, v, causal=True, return_lse=True)
    grads = nbflash.attention_backward(*(to_device(a) for a in (do, q, k, v, out, lse)), causal=True)
    refs = nbflash.reference.attention_backward(do, q, k, v, causal=True)
    assert_grads_close(grads, refs, np.float64, seed=seed)


def test_fresh_gradients_have_input_shapes_dtype_and_layout():
    rng, seed = new_rng()
    shape = draw(rng)
    q, k, v, do = draw_inputs(rng, shape, np.float16, "bhsd")
    out, lse = nbflash.attention(q, k, v, layout="bhsd", return_lse=True)
    grads = nbflash.attention_backward(do, q, k, v, out, lse, layout="bhsd")
    for g, x in zip(grads, (q, k, v)):
        assert g.shape == x.shape and g.dtype == np.float16
    assert_grads_close(grads, nbflash.reference.attention_backward(do, q, k, v, layout="bhsd"), np.float16, seed=seed)


def test_empty_keys_give_zero_dq_and_empty_dk_dv():
    rng, _ = new_rng()
    shape = draw(rng, seqlen_k=0)
    q, k, v, do = (to_device(a) for a in draw_inputs(rng, shape, np.float32))
    out, lse = nbflash.attention(q, k, v, return_lse=True)
    dq, dk, dv = nbflash.attention_backward(do, q, k, v, out, lse, dq=poisoned(q.shape, np.float32))
    assert np.all(to_host(dq) == 0)
    assert dk.shape == k.shape and dv.shape == v.shape


def test_empty_queries_give_zero_dk_dv():
    rng, _ = new_rng()
    shape = draw(rng, seqlen_q=0)
    q, k, v, do = (to_device(a) for a in draw_inputs(rng, shape, np.float64))
    out, lse = nbflash.attention(q, k, v, return_lse=True)
    dq, dk, dv = nbflash.attention_backward(
        do, q, k, v, out, lse, dk=poisoned(k.shape, np.float64), dv=poisoned(v.shape, np.float64)
    )
    assert dq.shape == q.shape
    assert np.all(to_host(dk) == 0) and np.all(to_host(dv) == 0)


def test_portable_tiles_fit_static_shared_memory_for_every_head_dim():
    for acc_bytes, d, dv in itertools.product((4, 8), range(1, 257), (1, 2, 63, 64, 127, 128, 255, 256)):
        bm, bn, threads = tuning.backward_simt_tiles(acc_bytes, d, dv, simulator=False)
        assert tuning.backward_simt_shared_bytes(bm, bn, d, dv, acc_bytes) <= 48 * 1024, (acc_bytes, d, dv)
        assert threads % 32 == 0


def test_spec_key_spells_every_compile_time_choice():
    rng, _ = new_rng()
    shape = draw(rng, head_dim=40)
    shape.head_dim_v = 24
    q, k, v, _ = draw_inputs(rng, shape, np.float16)
    spec = nbflash.backward_spec(q, k, v, causal=True)
    assert spec.module == "backward_simt"
    assert spec.key == f"bwd_simt-fp16-d40-dv24-causal-m{spec.block_m}n{spec.block_n}t{spec.threads}"


@pytest.mark.skipif(SIMULATOR, reason="NumPy-in, NumPy-out through the GPU needs a GPU")
@pytest.mark.gpu
def test_numpy_inputs_round_trip_through_the_gpu():
    rng, seed = new_rng()
    shape = draw(rng, large=True)
    q, k, v, do = draw_inputs(rng, shape, np.float32)
    out, vjp = nbflash.attention_vjp(q, k, v, causal=True)
    assert isinstance(out, np.ndarray)
    grads = vjp(do)
    assert all(isinstance(g, np.ndarray) for g in grads)
    refs = nbflash.reference.attention_backward(do, q, k, v, causal=True)
    assert_grads_close(grads, refs, np.float32, seed=seed)
    out, lse = nbflash.attention(q, k, v, causal=True, return_lse=True)
    dq = np.full(q.shape, np.nan, np.float32)
    grads = nbflash.attention_backward(do, q, k, v, out, lse, causal=True, dq=dq)
    assert grads[0] is dq
    assert_grads_close(grads, refs, np.float32, seed=seed)


@pytest.mark.parametrize("large", TIERS)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "deterministic"])
@pytest.mark.parametrize("dtype", DTYPES[:2], ids=str)
def test_tensor_core_family_through_the_api(dtype, deterministic, large):
    """fp16/bf16 with a shipped head_dim dispatch to the tensor-core backward and
    match the oracle, causal with unequal seqlens and GQA included."""
    rng, seed = new_rng()
    head_dim = 32 if not large else int(rng.choice(sorted(tuning.MMA_BWD_TILES)))
    shape = draw(rng, large=large, head_dim=head_dim, group=int(rng.choice([1, 2])))
    shape.head_dim_v = head_dim
    q, k, v, _ = draw_inputs(rng, shape, dtype)
    spec = nbflash.backward_spec(to_device(q), to_device(k), to_device(v), causal=True, deterministic=deterministic)
    assert spec.module == "backward_mma", spec.key
    run_and_check(shape, dtype, causal=True, rng=rng, seed=seed, deterministic=deterministic)
