"""nbflash.attention's variants (sliding window, softcap, ALiBi, bias, boolean mask,
dropout; issue 7) against the float64 oracle, on the portable kernel (fp32, fp64,
fp16) and the tensor-core kernel (fp16, bf16), with their refusals.

The kernel follows from the dtype (and head_dim): the simulator runs the tensor-core
kernel at head_dim 32 for fp16/bf16, the portable kernel for fp32/fp64 and for fp16
at a head_dim no tensor-core tile ships."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import nbflash
from helpers import (
    assert_close, assert_lse_close, draw_shape, new_rng, poisoned, random_array, to_device,
    to_host,
)
from nbflash import dropout, tuning

FP16, BF16, FP32, FP64 = (np.dtype(x) for x in (np.float16, ml_dtypes.bfloat16, np.float32, np.float64))
# (dtype, kernel): the kernels run on the simulator; the GPU tier adds larger sizes
KERNELS = [
    pytest.param((FP32, "simt"), id="simt-fp32"),
    pytest.param((FP64, "simt"), id="simt-fp64"),
    pytest.param((FP16, "simt"), id="simt-fp16"),
    pytest.param((FP16, "mma"), id="mma-fp16"),
    pytest.param((BF16, "mma"), id="mma-bf16"),
]
MMA_HEAD_DIM = 32  # the cheapest shipped head_dim to emulate


@pytest.fixture(autouse=True)
def mma_not_wgmma(monkeypatch):
    """On sm_90 window / softcap / ALiBi at d64/d128 run the wgmma kernel (tested in
    tests/test_forward_wgmma.py): these tests keep testing the mma.sync kernel there, with
    no dispatch remembered across."""
    monkeypatch.setenv("NBFLASH_WGMMA", "0")
    nbflash.plans.forget()
    yield
    nbflash.plans.forget()
SOFTCAPS = (0.75, 2.0, 5.0)  # exact in float32: the kernels receive softcap as float32


def draw(rng, kernel, *, large=False, group=None, seqlen_q=None, seqlen_k=None):
    """A shape for ``kernel``: tiny on the simulator, head_dim 32 (or any shipped one
    on a GPU) for the tensor-core kernel, a head_dim no tile ships for fp16 simt."""
    if kernel == "mma":
        dim = int(rng.choice(sorted(tuning.MMA_TILES))) if large else MMA_HEAD_DIM
        shape = draw_shape(rng, large=large, group=group, head_dim=dim, seqlen_q=seqlen_q, seqlen_k=seqlen_k)
        shape.head_dim_v = dim
    else:
        shape = draw_shape(rng, large=large, group=group, seqlen_q=seqlen_q, seqlen_k=seqlen_k)
        if shape.head_dim in tuning.MMA_TILES:
            shape.head_dim -= 1  # (256 + 1 is past the largest head_dim)
    if not large:  # the simulator runs every thread in Python
        shape.batch = min(shape.batch, 2)
        shape.heads_kv = 1
        shape.heads_q = group if group is not None else int(rng.choice([1, 2]))
    return shape


def run(rng, test_seed, shape, dtype, kernel, *, causal=False, layout="bshd", **variants):
    """The kernel's output and lse against the oracle's for these variant arguments
    (host arrays; moved to the device here)."""
    q, k, v = (random_array(rng, s, dtype) for s in shape.qkv_shapes(layout))
    dev = {name: (to_device(x) if isinstance(x, np.ndarray) else x) for name, x in variants.items()}
    spec = nbflash.forward_spec(*(to_device(a) for a in (q, k, v)), causal=causal, layout=layout,
                                return_lse=True, **dev)
    assert spec.kernel == kernel, spec.key
    ref_extra = {}
    if variants.get("dropout_p"):
        got, lse, keep = nbflash.attention(*(to_device(a) for a in (q, k, v)), causal=causal, layout=layout,
                                           return_lse=True, return_dropout_mask=True, **dev)
        ref_extra["dropout_mask"] = to_host(keep)
    ref, ref_lse = nbflash.reference.attention(q, k, v, causal=causal, layout=layout, return_lse=True,
                                               **variants, **ref_extra)
    out = poisoned(ref.shape, dtype)
    got, lse = nbflash.attention(*(to_device(a) for a in (q, k, v)), causal=causal, layout=layout,
                                 return_lse=True, out=out, **dev)
    assert got is out
    assert_close(got, ref, dtype, seed=test_seed)
    assert_lse_close(lse, ref_lse, seed=test_seed)
    return spec


def window_of(rng, shape):
    left = int(rng.integers(-1, max(2, shape.seqlen_k // 2)))
    right = int(rng.integers(-1, max(2, shape.seqlen_k // 3)))
    if (left, right) == (-1, -1):
        left = 0
    return left, right


def slopes_of(rng, shape, per_batch):
    size = (shape.batch, shape.heads_q) if per_batch else (shape.heads_q,)
    return rng.uniform(0.0, 0.5, size).astype(np.float32)


def bias_of(rng, shape, dims, dtype=np.float32):
    full = (shape.batch, shape.heads_q, shape.seqlen_q, shape.seqlen_k)
    bshape = tuple(n if keep else 1 for n, keep in zip(full, dims))
    return (2 * rng.standard_normal(bshape)).astype(dtype)


# --- each variant alone -------------------------------------------------------


@pytest.mark.parametrize("case", KERNELS)
def test_window_alone_and_with_causal(case):
    dtype, kernel = case
    rng, seed = new_rng()
    shape = draw(rng, kernel, seqlen_q=int(rng.integers(1, 40)), seqlen_k=int(rng.integers(20, 60)))
    causal = bool(rng.integers(2))
    spec = run(rng, seed, shape, dtype, kernel, causal=causal, window=window_of(rng, shape))
    assert spec.variant.window


@pytest.mark.parametrize("case", KERNELS)
def test_softcap_and_alibi(case):
    """Each alone and both together (the order of score_mods: cap, then ALiBi)."""
    dtype, kernel = case
    rng, seed = new_rng()
    shape = draw(rng, kernel)
    which = int(rng.integers(3))
    variants = {}
    if which != 1:
        variants["softcap"] = float(rng.choice(SOFTCAPS))
    if which != 0:
        variants["alibi_slopes"] = slopes_of(rng, shape, per_batch=bool(rng.integers(2)))
    run(rng, seed, shape, dtype, kernel, causal=bool(rng.integers(2)), **variants)


@pytest.mark.parametrize("case", KERNELS)
def test_bias_broadcast_shapes(case):
    """Bias over all axes, broadcast over batch, over heads, or (seqlen_k,) alone;
    read in its own dtype."""
    dtype, kernel = case
    rng, seed = new_rng()
    shape = draw(rng, kernel)
    dims = [(1, 1, 1, 1), (0, 1, 1, 1), (1, 0, 1, 1), (0, 0, 0, 1)][int(rng.integers(4))]
    bias = bias_of(rng, shape, dims, dtype=[np.float32, dtype][int(rng.integers(2))])
    if dims == (0, 0, 0, 1):
        bias = bias.reshape(shape.seqlen_k)
    spec = run(rng, seed, shape, dtype, kernel, causal=bool(rng.integers(2)), bias=bias)
    assert spec.variant.bias == nbflash.arrays.short_name(bias.dtype)


@pytest.mark.parametrize("case", KERNELS)
def test_mask_with_fully_masked_rows(case):
    """A random boolean mask with some rows hidden entirely: output 0, lse -inf."""
    dtype, kernel = case
    rng, seed = new_rng()
    shape = draw(rng, kernel, seqlen_q=int(rng.integers(3, 30)))
    mask = rng.random((shape.batch, 1, shape.seqlen_q, shape.seqlen_k)) < 0.7  # broadcast over heads
    mask[:, :, rng.integers(0, shape.seqlen_q, 2)] = False
    run(rng, seed, shape, dtype, kernel, mask=mask)


@pytest.mark.parametrize("case", KERNELS)
def test_dropout_matches_oracle_given_its_mask(case):
    dtype, kernel = case
    rng, seed = new_rng()
    shape = draw(rng, kernel)
    p = 0.5 if dtype == FP64 else float(rng.choice([0.1, 0.3, 0.5]))  # 1/(1-p) travels as float32
    run(rng, seed, shape, dtype, kernel, causal=bool(rng.integers(2)), dropout_p=p,
        seed=int(rng.integers(0, 2**63)))


# --- combinations ---------------------------------------------------------------


@pytest.mark.parametrize("case", [KERNELS[0], KERNELS[4]])
def test_gqa_with_every_variant(case):
    dtype, kernel = case
    rng, seed = new_rng()
    shape = draw(rng, kernel, group=2, seqlen_q=int(rng.integers(5, 30)), seqlen_k=int(rng.integers(20, 40)))
    mask = rng.random((shape.seqlen_q, shape.seqlen_k)) < 0.8
    spec = run(rng, seed, shape, dtype, kernel, causal=True, window=window_of(rng, shape),
               softcap=float(rng.choice(SOFTCAPS)), alibi_slopes=slopes_of(rng, shape, True),
               bias=bias_of(rng, shape, (0, 1, 1, 1)), mask=mask, dropout_p=0.25, seed=int(rng.integers(2**32)))
    assert spec.variant.key.replace("_smem", "") == "-win-cap-alibi-bias_fp32-mask-drop"  # staged or not


def test_mma_window_skips_tiles_across_several_ctas(monkeypatch):
    """Two 16-row slices per warp and long keys: window edges inside and across tiles,
    tiles skipped at both ends."""
    monkeypatch.setattr(tuning, "MMA_TILES_SIMULATOR", (32, 16, 32, 2, False))
    rng, seed = new_rng()
    shape = draw(rng, "mma", seqlen_q=int(rng.integers(40, 70)), seqlen_k=int(rng.integers(60, 90)))
    shape.heads_q = shape.batch = 1
    window = (int(rng.integers(0, 20)), int(rng.integers(0, 12)))
    run(rng, seed, shape, BF16, "mma", causal=bool(rng.integers(2)), window=window)


# --- dropout ------------------------------------------------------------------------


def test_dropout_mask_is_the_generators_and_seeds_decide():
    rng, _ = new_rng()
    shape = draw(rng, "simt", seqlen_q=20, seqlen_k=24)
    q, k, v = (to_device(random_array(rng, s, FP32)) for s in shape.qkv_shapes("bshd"))
    s1 = int(rng.integers(2**62))
    a, keep = nbflash.attention(q, k, v, dropout_p=0.4, seed=s1, return_dropout_mask=True)
    b = nbflash.attention(q, k, v, dropout_p=0.4, seed=s1)
    c = nbflash.attention(q, k, v, dropout_p=0.4, seed=s1 + 1)
    assert to_host(keep).dtype == np.bool_
    assert to_host(keep).shape == (shape.batch, shape.heads_q, 20, 24)
    expected = dropout.keep_mask(s1, 0.4, shape.batch, shape.heads_q, 20, 24)
    assert np.array_equal(to_host(keep), expected)
    assert np.array_equal(to_host(a), to_host(b)), "same seed, same output"
    assert not np.array_equal(to_host(a), to_host(c)), "another seed, another output"


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_rate_within_statistical_bounds(p):
    """The keep rate over many elements is 1 - p within 5 standard deviations."""
    rng, seed = new_rng()
    n = 4 * 8 * 64 * 64
    keep = dropout.keep_mask(int(rng.integers(2**63)), p, 4, 8, 64, 64)
    sigma = np.sqrt(p * (1 - p) / n)
    assert abs(keep.mean() - (1 - p)) < 5 * sigma, (keep.mean(), seed)


def test_dropout_keep_rate_seen_through_the_kernel():
    """q = 0 makes P uniform and v = 1 makes each output the kept share of its row,
    rescaled by 1 / (1 - p): the kernel keeps 1 - p of the elements (5 sigma)."""
    rng, _ = new_rng()
    batch, heads, nq, nk = 1, 2, 32, 32
    q = to_device(np.zeros((batch, nq, heads, 8), np.float32))  # uniform P = 1 / nk
    k = to_device(random_array(rng, (batch, nk, heads, 8), FP32))
    v = to_device(np.ones((batch, nk, heads, 1), np.float32))
    p = 0.3
    out = to_host(nbflash.attention(q, k, v, dropout_p=p, seed=int(rng.integers(2**40))))
    n = batch * heads * nq * nk
    rate = out.mean() * (1 - p)  # the kept fraction
    assert abs(rate - (1 - p)) < 5 * np.sqrt(p * (1 - p) / n)


# --- refusals -------------------------------------------------------------------------


def small_problem(rng):
    shape = draw(rng, "simt", seqlen_q=5, seqlen_k=7)
    q, k, v = (to_device(random_array(rng, s, FP32)) for s in shape.qkv_shapes("bshd"))
    return shape, q, k, v


BAD = [
    (dict(window=(0, -2)), ValueError, "window"),
    (dict(window=(1, 2, 3)), TypeError, "window"),
    (dict(window=(1.5, 2)), TypeError, "window"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(softcap="big"), TypeError, "softcap"),
    (dict(dropout_p=1.0, seed=1), ValueError, "dropout_p"),
    (dict(dropout_p=0.2), ValueError, "seed"),
    (dict(dropout_p=0.2, seed=1.5), TypeError, "seed"),
    (dict(return_dropout_mask=1), TypeError, "return_dropout_mask"),
]


@pytest.mark.parametrize("bad", BAD, ids=lambda b: f"{b[2]}-{list(b[0].values())[0]!r}")
def test_bad_scalar_arguments_are_refused_before_writing(bad):
    kwargs, error, name = bad
    rng, _ = new_rng()
    shape, q, k, v = small_problem(rng)
    out = poisoned((shape.batch, shape.seqlen_q, shape.heads_q, shape.head_dim_v), FP32)
    with pytest.raises(error, match=name):
        nbflash.attention(q, k, v, out=out, **kwargs)
    assert np.isnan(to_host(out)).all(), "out was written"


def test_bad_arrays_are_refused_before_writing():
    rng, _ = new_rng()
    shape, q, k, v = small_problem(rng)
    b, h, nq, nk = shape.batch, shape.heads_q, shape.seqlen_q, shape.seqlen_k
    out = poisoned((b, nq, h, shape.head_dim_v), FP32)
    cases = [
        (dict(alibi_slopes=np.ones(h + 1, np.float32)), ValueError, "alibi_slopes"),
        (dict(alibi_slopes=np.ones(h, np.float64)), TypeError, "alibi_slopes"),
        (dict(bias=np.zeros((b, h, nq, nk + 1), np.float32)), ValueError, "bias"),
        (dict(bias=np.zeros((nq, nk), np.int32)), TypeError, "bias"),
        (dict(mask=np.ones((nq + 1, nk), bool)), ValueError, "mask"),
        (dict(mask=np.ones((nq, nk), np.float32)), TypeError, "mask"),
    ]
    for kwargs, error, name in cases:
        dev = {key: to_device(x) for key, x in kwargs.items()}
        with pytest.raises(error, match=name):
            nbflash.attention(q, k, v, out=out, **dev)
        with pytest.raises(error, match=name):
            nbflash.forward_spec(q, k, v, **dev)
    assert np.isnan(to_host(out)).all(), "out was written"


def test_dropout_mask_only_for_small_inputs(monkeypatch):
    rng, _ = new_rng()
    shape, q, k, v = small_problem(rng)
    monkeypatch.setattr(nbflash.api, "MAX_DROPOUT_MASK_ELEMENTS", 8)
    out = poisoned((shape.batch, shape.seqlen_q, shape.heads_q, shape.head_dim_v), FP32)
    with pytest.raises(ValueError, match="return_dropout_mask: small inputs only"):
        nbflash.attention(q, k, v, out=out, dropout_p=0.1, seed=3, return_dropout_mask=True)
    assert np.isnan(to_host(out)).all()


def test_variant_arguments_at_their_defaults_are_plain_attention():
    rng, seed = new_rng()
    shape, q, k, v = small_problem(rng)
    spec = nbflash.forward_spec(q, k, v, window=(-1, -1), softcap=0.0, dropout_p=0.0)
    assert not spec.variant and spec.key == nbflash.forward_spec(q, k, v).key
    assert_close(nbflash.attention(q, k, v, window=(-1, -1), softcap=0.0),
                 nbflash.reference.attention(to_host(q), to_host(k), to_host(v)), FP32, seed=seed)


# --- GPU tier ----------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("case", KERNELS)
def test_every_variant_at_gpu_sizes(case):
    dtype, kernel = case
    rng, seed = new_rng()
    shape = draw(rng, kernel, large=True)
    variants = dict(
        window=window_of(rng, shape), softcap=float(rng.choice(SOFTCAPS)),
        alibi_slopes=slopes_of(rng, shape, bool(rng.integers(2))),
        bias=bias_of(rng, shape, (0, 1, 1, 1), dtype=FP16),
        mask=rng.random((shape.seqlen_q, shape.seqlen_k)) < 0.9,
    )
    chosen = rng.permutation(list(variants))[: int(rng.integers(1, len(variants) + 1))]
    kwargs = {name: variants[name] for name in chosen}
    if rng.integers(2):
        kwargs.update(dropout_p=0.5 if dtype == FP64 else 0.2, seed=int(rng.integers(2**63)))
    run(rng, seed, shape, dtype, kernel, causal=bool(rng.integers(2)), layout=str(rng.choice(["bshd", "bhsd"])),
        **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", sorted(tuning.MMA_TILES))
@pytest.mark.parametrize("dtype", [FP16, BF16], ids=str)
def test_mma_sliding_window_long_sequences(dtype, head_dim):
    rng, seed = new_rng()
    shape = draw(rng, "mma", large=True, seqlen_q=int(rng.integers(1000, 3000)),
                 seqlen_k=int(rng.integers(1000, 3000)))
    shape.head_dim = shape.head_dim_v = head_dim
    shape.batch, shape.heads_kv, shape.heads_q = 1, 1, 2
    window = (int(rng.integers(0, 300)), int(rng.integers(-1, 300)))
    run(rng, seed, shape, dtype, "mma", causal=bool(rng.integers(2)), window=window,
        softcap=float(rng.choice(SOFTCAPS)), alibi_slopes=slopes_of(rng, shape, False))



# --- varlen: window, softcap, ALiBi -------------------------------------------------------


def varlen_oracle(q, k, v, cu_q, cu_k, causal, window, softcap, alibi_slopes):
    """reference.attention on each packed sequence, its own ALiBi slopes."""
    out = np.zeros((q.shape[0], q.shape[1], v.shape[2]))
    lse = np.full((q.shape[1], q.shape[0]), -np.inf)
    for b in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        s = alibi_slopes if alibi_slopes.ndim == 1 else alibi_slopes[b]
        out[qs], lse[:, qs] = nbflash.reference.attention(q[qs], k[ks], v[ks], causal=causal, window=window,
                                                          softcap=softcap, alibi_slopes=s, return_lse=True)
    return out, lse


@pytest.mark.parametrize("large", [pytest.param(False, id="small"), pytest.param(True, id="large", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("case", [KERNELS[0], KERNELS[3]])
def test_varlen_window_softcap_alibi(case, large):
    from helpers import draw_varlen

    dtype, kernel = case
    rng, seed = new_rng()
    dim = (int(rng.choice(sorted(tuning.MMA_TILES))) if large else MMA_HEAD_DIM) if kernel == "mma" else None
    shape = draw_varlen(rng, large=large, head_dim=dim, batch=None if large else 3, group=1 if not large else None)
    if kernel == "simt" and shape.head_dim in tuning.MMA_TILES:
        shape.head_dim = shape.head_dim_v = shape.head_dim - 1
    if not large:
        shape.heads_q = shape.heads_kv = 1
    q, k, v = (random_array(rng, s, dtype) for s in shape.qkv_shapes())
    cu_q, cu_k = shape.cu_seqlens()
    batch = len(shape.seqlens_q)
    window = (int(rng.integers(-1, 12)), int(rng.integers(-1, 8)))
    softcap = float(rng.choice((0.0,) + SOFTCAPS))
    slopes = rng.uniform(0, 0.5, [(shape.heads_q,), (batch, shape.heads_q)][int(rng.integers(2))]).astype(np.float32)
    causal = bool(rng.integers(2))
    kwargs = dict(window=window, softcap=softcap, alibi_slopes=slopes)
    dev = dict(kwargs, alibi_slopes=to_device(slopes))
    spec = nbflash.forward_spec_varlen(*(to_device(a) for a in (q, k, v)), causal=causal, **dev)
    assert spec.kernel == kernel and spec.varlen and spec.variant.alibi, spec.key
    ref, ref_lse = varlen_oracle(q, k, v, cu_q, cu_k, causal, **kwargs)
    out = poisoned(ref.shape, dtype)
    got, lse = nbflash.attention_varlen(*(to_device(a) for a in (q, k, v)), cu_q, cu_k, causal=causal,
                                        return_lse=True, out=out, **dev)
    assert_close(got, ref, dtype, seed=seed)
    assert_lse_close(lse, ref_lse, seed=seed)


def test_varlen_refuses_bad_slopes_before_writing():
    rng, _ = new_rng()
    q, k, v = (to_device(random_array(rng, s, FP32)) for s in ((6, 2, 8), (5, 1, 8), (5, 1, 8)))
    cu_q, cu_k = np.array([0, 2, 6], np.int32), np.array([0, 3, 5], np.int32)
    out = poisoned((6, 2, 8), FP32)
    with pytest.raises(ValueError, match="alibi_slopes"):
        nbflash.attention_varlen(q, k, v, cu_q, cu_k, out=out, alibi_slopes=to_device(np.ones((3, 2), np.float32)))
    with pytest.raises(ValueError, match="window"):
        nbflash.attention_varlen(q, k, v, cu_q, cu_k, out=out, window=(-3, 0))
    assert np.isnan(to_host(out)).all()


def test_mma_alibi_left_right_and_crossing_tiles(monkeypatch):
    """forward_mma splits ALiBi into a key part (the S mma's initial C, or added after
    the tanh) and a row part (the row's max and exponent offset) on key tiles left or
    right of every diagonal of the CTA, and takes the exact term on tiles crossing them:
    two 16-row slices per warp, several CTAs, seqlen_q != seqlen_k both ways, a slope
    per head. Not causal, so that every class occurs: seqlen_q >= 47 gives the first CTA
    key tiles right of its diagonals, seqlen_k >= 40 the last CTA tiles left of them
    (causal with ALiBi is test_softcap_and_alibi's). With softcap or not, drawn (the
    key part rides in C without it, is added after the tanh with it)."""
    monkeypatch.setattr(tuning, "MMA_TILES_SIMULATOR", (32, 16, 32, 2, False))
    rng, seed = new_rng()
    nq, nk = int(rng.integers(47, 70)), int(rng.integers(40, 90))
    shape = draw(rng, "mma", seqlen_q=nq, seqlen_k=nk)
    shape.batch, shape.heads_kv, shape.heads_q = 1, 1, 2
    slopes = rng.uniform(0.05, 1.0, shape.heads_q).astype(np.float32)
    softcap = float(rng.choice((0.0,) + SOFTCAPS))
    run(rng, seed, shape, FP16, "mma", alibi_slopes=slopes, **({"softcap": softcap} if softcap else {}))


@pytest.mark.gpu
@pytest.mark.parametrize("softcap", [0.0, 5.0])
@pytest.mark.parametrize("dtype", [FP16, BF16], ids=str)
def test_mma_alibi_long_sequences(dtype, softcap):
    """ALiBi without a window over thousands of keys: key parts far from the diagonal
    (relative to the CTA's first diagonal) and every tile class, GQA, causal or not."""
    rng, seed = new_rng()
    shape = draw(rng, "mma", large=True, seqlen_q=int(rng.integers(1000, 3000)),
                 seqlen_k=int(rng.integers(1000, 3000)), group=2)
    shape.batch = 1
    slopes = (2.0 ** -rng.uniform(0, 8, shape.heads_q)).astype(np.float32)  # ALiBi's geometric range
    run(rng, seed, shape, dtype, "mma", causal=bool(rng.integers(2)), layout=str(rng.choice(["bshd", "bhsd"])),
        alibi_slopes=slopes, **({"softcap": softcap} if softcap else {}))
