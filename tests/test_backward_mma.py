"""The tensor-core backward kernels (kernels/backward_mma.py) against a float64 gradient
oracle, launched directly through launch_backward.

On the simulator their mma, ldmatrix, cp.async and atomics run emulated (one warp,
16-row tiles), so these tests check the fragment layouts of every matmul of the
backward without a GPU; the gpu tier runs the shipped tiles of every head_dim."""

from __future__ import annotations


import numpy as np
import pytest

import nbflash
from helpers import DTYPES, SIMULATOR, new_rng, to_host
from helpers import check_backward_kernels as check
from helpers import run_backward_kernels as run_backward
from nbflash import tuning

HALF_DTYPES = DTYPES[:2]
SHIPPED = sorted(tuning.MMA_BWD_TILES)
SIM_HEAD_DIM = 32  # the cheapest shipped head_dim to emulate


@pytest.fixture(autouse=True)
def mma_sync_kernels(monkeypatch):
    """These tests are about the mma.sync kernels: on sm_90 plain attention would take
    the wgmma ones (tests/test_backward_wgmma.py)."""
    monkeypatch.setenv("NBFLASH_WGMMA", "0")

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
