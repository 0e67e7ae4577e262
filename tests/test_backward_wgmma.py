"""The Hopper wgmma backward kernels (kernels/backward_wgmma.py; on by default on sm_90,
turned on here with NBFLASH_WGMMA=1) against the float64 gradient oracle, launched
through backward_mma.launch_backward as the API does.

On the simulator their wgmma, cp.async and descriptors run as emulated warpgroup-wide
operations (one warpgroup: 64 keys per dK/dV CTA with 16-row query tiles, 64 query rows
per dQ CTA with 16-key tiles), so these tests check the staged layouts, the transposed
(MN-major) operand reads and the fragment maps of all seven matmuls without a GPU; the
gpu tier runs the shipped tiles on an H100."""

from __future__ import annotations

import numpy as np
import pytest

import nbflash
from helpers import DTYPES, check_backward_kernels, new_rng, random_array, run_backward_kernels, to_device, to_host
from nbflash import plans, tuning

HALF_DTYPES = DTYPES[:2]
SIM_HEAD_DIM = 64  # one 64-column panel: the cheapest head_dim the wgmma kernels take


@pytest.fixture(autouse=True)
def wgmma_on(monkeypatch):
    monkeypatch.setenv("NBFLASH_WGMMA", "1")
    plans.forget()
    yield
    plans.forget()


def check(rng, seed, dtype, **problem):
    return check_backward_kernels(rng, seed, dtype, deterministic=True, wgmma=True, **problem)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_gradients_match_oracle_several_tiles_each_way(dtype, causal):
    """Non-multiples of the tiles: two 64-key dK/dV CTAs, several 16-row query tiles and
    16-key dQ tiles; GQA 2 (dK/dV sum two query heads)."""
    rng, seed = new_rng()
    check(rng, seed, dtype, batch=1, seqlen_q=int(rng.integers(17, 70)), seqlen_k=int(rng.integers(65, 90)),
          heads_kv=1, group=2, head_dim=SIM_HEAD_DIM, causal=causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fused_dq_matches_oracle_several_tiles_each_way(causal):
    """The fused dK/dV/dQ kernel ("dkdvq", the default non-deterministic path): dS^T
    through shared memory, dQ = dS K by wgmma with A read transposed, float32 red.add
    into the accumulator, then dq_convert. 64-row query tiles (the dQ wgmma's M), two
    64-key CTAs, a partial key tile (its P must not leak into dQ), GQA 2."""
    rng, seed = new_rng()
    check_backward_kernels(rng, seed, HALF_DTYPES[int(rng.integers(2))], deterministic=False, wgmma=True, batch=1,
                           seqlen_q=int(rng.integers(65, 140)), seqlen_k=int(rng.integers(65, 120)), heads_kv=1,
                           group=2, head_dim=SIM_HEAD_DIM, causal=causal)


def test_fused_dq_head_dim_128_chunks():
    """head_dim 128: dQ in 32-column chunks (tuning.wgmma_bwd_dq_cols), two per panel of
    K, the second starting 64 bytes into the swizzled rows."""
    rng, seed = new_rng()
    assert tuning.wgmma_bwd_dq_cols(128) < 64
    check_backward_kernels(rng, seed, HALF_DTYPES[int(rng.integers(2))], deterministic=False, wgmma=True, batch=1,
                           seqlen_q=int(rng.integers(1, 80)), seqlen_k=int(rng.integers(1, 80)), heads_kv=1,
                           group=1, head_dim=128, causal=bool(rng.integers(2)))


@pytest.mark.parametrize("size", ["small", pytest.param("large", marks=pytest.mark.gpu)])
def test_negative_sequence_strides(size):
    """q, k, v and dO viewed with the sequence axis reversed (negative row strides):
    every cp.async row address steps by the signed stride; the public API, GQA 2. The
    simulator's twin indexes the arrays, so only the device runs the stride arithmetic:
    "large" (the shipped tiles, both head_dims) is the gpu tier's case."""
    from helpers import assert_grad_close, gradient_magnitudes
    from nbflash import reference

    rng, seed = new_rng()
    dtype = HALF_DTYPES[int(rng.integers(2))]
    causal = bool(rng.integers(2))
    if size == "small":
        head_dim, seqlen_q, seqlen_k = SIM_HEAD_DIM, int(rng.integers(17, 70)), int(rng.integers(65, 90))
    else:
        head_dim, seqlen_q, seqlen_k = int(rng.choice([64, 128])), int(rng.integers(300, 700)), int(rng.integers(300, 700))
    q, do = (random_array(rng, (1, seqlen_q, 2, head_dim), dtype) for _ in range(2))
    k, v = (random_array(rng, (1, seqlen_k, 1, head_dim), dtype) for _ in range(2))
    qr, kr, vr, dor = (to_device(a)[:, ::-1] for a in (q, k, v, do))
    assert "wgmma" in nbflash.backward_spec(qr, kr, vr, causal=causal).key
    out, lse = nbflash.attention(qr, kr, vr, causal=causal, return_lse=True)
    grads = nbflash.attention_backward(dor, qr, kr, vr, out, lse, causal=causal)
    host = [a[:, ::-1].astype(np.float64) for a in (do, q, k, v)]
    refs = reference.attention_backward(*host, causal=causal)
    sizes = gradient_magnitudes(*host, causal=causal)
    for name, got, ref, m in zip(("dq", "dk", "dv"), grads, refs, sizes):
        assert_grad_close(got, ref, dtype, name, seed, m)


@pytest.mark.parametrize("relation", ["q<k", "q>k"])
def test_causal_unequal_seqlens_and_rows_that_see_no_key(relation):
    rng, seed = new_rng()
    a, b = int(rng.integers(1, 20)), int(rng.integers(30, 70))
    seqlen_q, seqlen_k = (a, b) if relation == "q<k" else (b, a)
    (dq, _, _), _ = check(rng, seed, HALF_DTYPES[int(rng.integers(2))], batch=1, seqlen_q=seqlen_q,
                          seqlen_k=seqlen_k, heads_kv=1, group=1, head_dim=SIM_HEAD_DIM, causal=True)
    if seqlen_q > seqlen_k:
        assert np.all(to_host(dq)[:, : seqlen_q - seqlen_k].astype(np.float64) == 0), f"seed {seed}"


def test_dispatch_plain_dense_only():
    """attention_backward takes the wgmma kernels for plain dense fp16/bf16 at d64/d128
    on sm_90, the mma.sync ones for variants and on other GPUs."""
    rng, _ = new_rng()
    q, k, v = (to_device(random_array(rng, (1, 5, 2, 64), HALF_DTYPES[0])) for _ in range(3))
    assert nbflash.backward_spec(q, k, v).wgmma
    assert not nbflash.backward_spec(q, k, v, softcap=5.0).wgmma
    assert tuning.wgmma_bwd_tiles(64, False, (8, 0)) is None
    assert tuning.wgmma_bwd_tiles(128, False, (9, 0)) == tuning.WGMMA_BWD_TILES[128]
    q32 = to_device(random_array(rng, (1, 5, 2, 32), HALF_DTYPES[0]))
    assert not nbflash.backward_spec(q32, q32, q32).wgmma  # no whole 64-column panel


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", sorted(tuning.WGMMA_BWD_TILES))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_gradients_match_oracle_every_shipped_head_dim(dtype, causal, head_dim):
    rng, seed = new_rng()
    check(rng, seed, dtype, batch=int(rng.integers(1, 3)), seqlen_q=int(rng.integers(1, 700)),
          seqlen_k=int(rng.integers(1, 700)), heads_kv=int(rng.integers(1, 3)), group=int(rng.choice([1, 2, 4])),
          head_dim=head_dim, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", sorted(tuning.WGMMA_BWD_TILES))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fused_dq_every_shipped_head_dim(causal, head_dim):
    rng, seed = new_rng()
    for seqlen_q, seqlen_k in ((int(rng.integers(1, 700)), int(rng.integers(1, 700))), (1, 1), (1000, 2001),
                               (2001, 1000)):
        check_backward_kernels(rng, seed, HALF_DTYPES[int(rng.integers(2))], deterministic=False, wgmma=True,
                               batch=int(rng.integers(1, 3)), seqlen_q=seqlen_q, seqlen_k=seqlen_k,
                               heads_kv=int(rng.integers(1, 3)), group=int(rng.choice([1, 2, 4])), head_dim=head_dim,
                               causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", sorted(tuning.WGMMA_BWD_TILES))
def test_long_and_skewed_sequences_every_shipped_head_dim(head_dim):
    rng, seed = new_rng()
    for seqlen_q, seqlen_k in ((1, 1), (1, 2000), (2000, 1), (1000, 2001), (2001, 1000)):
        check(rng, seed, HALF_DTYPES[int(rng.integers(2))], batch=1, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
              heads_kv=2, group=2, head_dim=head_dim, causal=bool(rng.integers(2)))


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", sorted(tuning.WGMMA_BWD_TILES))
def test_bitwise_repeatable(head_dim):
    rng, seed = new_rng()
    problem = dict(batch=2, seqlen_q=777, seqlen_k=901, heads_kv=2, group=4, head_dim=head_dim,
                   causal=bool(rng.integers(2)), deterministic=True, wgmma=True)
    state = rng.bit_generator.state
    first, _, spec = run_backward_kernels(rng, HALF_DTYPES[0], **problem)
    rng.bit_generator.state = state
    second, _, _ = run_backward_kernels(rng, HALF_DTYPES[0], **problem)
    for what, a, b in zip(("dq", "dk", "dv"), first, second):
        assert np.array_equal(to_host(a).view(np.uint16), to_host(b).view(np.uint16)), f"{what} {spec} (seed {seed})"
