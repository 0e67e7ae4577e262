"""Bias and mask tiles staged through shared memory (kernels/bias_tile.py) against the
per-element path and the float64 oracle: the same values laid out so cp.async can copy
them (contiguous keys, 16-byte aligned rows: staged) and one element off their 16-byte
boundary (read element by element) give the same output bit for bit, with broadcast
axes, key counts that end inside a 16-byte chunk, and rows and keys past the
sequence ends. The host's choice of path is checked on many layouts without a launch."""

from __future__ import annotations

from dataclasses import replace

import ml_dtypes
import numpy as np
import pytest

import nbflash
from helpers import (
    assert_close, assert_grads_close, assert_lse_close, new_rng, poisoned, random_array, to_device, to_host,
)
from nbflash import reference, tuning, variants
from nbflash.kernels import backward_mma, bias_tile, forward_mma
from test_variants_backward import _wgmma_off, check_dbias, magnitudes

FP16, BF16, FP32, FP64 = (np.dtype(x) for x in (np.float16, ml_dtypes.bfloat16, np.float32, np.float64))
MMA_HEAD_DIM = 32
BROADCASTS = [(1, 1, 1, 1), (0, 1, 1, 1), (1, 0, 1, 1), (0, 1, 0, 1), (0, 0, 0, 1)]  # 1: the axis is kept


@pytest.fixture(autouse=True)
def mma_not_wgmma(monkeypatch):
    """On sm_90 a staged 16-bit bias / mask at head_dim 64 and 128 runs the wgmma kernels
    (tests/test_forward_wgmma.py, tests/test_variants_backward.py): these tests keep
    comparing the mma.sync kernels' staged and per-element paths there."""
    monkeypatch.setenv("NBFLASH_WGMMA", "0")
    nbflash.plans.forget()
    yield
    nbflash.plans.forget()


def laid_out(a, offset):
    """(host view, device view) of ``a``'s values, each a window of a buffer whose rows
    are padded to 64 bytes and whose start is 64-byte aligned: with offset 0 the window
    starts there (cp.async can copy it), with offset 1 one element later (it cannot)."""
    itemsize = a.dtype.itemsize
    width = -(-(a.shape[-1] + 1) * itemsize // 64) * 64 // itemsize
    nbytes = int(np.prod(a.shape[:-1])) * width * itemsize
    raw = np.zeros(nbytes + 64, np.uint8)
    start = (-raw.ctypes.data) % 64
    buffer = raw[start:start + nbytes].view(a.dtype).reshape(a.shape[:-1] + (width,))
    window = (..., slice(offset, offset + a.shape[-1]))
    buffer[window] = a
    return buffer[window], to_device(buffer)[window]


def random_values(rng, what, full, broadcasts=BROADCASTS):
    """("bias", values) of dtype ``what`` or ("mask", bool values) for the (batch, heads,
    seqlen_q, seqlen_k) problem ``full``, with random broadcast axes (one of
    ``broadcasts``); a mask hides every key of one row."""
    dims = broadcasts[int(rng.integers(len(broadcasts)))]
    shape = tuple(n if keep else 1 for n, keep in zip(full, dims))
    if what == "mask":
        values = rng.random(shape) < 0.75
        values[..., int(rng.integers(shape[2])), :] = False  # a row that sees nothing
        return "mask", values
    return "bias", (2 * rng.standard_normal(shape)).astype(what)


def staged_run(rng, seed, dtype, what, head_dim=MMA_HEAD_DIM, large=False):
    """One problem run through the staged and the per-element path: outputs and lse
    equal bit for bit, and close to the oracle."""
    batch, heads = int(rng.integers(1, 3)), int(rng.integers(1, 3))
    longest = 700 if large else 40
    nq, nk = int(rng.integers(2, longest)), int(rng.integers(1, longest))
    q = random_array(rng, (batch, nq, heads, head_dim), dtype)
    k, v = (random_array(rng, (batch, nk, heads, head_dim), dtype) for _ in range(2))
    name, values = random_values(rng, what, (batch, heads, nq, nk))
    causal = bool(rng.integers(2))
    ref, ref_lse = nbflash.reference.attention(q, k, v, causal=causal, return_lse=True, **{name: values})
    results = []
    for offset in (0, 1):
        host, dev = laid_out(values, offset)
        qd, kd, vd = (to_device(a) for a in (q, k, v))
        spec = nbflash.forward_spec(qd, kd, vd, causal=causal, **{name: dev})
        assert spec.kernel == "mma", spec.key
        assert getattr(spec.variant, f"{name}_staged") == (offset == 0), spec.key
        got, lse = nbflash.attention(qd, kd, vd, causal=causal, return_lse=True, **{name: dev})
        assert_close(got, ref, dtype, seed=seed)
        assert_lse_close(lse, ref_lse, seed=seed)
        results.append((to_host(got), to_host(lse)))
    (staged, staged_lse), (element, element_lse) = results
    assert np.array_equal(staged.view(np.uint16), element.view(np.uint16)), f"staged != per-element (seed {seed})"
    assert np.array_equal(staged_lse, element_lse), f"staged lse != per-element (seed {seed})"


@pytest.mark.parametrize("what", [FP16, BF16, FP32, "mask"], ids=["bias-fp16", "bias-bf16", "bias-fp32", "mask"])
def test_staged_tiles_match_the_per_element_path(what):
    rng, seed = new_rng()
    staged_run(rng, seed, [FP16, BF16][int(rng.integers(2))], what)


def test_staged_tiles_with_two_row_slices_per_warp(monkeypatch):
    """32 x 32 tiles on one warp: each thread reads two 16-row slices and four 8-key
    blocks of the stage, and copies several rows of chunks."""
    monkeypatch.setattr(tuning, "MMA_TILES_SIMULATOR", (32, 32, 32, 2, False))
    rng, seed = new_rng()
    staged_run(rng, seed, [FP16, BF16][int(rng.integers(2))], [FP16, BF16, FP32, "mask"][int(rng.integers(4))])


@pytest.mark.parametrize("causal", [False, True])
def test_staged_mask_on_tiles_inside_every_bound(causal):
    """Key counts that are whole tiles: without causal every tile applies the staged mask
    alone (the branch-free path), with causal the tiles below the diagonal do; both
    against the oracle and bit for bit against the per-element read."""
    rng, seed = new_rng()
    block_n = tuning.MMA_TILES_SIMULATOR[1]
    batch, heads = 1, int(rng.integers(1, 3))
    nk = block_n * int(rng.integers(2, 5))
    nq = nk + int(rng.integers(-block_n // 2, 3)) if causal else int(rng.integers(2, 40))
    q = random_array(rng, (batch, nq, heads, MMA_HEAD_DIM), FP16)
    k, v = (random_array(rng, (batch, nk, heads, MMA_HEAD_DIM), FP16) for _ in range(2))
    values = rng.random((batch, heads, nq, nk)) < 0.7
    values[..., int(rng.integers(nq)), :] = False  # a row that sees nothing
    ref, ref_lse = nbflash.reference.attention(q, k, v, causal=causal, return_lse=True, mask=values)
    qd, kd, vd = (to_device(a) for a in (q, k, v))
    results = []
    for offset in (0, 1):
        dev = laid_out(values, offset)[1]
        assert nbflash.forward_spec(qd, kd, vd, causal=causal, mask=dev).variant.mask_staged == (offset == 0)
        got, lse = nbflash.attention(qd, kd, vd, causal=causal, return_lse=True, mask=dev)
        assert_close(got, ref, FP16, seed=seed)
        assert_lse_close(lse, ref_lse, seed=seed)
        results.append((to_host(got).view(np.uint16), to_host(lse)))
    assert np.array_equal(results[0][0], results[1][0]), f"staged != per-element (seed {seed})"
    assert np.array_equal(results[0][1], results[1][1]), f"staged lse != per-element (seed {seed})"


@pytest.mark.parametrize("what", [FP16, BF16, FP32, "mask"], ids=["bias-fp16", "bias-bf16", "bias-fp32", "mask"])
def test_backward_staged_tiles_match_the_per_element_path(what):
    rng, seed = new_rng()
    backward_staged_run(rng, seed, what)


def backward_staged_run(rng, seed, what, head_dim=MMA_HEAD_DIM, large=False, dbias=False, light=False):
    """The mma.sync backward stages bias / mask tiles like the forward (queries x keys,
    read transposed in the dK/dV kernel) and applies them on its light path (S units,
    as forward_mma): with causal or not, the fused dQ or its own kernel
    (deterministic), GQA, broadcast axes and edges past both sequence ends, the staged
    and the per-element path (another formula: not bit for bit) both match the oracle
    within the dtype's tolerance."""
    dtype = [FP16, BF16][int(rng.integers(2))]
    batch, heads_kv, group = int(rng.integers(1, 3)), 1, int(rng.integers(1, 3))
    heads = heads_kv * group
    longest = 700 if large else 40
    nq, nk = int(rng.integers(1, longest)), int(rng.integers(1, longest))
    causal, deterministic = bool(rng.integers(2)), bool(rng.integers(2))
    q, do = (random_array(rng, (batch, nq, heads, head_dim), dtype) for _ in range(2))
    k, v = (random_array(rng, (batch, nk, heads_kv, head_dim), dtype) for _ in range(2))
    # dbias needs the query and key axes whole
    broadcasts = [d for d in BROADCASTS if d[2] and d[3]] if dbias else BROADCASTS
    name, values = random_values(rng, what, (batch, heads, nq, nk), broadcasts)
    scale = 1 / np.sqrt(head_dim)
    extra = {}
    if light:  # beside the other light variants: softcap's s_log2, ALiBi's S units, window edges
        extra = dict(softcap=2.0, alibi_slopes=rng.uniform(0, 0.5, heads).astype(np.float32),
                     window=(int(rng.integers(0, nk + 1)), int(rng.integers(-1, 6))))
    host = dict(extra, **{name: values})
    out, lse = reference.attention(q, k, v, causal=causal, scale=scale, return_lse=True, **host)
    refs = reference.attention_backward(do, q, k, v, causal=causal, scale=scale, return_dbias=dbias, **host)
    sizes = magnitudes(do, q, k, v, causal, scale, host)
    extra = {key: (to_device(x) if isinstance(x, np.ndarray) else x) for key, x in extra.items()}
    with _wgmma_off(True):
        for offset in (0, 1):
            dev = laid_out(values, offset)[1]
            qd, kd, vd = (to_device(a) for a in (q, k, v))
            spec = nbflash.backward_spec(qd, kd, vd, causal=causal, deterministic=deterministic, **extra,
                                         **{name: dev})
            assert spec.module == "backward_mma", spec.key
            assert getattr(spec.variant, f"{name}_staged") == (offset == 0), spec.key
            grads = [poisoned(x.shape, dtype) for x in (q, k, v)]
            got = nbflash.attention_backward(
                *(to_device(x) for x in (do, q, k, v, out.astype(dtype), lse.astype(np.float32))), causal=causal,
                scale=scale, deterministic=deterministic, dq=grads[0], dk=grads[1], dv=grads[2], return_dbias=dbias,
                **extra, **{name: dev})
            assert_grads_close(got[:3], refs[:3], dtype, f"{seed}, {spec.key}", sizes[:3])
            if dbias:
                check_dbias(got[3], refs[3], values, sizes[3], dtype, f"{seed}, {spec.key}")


@pytest.mark.parametrize("what", [FP32, "mask"], ids=["bias-fp32", "mask"])
def test_backward_staged_tiles_beside_softcap_alibi_and_window(what):
    rng, seed = new_rng()
    backward_staged_run(rng, seed, what, light=True)


@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_staging_is_dropped_where_shared_memory_is_short(monkeypatch, deterministic):
    """_fit_staging keeps each launched part within the GPU's shared memory: the bias
    tile goes first, then the mask's."""
    rng, _ = new_rng()
    q = to_device(random_array(rng, (1, 8, 1, MMA_HEAD_DIM), FP16))
    bias, mask = to_device(np.zeros((8, 16), FP32)[:, :8]), to_device(np.ones((8, 16), bool)[:, :8])
    with _wgmma_off(True):
        full = nbflash.backward_spec(q, q, q, bias=bias, mask=mask, deterministic=deterministic)
        assert full.variant.bias_staged and full.variant.mask_staged, full.key
        parts = ("dkdv", "dq") + (("dkdvq",) if full.dq_atomics else ())
        need = max(backward_mma.shared_bytes(replace(full, part=p)) for p in parts)
        for limit, bias_staged, mask_staged in ((need, True, True), (need - 1, False, True), (0, False, False)):
            monkeypatch.setattr(nbflash.device, "max_shared_bytes", lambda limit=limit: limit)
            variant = nbflash.backward_spec(q, q, q, bias=bias, mask=mask, deterministic=deterministic).variant
            assert (variant.bias_staged, variant.mask_staged) == (bias_staged, mask_staged), limit


def test_backward_staged_bias_with_dbias():
    """return_dbias keeps the per-element step (it writes dS), which reads the staged
    tile when there is one."""
    rng, seed = new_rng()
    backward_staged_run(rng, seed, [FP16, BF16, FP32][int(rng.integers(3))], dbias=True)


def test_staged_bias_and_mask_with_every_variant():
    """Both tiles staged in one kernel beside window, softcap, ALiBi and dropout."""
    rng, seed = new_rng()
    batch, heads, nq, nk = 1, 2, int(rng.integers(2, 30)), int(rng.integers(8, 40))
    q = random_array(rng, (batch, nq, heads, MMA_HEAD_DIM), BF16)
    k, v = (random_array(rng, (batch, nk, heads, MMA_HEAD_DIM), BF16) for _ in range(2))
    bias, bias_dev = laid_out((2 * rng.standard_normal((heads, nq, nk))).astype(FP16), 0)
    mask, mask_dev = laid_out(rng.random((nq, nk)) < 0.8, 0)
    kwargs = dict(window=(int(rng.integers(0, nk)), int(rng.integers(-1, 6))), softcap=2.0,
                  alibi_slopes=rng.uniform(0, 0.5, heads).astype(np.float32), dropout_p=0.2,
                  seed=int(rng.integers(2**40)))
    dev = dict(kwargs, alibi_slopes=to_device(kwargs["alibi_slopes"]))
    qd, kd, vd = (to_device(a) for a in (q, k, v))
    spec = nbflash.forward_spec(qd, kd, vd, bias=bias_dev, mask=mask_dev, **dev)
    assert spec.variant.bias_staged and spec.variant.mask_staged, spec.key
    got, lse, keep = nbflash.attention(qd, kd, vd, bias=bias_dev, mask=mask_dev, return_lse=True,
                                       return_dropout_mask=True, **dev)
    ref, ref_lse = nbflash.reference.attention(q, k, v, bias=bias, mask=mask, return_lse=True,
                                               dropout_mask=to_host(keep), **kwargs)
    assert_close(got, ref, BF16, seed=seed)
    assert_lse_close(lse, ref_lse, seed=seed)


# --- the host's choice (no launch) ---------------------------------------------------


def choice(bias=None, mask=None, dtype=FP16, nq=5, nk=16, head_dim=MMA_HEAD_DIM):
    rng, _ = new_rng()
    q = to_device(random_array(rng, (2, nq, 2, head_dim), dtype))
    k = to_device(random_array(rng, (2, nk, 2, head_dim), dtype))
    return nbflash.forward_spec(q, k, k, bias=bias, mask=mask).variant


def test_layouts_that_cp_async_can_copy_are_staged():
    # contiguous rows of 16 bytes' multiples, broadcast (stride 0) axes, a lone key row
    assert choice(bias=np.zeros((2, 2, 5, 16), FP16)).bias_staged
    assert choice(bias=np.zeros((2, 2, 5, 8), FP16), nk=8).bias_staged
    assert choice(bias=np.zeros((1, 2, 1, 16), BF16)).bias_staged
    assert choice(bias=np.zeros(16, FP32)).bias_staged
    assert choice(bias=np.zeros((5, 8), FP16)[:, :1], nk=1).bias_staged  # one key of a 16-byte chunk
    assert choice(mask=np.ones((5, 16), bool)).mask_staged
    assert choice(mask=np.ones((2, 1, 5, 16), bool)).mask_staged


def test_layouts_cp_async_cannot_copy_are_read_per_element():
    assert not choice(bias=np.zeros((2, 2, 5, 7), FP16), nk=7).bias_staged  # 14-byte rows
    assert not choice(mask=np.ones((5, 8), bool), nk=8).mask_staged  # 8-byte rows
    assert not choice(bias=np.zeros((2, 2, 5, 1), FP16)).bias_staged  # keys broadcast (stride 0)
    assert not choice(bias=np.zeros((2, 2, 16, 5), FP16).transpose(0, 1, 3, 2)).bias_staged  # keys strided
    assert not choice(bias=np.zeros(17, FP16)[1:]).bias_staged  # base off 16 bytes
    assert not choice(bias=np.zeros((2, 2, 5, 16), FP64)).bias_staged  # float64 is read per element
    both = choice(bias=np.zeros((2, 2, 5, 8), FP16), mask=np.ones((5, 8), bool), nk=8)
    assert both.bias_staged and not both.mask_staged


def test_kernels_that_do_not_stage_get_the_per_element_spec():
    """The portable forward and backward read bias / mask per element: their specs carry
    no staged flag (one compiled kernel per key); the tensor-core backward stages them
    as the forward does."""
    assert not choice(bias=np.zeros((2, 2, 5, 16), FP32), dtype=FP32).bias_staged
    assert not choice(bias=np.zeros((2, 2, 5, 16), FP16), head_dim=MMA_HEAD_DIM + 1).bias_staged
    rng, _ = new_rng()
    bias, mask = to_device(np.zeros((5, 16), FP16)[:, :5]), to_device(np.ones((5, 16), bool)[:, :5])
    for dtype, staged in ((FP16, True), (FP32, False)):
        q, k = (to_device(random_array(rng, (1, 5, 1, MMA_HEAD_DIM), dtype)) for _ in range(2))
        assert nbflash.forward_spec(q, k, k, bias=bias, mask=mask).variant.bias_staged == staged  # aligned rows
        spec = nbflash.backward_spec(q, k, k, bias=bias, mask=mask)
        assert spec.module == ("backward_mma" if staged else "backward_simt"), spec.key
        assert spec.variant.bias and spec.variant.bias_staged == spec.variant.mask_staged == staged, spec.key


def test_staging_is_dropped_where_shared_memory_is_short():
    spec = nbflash.spec.ForwardSpec("mma", "fp16", 128, 128, False, True, 128, 64, 256, 2, False,
                                    variant=nbflash.spec.Variant(bias="fp32", bias_staged=True, mask=True,
                                                                 mask_staged=True))
    both = forward_mma.shared_bytes(spec)
    plain = forward_mma.shared_bytes(variants.fit_staging(spec, 0))
    bias_rows = bias_tile.row_words(64, 4) * 4
    assert both - plain == 2 * 128 * (bias_rows + bias_tile.row_words(64, 1) * 4)
    assert variants.fit_staging(spec, both).variant == spec.variant
    mask_only = variants.fit_staging(spec, both - 1).variant
    assert not mask_only.bias_staged and mask_only.mask_staged
    assert not variants.fit_staging(spec, plain).variant.mask_staged


def test_staged_tiles_alone_keep_the_plain_tiles():
    """Staging frees the registers the per-element reads took: bias / mask staged alone
    run on the light variants' tiles (the plain ones but where MMA_VARIANT_TILES names
    others: d64 on sm_90), with dropout or beside window / softcap / ALiBi (or read
    per element) on the heavy ones (tests/test_ptx_gate_variants.py gates both)."""
    from nbflash.spec import Variant

    arch = (9, 0)
    for head_dim in sorted(tuning.MMA_TILES):
        plain = tuning.mma_tiles(head_dim, False, arch, False)
        tiles = lambda v: tuning.mma_variant_tiles(head_dim, False, arch, False, v, plain)  # noqa: E731
        light = tuning.MMA_VARIANT_TILES.get((head_dim, False, False), plain)
        assert tiles(Variant(bias="fp16", bias_staged=True, mask=True, mask_staged=True)) == light
        heavy = tuning.MMA_VARIANT_TILES.get((head_dim, False, True), plain)
        assert tiles(Variant(bias="fp16", mask=True, mask_staged=True)) == heavy
        assert tiles(Variant(bias="fp16", bias_staged=True, dropout=True)) == heavy
        assert tiles(Variant(mask=True, mask_staged=True, softcap=True)) == heavy


def test_dropped_staging_picks_the_per_element_tiles(monkeypatch):
    """Where shared memory is short the spec reads per element, on that path's tiles."""
    monkeypatch.setattr(nbflash.device, "max_shared_bytes", lambda: 1)
    spec = choice(bias=np.zeros((2, 2, 5, 16), FP16), mask=np.ones((5, 16), bool))
    assert spec.bias and spec.mask and not (spec.bias_staged or spec.mask_staged)


@pytest.mark.parametrize("block_n", [16, 32, 64, 128])
@pytest.mark.parametrize("itemsize", [1, 2, 4])
def test_staged_rows_are_padded_free_of_bank_conflicts(block_n, itemsize):
    words = bias_tile.row_words(block_n, itemsize)
    assert words % 4 == 0 and words * 4 >= block_n * itemsize  # whole 16-byte chunks
    assert bias_tile._bank_cost(words, itemsize) == 1


# --- GPU tier ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("what", [FP16, BF16, FP32, "mask"], ids=["bias-fp16", "bias-bf16", "bias-fp32", "mask"])
@pytest.mark.parametrize("head_dim", sorted(tuning.MMA_TILES))
def test_staged_tiles_at_gpu_sizes(what, head_dim):
    rng, seed = new_rng()
    staged_run(rng, seed, [FP16, BF16][int(rng.integers(2))], what, head_dim, large=True)


@pytest.mark.gpu
@pytest.mark.parametrize("what", [FP16, BF16, FP32, "mask"], ids=["bias-fp16", "bias-bf16", "bias-fp32", "mask"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_backward_staged_tiles_at_gpu_sizes(what, head_dim):
    rng, seed = new_rng()
    backward_staged_run(rng, seed, what, head_dim, large=True)
