"""nbflash.attention against the float64 oracle on random shapes drawn fresh each run."""

from __future__ import annotations

import numpy as np
import pytest

import nbflash
from helpers import (
    DTYPES, SIMULATOR, assert_close, assert_lse_close, draw_shape, new_rng, poisoned,
    random_array, strided_pair, to_device, to_host,
)

TIERS = [pytest.param(False, id="small"), pytest.param(True, id="large", marks=pytest.mark.gpu)]


def run_and_check(shape, dtype, *, causal, layout="bshd", strided=False, rng, seed, scale=None, squeeze=False):
    q_shape, k_shape, v_shape = shape.qkv_shapes(layout)
    if squeeze:
        q_shape, k_shape, v_shape = q_shape[1:], k_shape[1:], v_shape[1:]
    if strided:
        pairs = [strided_pair(rng, s, dtype) for s in (q_shape, k_shape, v_shape)]
        (q, dq), (k, dk), (v, dv) = pairs
    else:
        q, k, v = (random_array(rng, s, dtype) for s in (q_shape, k_shape, v_shape))
        dq, dk, dv = (to_device(a) for a in (q, k, v))
    ref, ref_lse = nbflash.reference.attention(
        q, k, v, causal=causal, layout=layout, scale=scale, return_lse=True
    )
    out = poisoned(ref.shape, dtype)
    got, lse = nbflash.attention(
        dq, dk, dv,
        causal=causal, layout=layout, scale=scale, return_lse=True, out=out,
    )
    assert got is out
    assert lse.dtype == np.float32
    assert_close(got, ref, dtype, seed=seed)
    assert_lse_close(lse, ref_lse, seed=seed)


@pytest.mark.parametrize("large", TIERS)
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_shapes_match_oracle(dtype, causal, layout, large):
    rng, seed = new_rng()
    shape = draw_shape(rng, large=large)
    run_and_check(shape, dtype, causal=causal, layout=layout, rng=rng, seed=seed)


@pytest.mark.parametrize("large", TIERS)
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_gqa_ratios_match_oracle(group, large):
    rng, seed = new_rng()
    shape = draw_shape(rng, large=large, group=group)
    run_and_check(shape, np.dtype(np.float32), causal=bool(rng.integers(2)), rng=rng, seed=seed)


@pytest.mark.parametrize("large", TIERS)
@pytest.mark.parametrize("relation", ["q<k", "q=k", "q>k"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_causal_with_unequal_seqlens_is_bottom_right_aligned(dtype, relation, large):
    rng, seed = new_rng()
    n = int(rng.integers(2, 700 if large else 40))
    m = int(rng.integers(1, n))
    seqlen_q, seqlen_k = {"q<k": (m, n), "q=k": (n, n), "q>k": (n, m)}[relation]
    shape = draw_shape(rng, large=large, seqlen_q=seqlen_q, seqlen_k=seqlen_k)
    run_and_check(shape, dtype, causal=True, rng=rng, seed=seed)


@pytest.mark.parametrize("seqlens", [(1, 1), (1, 37), (37, 1)], ids=["1x1", "1xN", "Nx1"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_seqlen_one(seqlens, causal):
    rng, seed = new_rng()
    shape = draw_shape(rng, seqlen_q=seqlens[0], seqlen_k=seqlens[1])
    run_and_check(shape, np.dtype(np.float16), causal=causal, rng=rng, seed=seed)


@pytest.mark.parametrize("head_dim", [1, 3, 17])
def test_odd_head_dims(head_dim):
    rng, seed = new_rng()
    shape = draw_shape(rng, head_dim=head_dim)
    run_and_check(shape, np.dtype(np.float32), causal=False, rng=rng, seed=seed)


def test_value_head_dim_differs_from_query_head_dim():
    rng, seed = new_rng()
    shape = draw_shape(rng)
    shape.head_dim, shape.head_dim_v = 8, 21
    run_and_check(shape, np.dtype(np.float32), causal=True, rng=rng, seed=seed)


@pytest.mark.parametrize("large", TIERS)
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_strided_views_are_read_in_place(layout, large):
    rng, seed = new_rng()
    shape = draw_shape(rng, large=large)
    run_and_check(shape, np.dtype(np.float16), causal=True, layout=layout, strided=True, rng=rng, seed=seed)


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_inputs_without_batch_axis(layout):
    rng, seed = new_rng()
    shape = draw_shape(rng)
    shape.batch = 1
    run_and_check(shape, np.dtype(np.float32), causal=True, layout=layout, rng=rng, seed=seed, squeeze=True)


def test_explicit_scale():
    rng, seed = new_rng()
    shape = draw_shape(rng)
    run_and_check(shape, np.dtype(np.float64), causal=False, scale=float(rng.uniform(0.01, 2.0)), rng=rng, seed=seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_without_visible_keys_give_zero_and_minus_inf(dtype):
    rng, seed = new_rng()
    # causal with seqlen_q > seqlen_k: the first seqlen_q - seqlen_k rows see no key
    shape = draw_shape(rng, seqlen_q=int(rng.integers(20, 40)), seqlen_k=int(rng.integers(1, 10)))
    run_and_check(shape, dtype, causal=True, rng=rng, seed=seed)
    q, k, v = (random_array(rng, s, dtype) for s in shape.qkv_shapes("bshd"))
    out, lse = nbflash.attention(to_device(q), to_device(k), to_device(v), causal=True, return_lse=True)
    hidden = shape.seqlen_q - shape.seqlen_k
    assert np.all(to_host(out)[:, :hidden] == 0)
    assert np.all(np.isneginf(to_host(lse)[:, :, :hidden]))


def test_empty_keys_give_zero_output_and_minus_inf_lse():
    rng, _ = new_rng()
    shape = draw_shape(rng, seqlen_k=0)
    q, k, v = (to_device(random_array(rng, s, np.float32)) for s in shape.qkv_shapes("bshd"))
    out, lse = nbflash.attention(q, k, v, return_lse=True)
    assert out.shape == (shape.batch, shape.seqlen_q, shape.heads_q, shape.head_dim_v)
    assert np.all(to_host(out) == 0)
    assert np.all(np.isneginf(to_host(lse)))


def test_empty_queries_give_empty_outputs():
    rng, _ = new_rng()
    shape = draw_shape(rng, seqlen_q=0)
    q, k, v = (to_device(random_array(rng, s, np.float16)) for s in shape.qkv_shapes("bhsd"))
    out, lse = nbflash.attention(q, k, v, layout="bhsd", return_lse=True)
    assert out.shape == (shape.batch, shape.heads_q, 0, shape.head_dim_v)
    assert lse.shape == (shape.batch, shape.heads_q, 0)


def test_fresh_output_has_q_dtype_and_layout():
    rng, seed = new_rng()
    shape = draw_shape(rng)
    q, k, v = (random_array(rng, s, np.float16) for s in shape.qkv_shapes("bhsd"))
    out = nbflash.attention(to_device(q), to_device(k), to_device(v), layout="bhsd")
    assert out.dtype == np.float16
    assert out.shape == (shape.batch, shape.heads_q, shape.seqlen_q, shape.head_dim_v)
    assert_close(out, nbflash.reference.attention(q, k, v, layout="bhsd"), np.float16, seed=seed)


@pytest.mark.skipif(SIMULATOR, reason="NumPy-in, NumPy-out through the GPU needs a GPU")
@pytest.mark.gpu
def test_numpy_inputs_round_trip_through_the_gpu():
    rng, seed = new_rng()
    shape = draw_shape(rng, large=True)
    q, k, v = (random_array(rng, s, np.float32) for s in shape.qkv_shapes("bshd"))
    out = nbflash.attention(q, k, v, causal=True)
    assert isinstance(out, np.ndarray)
    assert_close(out, nbflash.reference.attention(q, k, v, causal=True), np.float32, seed=seed)
