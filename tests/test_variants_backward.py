"""attention_backward with the variants (issue 7): sliding window, softcap, ALiBi,
additive bias (and its gradient), boolean mask and dropout, alone and combined, on both
backward families, against the float64 oracle (nbflash.reference.attention_backward)
given the oracle forward's out and lse; and every refusal, with buffers untouched.

On the simulator the tensor-core family runs emulated (one warp, head_dim 32) and the
portable one at tiny sizes; the gpu tier runs the shipped tiles at larger sizes."""

from __future__ import annotations

import contextlib
import math
import os

import numpy as np
import pytest

import nbflash
from helpers import (
    DTYPES, GRAD_TOLERANCE, SIMULATOR, assert_close, assert_grads_close, new_rng, poisoned, random_array, to_device, to_host,
)
from nbflash import reference, tuning

HALF = DTYPES[:2]
TIERS = [pytest.param(False, id="small"), pytest.param(True, id="large", marks=pytest.mark.gpu)]
FAMILIES = ["mma", "simt"]


def sizes(rng, large):
    """(seqlen_q, seqlen_k): tiny on the simulator, past several tiles on a GPU."""
    top = 600 if large else 24
    return int(rng.integers(1, top + 1)), int(rng.integers(1, top + 1))


def pick_dtype_dim(rng, family, large):
    """A dtype and head_dim that the chosen family runs (the tensor-core family needs
    fp16/bf16 and a shipped head_dim; the portable one gets the rest)."""
    if family == "mma":
        dims = sorted(tuning.MMA_BWD_TILES) if large else [32]
        return HALF[int(rng.integers(2))], int(rng.choice(dims))
    if family == "wgmma":
        dims = sorted(tuning.WGMMA_VARIANT_HEAD_DIMS) if large else [64]
        return HALF[int(rng.integers(2))], int(rng.choice(dims))
    dtype = DTYPES[int(rng.integers(4))]
    dim = int(rng.integers(1, (160 if large else 12) + 1))
    if dtype in HALF and dim in tuning.MMA_BWD_TILES:
        dim += 1
    return dtype, dim


def random_variants(rng, shape4, heads_q, *, window=False, softcap=False, alibi=False, bias=None, mask=False,
                    dropout=False):
    """Variant arguments drawn at random; bias is a broadcast shape (tuple) or None."""
    batch, _, seqlen_q, seqlen_k = shape4
    kw = {}
    if window:
        kw["window"] = (int(rng.integers(-1, seqlen_k + 2)), int(rng.integers(-1, seqlen_k + 2)))
    if softcap:
        kw["softcap"] = float(rng.choice([1.0, 2.5, 5.0]))  # exact in float32, as the kernels take it
    if alibi:
        kw["alibi_slopes"] = rng.uniform(0.0, 0.5, size=(heads_q,) if rng.random() < 0.5 else (batch, heads_q)
                                         ).astype(np.float32)
    if bias is not None:
        kw["bias"] = rng.standard_normal(bias).astype(DTYPES[int(rng.integers(4))])
    if mask:
        kw["mask"] = rng.random((batch, 1, seqlen_q, seqlen_k)) < 0.7
    if dropout:
        kw["dropout_p"] = float(rng.choice([0.1, 0.3]))
        kw["seed"] = int(rng.integers(0, 2**63))
    return kw


def magnitudes(do, q, k, v, causal, scale, kw):
    """(dq, dk, dv, dbias) sizes without dS's cancellation (as helpers.gradient_magnitudes,
    with the variants' P, dropout factor and softcap slope)."""
    qd, kd, vd, dod = (reference._to_bshd(x, "bshd") for x in (q, k, v, do))
    group = qd.shape[2] // kd.shape[2]
    kr, vr = np.repeat(kd, group, axis=2), np.repeat(vd, group, axis=2)
    variants = reference._variants(kw.get("window"), kw.get("softcap", 0.0), kw.get("alibi_slopes"), kw.get("bias"),
                                   kw.get("mask"), kw.get("dropout_p", 0.0), kw.get("seed"), None, False)
    probs, _, _, _, slope = reference._softmax(qd, kr, scale, causal, variants)
    factor = reference._dropout_factor(variants, probs.shape)
    factor = np.ones_like(probs) if factor is None else factor
    dp = np.einsum("bihd,bjhd->bhij", dod, vr) * factor
    ds = probs * (np.abs(dp) + np.abs((probs * dp).sum(axis=-1, keepdims=True)))
    dt = ds * slope
    mq = scale * np.einsum("bhij,bjhd->bihd", dt, kr)
    mk = scale * np.einsum("bhij,bihd->bjhd", dt, qd)
    mv = np.einsum("bhij,bihd->bjhd", probs * factor, dod)
    b, nk, hkv = kd.shape[:3]
    mk = mk.reshape(b, nk, hkv, group, -1).sum(axis=3)
    mv = mv.reshape(b, nk, hkv, group, -1).sum(axis=3)
    return mq, mk, mv, ds


@contextlib.contextmanager
def _wgmma_off(off):
    """NBFLASH_WGMMA=0 inside (when ``off``): window and ALiBi would take the wgmma
    kernels at head_dim 64 and 128 on sm_90 (the "mma" family's tests mean mma.sync)."""
    before = os.environ.get("NBFLASH_WGMMA")
    if off:
        os.environ["NBFLASH_WGMMA"] = "0"
    try:
        yield
    finally:
        if off:
            if before is None:
                os.environ.pop("NBFLASH_WGMMA", None)
            else:
                os.environ["NBFLASH_WGMMA"] = before


def run(rng, seed, *, family, large=False, **options):
    """Random inputs and variants (``edit(kw)`` may change them), attention_backward on
    the family's kernels, checked against the oracle; returns (grads, kw, seqlens)."""
    with _wgmma_off(family == "mma"):
        return _run(rng, seed, family=family, large=large, **options)


def _run(rng, seed, *, family, large=False, causal=False, group=None, deterministic=None, bias=None,
         return_dbias=False, dtype=None, head_dim=None, seqlens=None, lse_dtype=None, edit=None, **flags):
    dtype_dim = pick_dtype_dim(rng, family, large)
    dtype = dtype_dim[0] if dtype is None else dtype
    head_dim = dtype_dim[1] if head_dim is None else head_dim
    group = group if group is not None else int(rng.choice([1, 2]))
    heads_kv = int(rng.integers(1, 3)) if large else 1
    heads_q = heads_kv * group
    batch = int(rng.integers(1, 3))
    seqlen_q, seqlen_k = seqlens if seqlens is not None else sizes(rng, large)
    shape4 = (batch, heads_q, seqlen_q, seqlen_k)
    if callable(bias):
        bias = bias(shape4)
    kw = random_variants(rng, shape4, heads_q, bias=bias, **flags)
    if edit is not None:
        edit(kw)
    q = random_array(rng, (batch, seqlen_q, heads_q, head_dim), dtype)
    k = random_array(rng, (batch, seqlen_k, heads_kv, head_dim), dtype)
    v = random_array(rng, (batch, seqlen_k, heads_kv, head_dim), dtype)
    do = random_array(rng, (batch, seqlen_q, heads_q, head_dim), dtype)
    scale = 1 / math.sqrt(head_dim)
    out, lse = reference.attention(q, k, v, causal=causal, scale=scale, return_lse=True, **kw)
    if lse_dtype is None:
        lse_dtype = np.float64 if (dtype == np.float64 and rng.random() < 0.5) else np.float32
    refs = reference.attention_backward(do, q, k, v, causal=causal, scale=scale, return_dbias=return_dbias, **kw)
    dev = {name: to_device(x) if isinstance(x, np.ndarray) else x for name, x in kw.items()}
    deterministic = bool(rng.integers(2)) if deterministic is None else deterministic
    spec = nbflash.backward_spec(*(to_device(x) for x in (q, k, v)), causal=causal, deterministic=deterministic,
                                 return_dbias=return_dbias, **dev)
    assert spec.module == f"backward_{family}", spec.key
    grads = [poisoned(x.shape, dtype) for x in (q, k, v)]
    got = nbflash.attention_backward(
        *(to_device(x) for x in (do, q, k, v, out.astype(dtype), lse.astype(lse_dtype))), causal=causal, scale=scale,
        deterministic=deterministic, dq=grads[0], dk=grads[1], dv=grads[2], return_dbias=return_dbias, **dev,
    )
    where = f"{seed}, {spec.key}, {kw.get('window')}"
    sizes_ = magnitudes(do, q, k, v, causal, scale, kw)
    assert_grads_close(got[:3], refs[:3], dtype, where, sizes_[:3])
    if return_dbias:
        check_dbias(got[3], refs[3], kw["bias"], sizes_[3], dtype, where)
    return got, kw, (seqlen_q, seqlen_k)


def check_dbias(got, ref, bias, ds_size, dtype, where):
    """dbias in bias's shape and dtype; errors relative to dS without cancellation, with
    the gradients' tolerance of the looser of the inputs' and the bias's dtypes."""
    got = to_host(got)
    assert got.shape == np.shape(bias) and got.dtype == bias.dtype, f"dbias: {got.shape} {got.dtype} ({where})"
    got = got.astype(np.float64)
    assert not np.isnan(got).any(), f"dbias: NaN ({where})"
    size = np.abs(reference._sum_to_shape(ds_size, np.shape(bias)))
    tol = max(GRAD_TOLERANCE[np.dtype(dtype)], GRAD_TOLERANCE[bias.dtype])
    norm = max(np.linalg.norm(size), np.linalg.norm(ref))
    if norm == 0:
        assert np.all(got == 0), f"dbias: expected zeros ({where})"
        return
    rel = np.linalg.norm(got - ref) / norm
    assert rel <= tol, f"dbias: relative error {rel:.3g} > {tol:.1g} ({where})"


ONE_EACH = ["window", "softcap", "alibi", "mask", "dropout"]


@pytest.mark.parametrize("large", TIERS)
@pytest.mark.parametrize("variant", ONE_EACH + ["bias"])
def test_each_variant_on_the_portable_family(variant, large):
    rng, seed = new_rng()
    if variant == "bias":
        run(rng, seed, family="simt", large=large, causal=bool(rng.integers(2)), bias=lambda s: s)
    else:
        run(rng, seed, family="simt", large=large, causal=bool(rng.integers(2)), **{variant: True})


@pytest.mark.parametrize("large", TIERS)
@pytest.mark.parametrize("variant", ["window", "softcap-alibi", "mask-bias", "dropout"])
def test_variants_on_the_tensor_core_family(variant, large):
    rng, seed = new_rng()
    flags = {"window": {"window": True}, "softcap-alibi": {"softcap": True, "alibi": True},
             "mask-bias": {"mask": True, "bias": lambda s: s[1:]}, "dropout": {"dropout": True}}[variant]
    run(rng, seed, family="mma", large=large, causal=bool(rng.integers(2)), **flags)


@pytest.mark.parametrize("large", TIERS)
@pytest.mark.parametrize("variant", ["window", "alibi", "softcap", "window-alibi", "window-softcap"])
def test_light_variants_on_the_wgmma_family(monkeypatch, variant, large):
    """The fused wgmma dK/dV/dQ kernel with a window (query tiles outside the band
    skipped, band edges masked), ALiBi (its term in P's exponent), softcap (tanh' from
    P) and the pairs it takes, causal or not, GQA 1 or 2."""
    rng, seed = new_rng()
    monkeypatch.setenv("NBFLASH_WGMMA", "1")
    if SIMULATOR:
        _ship_fused_dq_on_the_simulator(monkeypatch)
    flags = {name: True for name in variant.split("-")}
    run(rng, seed, family="wgmma", large=large, causal=bool(rng.integers(2)), deterministic=False, **flags)


@pytest.mark.parametrize("large", TIERS)
@pytest.mark.parametrize("variant", ["bias", "mask", "bias-mask", "bias-window-alibi", "mask-window-softcap"])
def test_staged_bias_and_mask_on_the_wgmma_family(monkeypatch, variant, large):
    """The fused wgmma kernel's bias (fp16 or bf16, broadcast shapes among them, read
    transposed with ldmatrix.trans from a swizzled stage) and mask (a padded stage),
    alone, together and beside the light variants, causal or not, GQA 1 or 2; key
    lengths a multiple of 16 so that both can be staged (rows on 16 bytes). A bias and
    a mask together do not fit beside the head_dim 128 kernel's stages: that case must
    take the mma.sync family."""
    rng, seed = new_rng()
    monkeypatch.setenv("NBFLASH_WGMMA", "1")
    monkeypatch.setenv("NBFLASH_WGMMA_BWD_SCORES", "1")
    if SIMULATOR:
        _ship_fused_dq_on_the_simulator(monkeypatch)
    flags = {name: True for name in variant.split("-") if name != "bias"}
    seqlen_q, seqlen_k = sizes(rng, large)
    seqlens = (seqlen_q, 16 * int(rng.integers(1, seqlen_k // 16 + 2)))
    bias_dtype = HALF[int(rng.integers(2))]
    shapes = [lambda s: s, lambda s: s[1:], lambda s: (s[0], 1) + s[2:], lambda s: s[2:]]
    shape = shapes[int(rng.integers(len(shapes)))] if "bias" in variant else None

    def half_bias(kw):
        if "bias" in kw:
            kw["bias"] = kw["bias"].astype(bias_dtype)

    # a bias and a mask together fit beside the head_dim 64 kernel's stages only
    head_dim = 64 if large and variant == "bias-mask" else None
    run(rng, seed, family="wgmma", large=large, causal=bool(rng.integers(2)), deterministic=False,
        seqlens=seqlens, bias=shape, edit=half_bias, head_dim=head_dim, **flags)


def test_wgmma_bias_and_mask_over_several_tiles(monkeypatch):
    """Several 64-row query tiles and 64-key CTAs, GQA 2: every iteration refills the
    one bias / mask stage for the next (query head, query tile) while the tile's other
    work runs; a bias and a mask together, causal or not."""
    rng, seed = new_rng()
    monkeypatch.setenv("NBFLASH_WGMMA", "1")
    monkeypatch.setenv("NBFLASH_WGMMA_BWD_SCORES", "1")
    if SIMULATOR:
        _ship_fused_dq_on_the_simulator(monkeypatch)
    seqlens = (int(rng.integers(130, 200)), 16 * int(rng.integers(5, 12)))
    bias_dtype = HALF[int(rng.integers(2))]

    def half_bias(kw):
        kw["bias"] = kw["bias"].astype(bias_dtype)

    run(rng, seed, family="wgmma", causal=bool(rng.integers(2)), deterministic=False, group=2, seqlens=seqlens,
        bias=lambda s: s, edit=half_bias, mask=True)


def test_wgmma_bias_and_mask_dispatch(monkeypatch):
    """Which backward runs a bias or mask on sm_90 (shipped tiles): the wgmma family for
    a staged 16-bit bias or a staged mask, the mma.sync family for a float32 bias, rows
    off 16 bytes (unstaged), softcap with a bias, and a bias with a mask at head_dim 128
    (their stages do not fit beside the fused kernel's 215 KB)."""
    monkeypatch.setenv("NBFLASH_WGMMA", "1")
    monkeypatch.setenv("NBFLASH_WGMMA_BWD_SCORES", "1")
    monkeypatch.setattr(tuning, "wgmma_bwd_tiles", lambda head_dim, simulator, arch: tuning.WGMMA_BWD_TILES[head_dim])
    monkeypatch.setattr(tuning, "wgmma_bwd_dq_atomics", lambda head_dim, simulator: True)

    def module(head_dim, seqlen_k=64, bias=None, mask=False, **kw):
        q = to_device(np.ones((1, 32, 2, head_dim), np.float16))
        k = to_device(np.ones((1, seqlen_k, 2, head_dim), np.float16))
        if bias is not None:
            kw["bias"] = to_device(np.ones((32, seqlen_k), bias))
        if mask:
            kw["mask"] = to_device(np.ones((32, seqlen_k), bool))
        return nbflash.backward_spec(q, k, k, **kw).module

    for head_dim in (64, 128):
        assert module(head_dim, bias=np.float16) == "backward_wgmma"
        assert module(head_dim, bias=DTYPES[1]) == "backward_wgmma"
        assert module(head_dim, mask=True) == "backward_wgmma"
        assert module(head_dim, mask=True, softcap=2.0) == "backward_wgmma"
        assert module(head_dim, bias=np.float32) == "backward_mma"
        assert module(head_dim, seqlen_k=60, bias=np.float16) == "backward_mma"
        assert module(head_dim, bias=np.float16, softcap=2.0) == "backward_mma"
        assert module(head_dim, bias=np.float16, deterministic=True) == "backward_mma"
    assert module(64, bias=np.float16, mask=True) == "backward_wgmma"
    assert module(128, bias=np.float16, mask=True) == "backward_mma"
    monkeypatch.setenv("NBFLASH_WGMMA_BWD_SCORES", "0")
    assert module(64, bias=np.float16) == module(64, mask=True) == "backward_mma"
    assert module(64, window=(3, 0)) == "backward_wgmma"


def test_wgmma_window_skips_query_tiles_and_leaves_band_interiors_unmasked(monkeypatch):
    """Longer sequences than the other simulator cases, several 64-row query tiles and
    64-key CTAs: tiles outside the band are skipped, tiles inside it take the unmasked
    branch and only tiles on its edges mask (left 130-159 keys, right 0-5); ALiBi or
    softcap on top at random."""
    rng, seed = new_rng()
    monkeypatch.setenv("NBFLASH_WGMMA", "1")
    if SIMULATOR:
        _ship_fused_dq_on_the_simulator(monkeypatch)
    seqlens = (int(rng.integers(150, 260)), int(rng.integers(150, 260)))
    extra = [{}, {"alibi": True}, {"softcap": True}][int(rng.integers(3))]

    def band(kw):
        kw["window"] = (int(rng.integers(130, 160)), int(rng.integers(0, 6)))

    run(rng, seed, family="wgmma", causal=bool(rng.integers(2)), deterministic=False, group=1, seqlens=seqlens,
        window=True, edit=band, **extra)


def _ship_fused_dq_on_the_simulator(monkeypatch):
    """The simulator's tuning ships no fused dQ kernel (its 16-row query tiles cannot
    feed the dQ wgmma): ship it with 64-row tiles, as helpers.run_backward_kernels runs it."""
    tiles = tuning.wgmma_bwd_tiles(64, True, (9, 0))
    monkeypatch.setattr(tuning, "wgmma_bwd_tiles", lambda head_dim, simulator, arch: ((64,) + tiles[0][1:], tiles[1]))
    monkeypatch.setattr(tuning, "wgmma_bwd_dq_atomics", lambda head_dim, simulator: True)


def test_wgmma_variants_under_deterministic_take_the_mma_family(monkeypatch):
    monkeypatch.setenv("NBFLASH_WGMMA", "1")
    if SIMULATOR:
        _ship_fused_dq_on_the_simulator(monkeypatch)
    q = to_device(np.ones((1, 8, 2, 64), np.float16))
    slopes = to_device(np.full((2,), 0.25, np.float32))
    fused = nbflash.backward_spec(q, q, q, window=(3, 0), alibi_slopes=slopes)
    assert fused.module == "backward_wgmma" and "-win-alibi" in fused.key, fused.key
    assert nbflash.backward_spec(q, q, q, window=(3, 0), deterministic=True).module == "backward_mma"
    assert nbflash.backward_spec(q, q, q, softcap=2.0).module == "backward_wgmma"
    assert nbflash.backward_spec(q, q, q, softcap=2.0, alibi_slopes=slopes).module == "backward_mma"


@pytest.mark.parametrize("large", TIERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_causal_with_window(family, large):
    """Causal folds into the window's right edge; unequal seqlens keep bottom-right alignment."""
    rng, seed = new_rng()
    run(rng, seed, family=family, large=large, causal=True, window=True)


@pytest.mark.parametrize("large", TIERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_gqa_with_every_variant_and_dbias(family, large):
    rng, seed = new_rng()
    run(rng, seed, family=family, large=large, causal=bool(rng.integers(2)), group=2, window=True, softcap=True,
        alibi=True, mask=True, dropout=True, bias=lambda s: (s[0], 1, s[2], s[3]), return_dbias=True)


BIAS_SHAPES = {
    "full": lambda s: s,
    "no-batch": lambda s: s[1:],
    "batch-broadcast": lambda s: (1, s[1], s[2], s[3]),
    "head-broadcast": lambda s: (s[0], 1, s[2], s[3]),
    "2d": lambda s: s[2:],
}


@pytest.mark.parametrize("broadcast", list(BIAS_SHAPES))
def test_dbias_sums_over_broadcast_axes(broadcast):
    rng, seed = new_rng()
    run(rng, seed, family="simt", causal=bool(rng.integers(2)), group=int(rng.choice([1, 2])),
        bias=BIAS_SHAPES[broadcast], return_dbias=True)


@pytest.mark.parametrize("large", TIERS)
def test_dbias_on_the_tensor_core_family(large):
    rng, seed = new_rng()
    run(rng, seed, family="mma", large=large, causal=bool(rng.integers(2)), bias=BIAS_SHAPES["full"],
        return_dbias=True, softcap=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_mask_with_fully_masked_rows_gives_zero_dq_there(family):
    """Rows the mask hides entirely (lse -inf) get dq = 0 exactly and add nothing to dk,
    dv, never NaN."""
    rng, seed = new_rng()
    seqlen_q, seqlen_k = int(rng.integers(4, 20)), int(rng.integers(4, 20))
    hidden = np.sort(rng.choice(seqlen_q, size=2, replace=False))

    def hide_rows(kw):
        kw["mask"][:, :, hidden, :] = False

    got, _, _ = run(rng, seed, family=family, seqlens=(seqlen_q, seqlen_k), mask=True, softcap=True, edit=hide_rows)
    assert np.all(to_host(got[0]).astype(np.float64)[:, hidden] == 0), f"seed {seed}"


@pytest.mark.parametrize("family", FAMILIES)
def test_dropout_uses_the_forward_mask_of_the_seed(family):
    """Given a seed, the gradients are the oracle's with the same seed (the mask of
    nbflash.dropout)."""
    rng, seed = new_rng()
    seqlens = (int(rng.integers(8, 20)),) * 2
    got, kw, _ = run(rng, seed, family=family, dropout=True, seqlens=seqlens, deterministic=True, dtype=np.dtype(
        np.float32) if family == "simt" else None)
    assert kw["dropout_p"] > 0


def test_float64_with_a_float32_lse_recomputes_it_with_the_variants():
    """fp64 with the forward's float32 lse: the backward recomputes a float64 lse from
    the modified scores (the portable row_lse kernel), so fp64 accuracy holds."""
    rng, seed = new_rng()
    run(rng, seed, family="simt", dtype=np.dtype(np.float64), lse_dtype=np.float32, causal=bool(rng.integers(2)),
        window=True, softcap=True, alibi=True, mask=True, bias=lambda s: s[1:])


# ---- refusals -----------------------------------------------------------------------

B, NQ, NK, HQ, HKV, D = 2, 5, 7, 4, 2, 8


def valid():
    rng, _ = new_rng()
    made = {name: to_device(rng.standard_normal(shape).astype(np.float32)) for name, shape in (
        ("do", (B, NQ, HQ, D)), ("q", (B, NQ, HQ, D)), ("k", (B, NK, HKV, D)), ("v", (B, NK, HKV, D)),
        ("out", (B, NQ, HQ, D)), ("dq", (B, NQ, HQ, D)), ("dk", (B, NK, HKV, D)), ("dv", (B, NK, HKV, D)))}
    made["lse"] = to_device(rng.standard_normal((B, HQ, NQ)).astype(np.float32))
    return made


REFUSALS = [
    (TypeError, r"window: expected a pair", dict(window=3)),
    (ValueError, r"window: left must be >= -1", dict(window=(-2, 0))),
    (ValueError, r"softcap: expected a finite number >= 0", dict(softcap=-1.0)),
    (TypeError, r"softcap: expected a real number", dict(softcap="big")),
    (ValueError, r"dropout_p: expected a number in \[0, 1\)", dict(dropout_p=1.0, seed=1)),
    (ValueError, r"seed: required when dropout_p > 0", dict(dropout_p=0.1)),
    (TypeError, r"alibi_slopes: expected dtype float32", dict(alibi_slopes=np.ones(HQ))),
    (ValueError, r"alibi_slopes: expected shape", dict(alibi_slopes=np.ones(HQ + 1, np.float32))),
    (ValueError, r"bias: shape \(3, 5, 7\) does not broadcast", dict(bias=np.ones((3, NQ, NK), np.float32))),
    (TypeError, r"bias: expected dtype float16", dict(bias=np.ones((NQ, NK), np.int32))),
    (TypeError, r"mask: expected dtype bool", dict(mask=np.ones((NQ, NK), np.float32))),
    (ValueError, r"mask: shape \(5, 6\) does not broadcast", dict(mask=np.ones((NQ, NK - 1), bool))),
    (ValueError, r"return_dbias: requires a bias", dict(return_dbias=True)),
    (ValueError, r"return_dbias: bias of shape \(1, 7\) is broadcast",
     dict(bias=np.ones((1, NK), np.float32), return_dbias=True)),
    (ValueError, r"return_dbias: bias of shape \(7,\) is broadcast", dict(bias=np.ones(NK, np.float32),
                                                                         return_dbias=True)),
    (ValueError, r"return_dbias: bias of shape \(5, 1\) is broadcast",
     dict(bias=np.ones((NQ, 1), np.float32), return_dbias=True)),
]


@pytest.mark.parametrize("exc, match, kwargs", REFUSALS, ids=[m for _, m, _ in REFUSALS])
def test_bad_variant_arguments_are_refused_with_buffers_untouched(exc, match, kwargs):
    a = valid()
    kwargs = {name: to_device(x) if isinstance(x, np.ndarray) else x for name, x in kwargs.items()}
    before = {name: to_host(x).copy() for name, x in a.items()}
    with pytest.raises(exc, match=match):
        nbflash.attention_backward(a["do"], a["q"], a["k"], a["v"], a["out"], a["lse"], dq=a["dq"], dk=a["dk"],
                                   dv=a["dv"], **kwargs)
    for name, x in a.items():
        assert np.array_equal(to_host(x), before[name]), f"{name} was modified"
    with pytest.raises(exc, match=match):  # the spec query refuses alike
        nbflash.backward_spec(a["q"], a["k"], a["v"], **kwargs)


def test_variant_spec_keys_spell_the_variants():
    a = valid()
    spec = nbflash.backward_spec(a["q"], a["k"], a["v"], causal=True, window=(4, 0), softcap=2.0,
                                 bias=to_device(np.ones((NQ, NK), np.float32)), return_dbias=True)
    assert "-causal-win-cap-bias_fp32-dbias" in spec.key, spec.key
    assert nbflash.backward_spec(a["q"], a["k"], a["v"]).key == nbflash.backward_spec(
        a["q"], a["k"], a["v"], window=(-1, -1), softcap=0.0).key  # all off: the plain kernels


@pytest.mark.parametrize("dtype", [np.dtype(np.float16), np.dtype(np.float32)], ids=str)
def test_vjp_with_variants_matches_forward_then_backward_and_the_oracle(dtype):
    """attention_vjp passes every variant to the forward and to the backward: its output
    and gradients (dbias included) equal those two calls bit for bit, and the oracle's."""
    rng, seed = new_rng()
    batch, seqlen_q, seqlen_k, heads_kv, group, dim = 2, int(rng.integers(1, 12)), int(rng.integers(1, 12)), 1, 2, 32
    heads_q = heads_kv * group
    q = random_array(rng, (batch, seqlen_q, heads_q, dim), dtype)
    k, v = (random_array(rng, (batch, seqlen_k, heads_kv, dim), dtype) for _ in range(2))
    do = random_array(rng, (batch, seqlen_q, heads_q, dim), dtype)
    bias = rng.standard_normal((heads_q, seqlen_q, seqlen_k)).astype(np.float32)  # broadcast over batch
    options = dict(causal=True, window=(int(rng.integers(0, 6)), -1), softcap=2.5,
                   alibi_slopes=rng.uniform(0, 0.3, heads_q).astype(np.float32), dropout_p=0.2, seed=seed)
    dev = [to_device(x) for x in (q, k, v, do)]
    dbias_dev = to_device(bias)
    out, vjp = nbflash.attention_vjp(*dev[:3], bias=dbias_dev, return_dbias=True, **options)
    want_out, lse = nbflash.attention(*dev[:3], bias=dbias_dev, return_lse=True, **options)
    assert np.array_equal(to_host(out), to_host(want_out), equal_nan=True), f"seed {seed}"
    got = vjp(dev[3])
    assert len(got) == 4
    want = nbflash.attention_backward(dev[3], *dev[:3], want_out, lse, bias=dbias_dev, return_dbias=True, **options)
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), got, want):
        assert np.array_equal(to_host(g), to_host(w)), f"{name} (seed {seed})"
    refs = reference.attention_backward(do, q, k, v, bias=bias, return_dbias=True, **options)
    ref_out = reference.attention(q, k, v, bias=bias, **options)
    assert_close(out, ref_out, dtype, seed=seed)
    mq, mk, mv, ds = magnitudes(do, q, k, v, True, 1 / math.sqrt(dim), dict(options, bias=bias))
    assert_grads_close(got[:3], refs[:3], dtype, seed=seed, magnitudes=(mq, mk, mv))
    check_dbias(got[3], refs[3], bias, ds, dtype, f"seed {seed}")


def test_alibi_left_right_and_crossing_tiles_on_the_tensor_core_family(monkeypatch):
    """backward_mma splits ALiBi as the forward does (key part in the S mma's initial C
    or after the tanh, query part in the lse term) on tiles left or right of every
    diagonal and takes the exact term on crossing tiles: two warps per CTA, several key
    and query tiles, not causal (so that both sides occur), dK/dV and the dQ kernel;
    with softcap or not, drawn."""
    monkeypatch.setattr(tuning, "MMA_BWD_TILES_SIMULATOR", ((16, 32, 64, False), (32, 16, 64, False)))
    rng, seed = new_rng()
    seqlens = (int(rng.integers(48, 56)), int(rng.integers(48, 56)))  # every class in both kernels
    run(rng, seed, family="mma", seqlens=seqlens, group=1, deterministic=True, alibi=True,
        softcap=bool(rng.integers(2)),
        edit=lambda kw: kw.update(alibi_slopes=rng.uniform(0.02, 0.3, np.shape(kw["alibi_slopes"])).astype(np.float32)))
