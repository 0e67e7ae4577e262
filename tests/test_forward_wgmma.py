"""The Hopper wgmma forward (kernels/forward_wgmma.py; on by default on sm_90, turned on here with NBFLASH_WGMMA=1) against
the float64 oracle. On the simulator its wgmma, cp.async and shuffles run as emulated
warpgroup-wide operations (one warpgroup, 64-row and 64-key tiles), so these tests check
the staged layouts, the descriptors and the fragment maps of the whole kernel without
a GPU; the gpu tier runs the shipped tiles on an H100."""

from __future__ import annotations

import pytest

import nbflash
from helpers import DTYPES, check_forward_kernel, draw_shape, new_rng, random_array, to_device
from nbflash import plans, tuning

HALF_DTYPES = DTYPES[:2]


@pytest.fixture
def wgmma_on(monkeypatch):
    """NBFLASH_WGMMA=1 for one test, and no dispatch decision remembered across it."""
    monkeypatch.setenv("NBFLASH_WGMMA", "1")
    plans.forget()
    yield
    plans.forget()


def check(rng, seed, shape, dtype, causal, layout="bshd"):
    check_forward_kernel(rng, seed, shape, dtype, causal, "wgmma", layout)


def sim_shape(rng, seqlen_q, seqlen_k, group=1, head_dim=64):
    shape = draw_shape(rng, head_dim=head_dim, group=group, seqlen_q=seqlen_q, seqlen_k=seqlen_k)
    shape.head_dim_v, shape.heads_kv, shape.heads_q, shape.batch = head_dim, 1, group, 1
    return shape


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_wgmma_kernel_matches_oracle_two_tiles_each_way(dtype, wgmma_on):
    """Non-multiples of the 64-row and 64-key tiles, two of each; GQA 2."""
    rng, seed = new_rng()
    shape = sim_shape(rng, int(rng.integers(65, 100)), int(rng.integers(65, 100)), group=2)
    check(rng, seed, shape, dtype, False, layout=str(rng.choice(["bshd", "bhsd"])))


@pytest.mark.parametrize("relation", ["q<k", "q>k"])
def test_wgmma_kernel_causal_unequal_seqlens(relation, wgmma_on):
    """Bottom-right causal: with seqlen_q > seqlen_k the first rows see no key (0, -inf)."""
    rng, seed = new_rng()
    a, b = int(rng.integers(1, 60)), int(rng.integers(66, 100))
    seqlen_q, seqlen_k = (a, b) if relation == "q<k" else (b, a)
    check(rng, seed, sim_shape(rng, seqlen_q, seqlen_k), HALF_DTYPES[int(rng.integers(2))], True)


@pytest.mark.parametrize("head_dim", [192, 256])
def test_wgmma_kernel_wide_head_dims(head_dim, wgmma_on, monkeypatch):
    """3 and 4 64-column panels: the S chain steps across Q and K panels, P V's N spans
    every panel of V (LBO); head_dim 192 copies its 24 chunks a row in strided order.
    One warpgroup with the shipped key tile (112 and 80 keys: not powers of two); two
    key tiles, the second partial."""
    block_n = tuning.WGMMA_TILES[head_dim][1]
    monkeypatch.setattr(tuning, "WGMMA_TILES_SIMULATOR", (64, block_n, 128))
    rng, seed = new_rng()
    shape = sim_shape(rng, int(rng.integers(1, 64)), int(rng.integers(block_n + 1, 2 * block_n)), head_dim=head_dim)
    check(rng, seed, shape, HALF_DTYPES[int(rng.integers(2))], bool(rng.integers(2)))


def test_wgmma_runs_by_default_on_sm90_and_only_for_plain_dense_attention(monkeypatch):
    rng, _ = new_rng()
    shape = sim_shape(rng, 5, 7)
    q, k, v = (to_device(random_array(rng, s, HALF_DTYPES[0])) for s in shape.qkv_shapes("bshd"))
    monkeypatch.delenv("NBFLASH_WGMMA", raising=False)
    assert nbflash.forward_spec(q, k, v).kernel == "mma"  # the simulator: off unless asked
    assert tuning.wgmma_tiles(64, False, (9, 0)) == tuning.WGMMA_TILES[64]  # a GPU: on by default
    monkeypatch.setenv("NBFLASH_WGMMA", "0")
    assert tuning.wgmma_tiles(64, False, (9, 0)) is None
    monkeypatch.setenv("NBFLASH_WGMMA", "1")
    assert nbflash.forward_spec(q, k, v).kernel == "wgmma"
    assert nbflash.forward_spec(q, k, v, softcap=5.0).kernel == "mma"  # variants: not in the wgmma kernel
    shape32 = draw_shape(rng, head_dim=32, group=1, seqlen_q=5, seqlen_k=7)
    shape32.head_dim_v = 32
    q, k, v = (to_device(random_array(rng, s, HALF_DTYPES[0])) for s in shape32.qkv_shapes("bshd"))
    assert nbflash.forward_spec(q, k, v).kernel == "mma"  # head_dim 32: no whole 64-column panel
    assert tuning.wgmma_tiles(64, False, (8, 0)) is None  # sm_80 has no wgmma
    assert tuning.wgmma_tiles(64, False, (9, 0)) == tuning.WGMMA_TILES[64]


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", sorted(tuning.WGMMA_TILES))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_wgmma_kernel_matches_oracle_every_shipped_head_dim(dtype, causal, head_dim, wgmma_on):
    rng, seed = new_rng()
    shape = draw_shape(rng, large=True, head_dim=head_dim)
    shape.head_dim_v = head_dim
    check(rng, seed, shape, dtype, causal, layout=str(rng.choice(["bshd", "bhsd"])))


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", sorted(tuning.WGMMA_TILES))
def test_wgmma_kernel_seqlen_one_and_long_keys(head_dim, wgmma_on):
    rng, seed = new_rng()
    for seqlen_q, seqlen_k in ((1, 1), (1, 3000), (3000, 1), (1000, 3001)):
        shape = draw_shape(rng, head_dim=head_dim, seqlen_q=seqlen_q, seqlen_k=seqlen_k)
        shape.head_dim_v = head_dim
        check(rng, seed, shape, HALF_DTYPES[0], bool(rng.integers(2)))
