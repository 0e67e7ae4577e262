"""The tensor-core kernel (fp16/bf16, shipped head_dims) against the float64 oracle.

On the simulator its mma, ldmatrix, cp.async and shuffles run as emulated warp-wide
operations, so these tests check the fragment layouts without a GPU."""

from __future__ import annotations

import pytest

import nbflash
from helpers import DTYPES, SIMULATOR, check_forward_kernel, draw_shape, new_rng, strided_pair
from nbflash import tuning

HALF_DTYPES = DTYPES[:2]
SHIPPED = sorted(tuning.MMA_TILES)
SIM_HEAD_DIM = 32  # the cheapest shipped head_dim to emulate


@pytest.fixture(autouse=True)
def mma_not_wgmma(monkeypatch):
    """On sm_90 plain d64/d128 attention runs the wgmma kernel (tests/test_forward_wgmma.py):
    these tests keep testing the mma.sync kernel there, with no dispatch remembered across."""
    monkeypatch.setenv("NBFLASH_WGMMA", "0")
    nbflash.plans.forget()
    yield
    nbflash.plans.forget()


def check(rng, seed, shape, dtype, causal, layout="bshd"):
    check_forward_kernel(rng, seed, shape, dtype, causal, "mma", layout)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_mma_kernel_matches_oracle_on_simulator_sizes(dtype, causal):
    rng, seed = new_rng()
    shape = draw_shape(rng, head_dim=SIM_HEAD_DIM, group=int(rng.choice([1, 2])))
    shape.head_dim_v = SIM_HEAD_DIM
    shape.heads_kv, shape.heads_q = 1, shape.heads_q // shape.heads_kv
    shape.batch = 1
    check(rng, seed, shape, dtype, causal, layout=str(rng.choice(["bshd", "bhsd"])))


@pytest.mark.parametrize("relation", ["q<k", "q>k"])
def test_mma_kernel_causal_unequal_seqlens(relation):
    rng, seed = new_rng()
    a, b = int(rng.integers(1, 20)), int(rng.integers(21, 45))
    seqlen_q, seqlen_k = (a, b) if relation == "q<k" else (b, a)
    shape = draw_shape(rng, head_dim=SIM_HEAD_DIM, group=1, seqlen_q=seqlen_q, seqlen_k=seqlen_k)
    shape.head_dim_v, shape.heads_kv, shape.heads_q, shape.batch = SIM_HEAD_DIM, 1, 1, 1
    check(rng, seed, shape, HALF_DTYPES[0], True)


@pytest.mark.parametrize("head_dim", [192, 256])
def test_mma_kernel_wide_head_dims_on_simulator(head_dim):
    """head_dim 192 (not a power of two: 24 chunks a row, 12 k-steps) and 256, where
    the kernel reduces row sums inside the key loop: two key tiles, one warp's rows."""
    rng, seed = new_rng()
    shape = draw_shape(rng, head_dim=head_dim, group=1, seqlen_q=int(rng.integers(1, 17)),
                       seqlen_k=int(rng.integers(17, 32)))
    shape.head_dim_v, shape.heads_kv, shape.heads_q, shape.batch = head_dim, 1, 1, 1
    check(rng, seed, shape, HALF_DTYPES[int(rng.integers(2))], bool(rng.integers(2)))


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", SHIPPED)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_mma_kernel_matches_oracle_every_shipped_head_dim(dtype, causal, head_dim):
    rng, seed = new_rng()
    shape = draw_shape(rng, large=True, head_dim=head_dim)
    shape.head_dim_v = head_dim
    check(rng, seed, shape, dtype, causal, layout=str(rng.choice(["bshd", "bhsd"])))


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", SHIPPED)
def test_mma_kernel_seqlen_one_and_long_keys(head_dim):
    rng, seed = new_rng()
    for seqlen_q, seqlen_k in ((1, 1), (1, 3000), (3000, 1), (1000, 3001)):
        shape = draw_shape(rng, head_dim=head_dim, seqlen_q=seqlen_q, seqlen_k=seqlen_k)
        shape.head_dim_v = head_dim
        check(rng, seed, shape, HALF_DTYPES[0], bool(rng.integers(2)))


def test_unaligned_rows_fall_back_to_the_portable_kernel():
    rng, _ = new_rng()
    shape = draw_shape(rng, head_dim=SIM_HEAD_DIM)
    shape.head_dim_v = SIM_HEAD_DIM
    q, k, v = (strided_pair(rng, s, HALF_DTYPES[0])[1] for s in shape.qkv_shapes("bshd"))
    assert nbflash.forward_spec(q, k, v).kernel == "simt"


@pytest.mark.skipif(not SIMULATOR, reason="the simulator's tile choice is what is overridden")
@pytest.mark.parametrize("tiles", [(16, 16, 32, 2, True), (64, 32, 64, 2, False)], ids=["q-in-registers", "two-slices-per-warp"])
def test_mma_kernel_variants_on_simulator(tiles, monkeypatch):
    """Q kept in registers, and warps owning two 16-row slices (block_m = 32 * warps)."""
    monkeypatch.setattr(tuning, "MMA_TILES_SIMULATOR", tiles)
    rng, seed = new_rng()
    shape = draw_shape(rng, head_dim=SIM_HEAD_DIM, group=1, seqlen_q=int(rng.integers(30, 70)))
    shape.head_dim_v, shape.heads_kv, shape.heads_q, shape.batch = SIM_HEAD_DIM, 1, 1, 1
    check(rng, seed, shape, HALF_DTYPES[int(rng.integers(2))], True)
