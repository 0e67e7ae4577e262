"""The tensor-core backward kernels (kernels/backward_mma.py) against a float64 gradient
oracle, launched directly through launch_backward.

On the simulator their mma, ldmatrix, cp.async and atomics run emulated (one warp,
16-row tiles), so these tests check the fragment layouts of every matmul of the
backward without a GPU; the gpu tier runs the shipped tiles of every head_dim."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

import nbflash
from helpers import (
    DTYPES, SIMULATOR, TOLERANCE, gradient_magnitudes, new_rng, poisoned, random_array, to_device, to_host,
)
from nbflash import arrays, tuning
from nbflash.kernels import backward_mma

HALF_DTYPES = DTYPES[:2]
SHIPPED = sorted(tuning.MMA_BWD_TILES)
SIM_HEAD_DIM = 32  # the cheapest shipped head_dim to emulate

# Allowed error, as a multiple of the dtype's forward tolerance. dV = P^T dO has the
# forward's roundings (P rounded to 16 bits for the mma, one rounding of the result):
# factor 1. dK = scale dS^T Q and dQ = scale dS K add a second 16-bit rounding on the
# way (dS, besides P), and delta comes from the 16-bit O, so dS = P (dP - delta) carries
# O's rounding as well: twice the forward's roundings, factor 2.
FACTOR = {"dq": 2, "dk": 2, "dv": 1}


def assert_grad_close(got, ref, dtype, what, seed, magnitude):
    """Errors relative to the larger of the oracle's gradient and its magnitude without
    dS's cancellation (helpers.gradient_magnitudes)."""
    got = to_host(got).astype(np.float64)
    assert not np.isnan(got).any(), f"{what}: {np.isnan(got).sum()} NaN elements (seed {seed})"
    tol = FACTOR[what] * TOLERANCE[np.dtype(dtype)]
    size = magnitude if np.linalg.norm(magnitude) > np.linalg.norm(ref) else ref
    norm = np.linalg.norm(size)
    if norm == 0:
        assert np.all(got == 0), f"{what}: expected all zeros (seed {seed})"
        return
    rel = np.linalg.norm(got - ref) / norm
    assert rel <= tol, f"{what}: relative error {rel:.3g} > {tol:.2g} for {dtype} (seed {seed})"
    worst = np.abs(got - ref).max() / np.abs(size).max()
    assert worst <= 8 * tol, f"{what}: max error {worst:.3g} of max|ref| > {8 * tol:.2g} (seed {seed})"


def run_backward(rng, dtype, *, batch, seqlen_q, seqlen_k, heads_kv, group, head_dim, causal, deterministic):
    """Random inputs, the kernels' gradients (host float64 after the run) and the oracle's."""
    heads_q = heads_kv * group
    q = random_array(rng, (batch, seqlen_q, heads_q, head_dim), dtype)
    k = random_array(rng, (batch, seqlen_k, heads_kv, head_dim), dtype)
    v = random_array(rng, (batch, seqlen_k, heads_kv, head_dim), dtype)
    do = random_array(rng, (batch, seqlen_q, heads_q, head_dim), dtype)
    scale = 1 / math.sqrt(head_dim)
    out, lse = nbflash.reference.attention(q, k, v, causal=causal, scale=scale, return_lse=True)
    dq_ref, dk_ref, dv_ref = nbflash.reference.attention_backward(do, q, k, v, causal=causal, scale=scale)
    # what the forward stores and the preprocess kernel computes from it
    out_stored = out.astype(dtype).astype(np.float64)
    delta = np.einsum("bihd,bihd->bhi", do.astype(np.float64), out_stored).astype(np.float32)
    got = [poisoned(x.shape, dtype) for x in (q, k, v)]
    spec = backward_mma.choose_spec(arrays.short_name(dtype), head_dim, causal, SIMULATOR)
    assert spec is not None, f"no tensor-core backward for head_dim {head_dim}"
    # the atomic-dQ kernels stay tested even where the tuning ships the separate dQ kernel
    spec = dataclasses.replace(spec, dq_atomics=not deterministic)
    bits = [arrays.kernel_view(to_device(x), raw_bits=True) for x in (q, k, v, do)]
    bits += [to_device(lse.astype(np.float32)), to_device(delta)]
    bits += [arrays.kernel_view(x, raw_bits=True) for x in got]
    backward_mma.launch_backward(spec, *bits, scale, group, deterministic)
    return got, (dq_ref, dk_ref, dv_ref, do, q, k, v), spec


def check(rng, seed, dtype, **problem):
    got, refs, _ = run_backward(rng, dtype, **problem)
    sizes = gradient_magnitudes(*refs[3:], causal=problem["causal"])
    for what, g, r, m in zip(("dq", "dk", "dv"), got, refs, sizes):
        assert_grad_close(g, r, dtype, what, seed, m)
    return got, refs


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "deterministic"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_gradients_match_oracle_on_simulator_sizes(dtype, causal, deterministic):
    rng, seed = new_rng()
    seqlen_q, seqlen_k = (int(x) for x in rng.integers(1, 41, size=2))
    check(rng, seed, dtype, batch=1, seqlen_q=seqlen_q, seqlen_k=seqlen_k, heads_kv=1,
          group=int(rng.choice([1, 2])), head_dim=SIM_HEAD_DIM, causal=causal, deterministic=deterministic)


@pytest.mark.parametrize("relation", ["q<k", "q>k"])
def test_causal_unequal_seqlens_and_rows_that_see_no_key(relation):
    """q > k: bottom-right alignment leaves the first seqlen_q - seqlen_k query rows with
    no visible key; their dq must be exactly 0, and they add nothing to dk, dv."""
    rng, seed = new_rng()
    a, b = int(rng.integers(3, 17)), int(rng.integers(20, 41))
    seqlen_q, seqlen_k = (a, b) if relation == "q<k" else (b, a)
    dtype = HALF_DTYPES[int(rng.integers(2))]
    (dq, _, _), _ = check(rng, seed, dtype, batch=1, seqlen_q=seqlen_q, seqlen_k=seqlen_k, heads_kv=1,
                          group=1, head_dim=SIM_HEAD_DIM, causal=True, deterministic=bool(rng.integers(2)))
    if seqlen_q > seqlen_k:
        assert np.all(to_host(dq)[:, : seqlen_q - seqlen_k].astype(np.float64) == 0), f"seed {seed}"


def test_gqa_group_two_sums_dk_dv_over_query_heads():
    rng, seed = new_rng()
    check(rng, seed, HALF_DTYPES[int(rng.integers(2))], batch=2, seqlen_q=int(rng.integers(17, 30)),
          seqlen_k=int(rng.integers(17, 30)), heads_kv=1, group=2, head_dim=SIM_HEAD_DIM,
          causal=bool(rng.integers(2)), deterministic=False)


@pytest.mark.parametrize("empty", ["seqlen_k=0", "seqlen_q=0"])
def test_empty_sequences_give_zero_gradients(empty):
    """No keys: every row sees nothing, dq is 0. No queries: dk and dv are 0."""
    rng, seed = new_rng()
    seqlen_q, seqlen_k = (5, 0) if empty == "seqlen_k=0" else (0, 5)
    for deterministic in (False, True):
        got, _, _ = run_backward(rng, HALF_DTYPES[0], batch=1, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
                                 heads_kv=1, group=2, head_dim=SIM_HEAD_DIM, causal=False,
                                 deterministic=deterministic)
        for what, g in zip(("dq", "dk", "dv"), got):
            assert np.all(to_host(g).astype(np.float64) == 0), f"{what} not zero ({empty}, seed {seed})"


def test_deterministic_mode_is_bitwise_repeatable():
    rng, seed = new_rng()
    problem = dict(batch=1, seqlen_q=int(rng.integers(17, 35)), seqlen_k=int(rng.integers(17, 35)),
                   heads_kv=1, group=2, head_dim=SIM_HEAD_DIM, causal=bool(rng.integers(2)), deterministic=True)
    dtype = HALF_DTYPES[int(rng.integers(2))]
    state = rng.bit_generator.state
    first, _, spec = run_backward(rng, dtype, **problem)
    rng.bit_generator.state = state  # the same inputs again
    second, _, _ = run_backward(rng, dtype, **problem)
    for what, a, b in zip(("dq", "dk", "dv"), first, second):
        assert np.array_equal(to_host(a).view(np.uint16), to_host(b).view(np.uint16)), f"{what} {spec} (seed {seed})"


@pytest.mark.skipif(not SIMULATOR, reason="the simulator's tile choice is what is overridden")
@pytest.mark.parametrize("tiles", [
    ((32, 32, 32, True), (32, 32, 32, True)),
    ((32, 32, 64, False), (32, 32, 64, False)),
], ids=["two-slices-per-warp-in-registers", "two-warps"])
def test_tile_variants_on_simulator(tiles, monkeypatch):
    """What the shipped tiles use and the simulator's default does not: K/V (and Q/dO)
    A-fragments kept in registers, warps owning two 16-row slices, several warps
    sharing the dQ work items."""
    monkeypatch.setattr(tuning, "MMA_BWD_TILES_SIMULATOR", tiles)
    rng, seed = new_rng()
    for deterministic in (False, True):
        check(rng, seed, HALF_DTYPES[int(rng.integers(2))], batch=1, seqlen_q=int(rng.integers(20, 45)),
              seqlen_k=int(rng.integers(20, 45)), heads_kv=1, group=1, head_dim=SIM_HEAD_DIM,
              causal=bool(rng.integers(2)), deterministic=deterministic)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", SHIPPED)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "deterministic"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_gradients_match_oracle_every_shipped_head_dim(dtype, causal, deterministic, head_dim):
    rng, seed = new_rng()
    group = int(rng.choice([1, 2, 4]))
    check(rng, seed, dtype, batch=int(rng.integers(1, 3)), seqlen_q=int(rng.integers(1, 700)),
          seqlen_k=int(rng.integers(1, 700)), heads_kv=int(rng.integers(1, 3)), group=group,
          head_dim=head_dim, causal=causal, deterministic=deterministic)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", SHIPPED)
def test_long_and_skewed_sequences_every_shipped_head_dim(head_dim):
    rng, seed = new_rng()
    for seqlen_q, seqlen_k in ((1, 1), (1, 2000), (2000, 1), (1000, 2001), (2001, 1000)):
        check(rng, seed, HALF_DTYPES[int(rng.integers(2))], batch=1, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
              heads_kv=2, group=2, head_dim=head_dim, causal=bool(rng.integers(2)),
              deterministic=bool(rng.integers(2)))


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", SHIPPED)
def test_deterministic_mode_is_bitwise_repeatable_every_shipped_head_dim(head_dim):
    rng, seed = new_rng()
    problem = dict(batch=2, seqlen_q=777, seqlen_k=901, heads_kv=2, group=4, head_dim=head_dim,
                   causal=bool(rng.integers(2)), deterministic=True)
    state = rng.bit_generator.state
    first, _, spec = run_backward(rng, HALF_DTYPES[0], **problem)
    rng.bit_generator.state = state
    second, _, _ = run_backward(rng, HALF_DTYPES[0], **problem)
    for what, a, b in zip(("dq", "dk", "dv"), first, second):
        assert np.array_equal(to_host(a).view(np.uint16), to_host(b).view(np.uint16)), f"{what} {spec} (seed {seed})"
