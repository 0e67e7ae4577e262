"""Shared test helpers: the one place for random shapes, dtypes, tolerances and
host/device movement."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import ml_dtypes
import numpy as np

import nbflash

SIMULATOR = nbflash.SIMULATOR
DTYPES = [np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32), np.dtype(np.float64)]

# Normwise relative error ||out - ref|| / ||ref|| allowed per dtype. The output is
# rounded to its dtype once (2^-11 for fp16, 2^-8 for bf16), accumulation is float32
# (float64 for fp64): the bounds leave a few ulps of room, no more.
TOLERANCE = {
    np.dtype(np.float16): 3e-3,
    np.dtype(ml_dtypes.bfloat16): 1e-2,
    np.dtype(np.float32): 2e-5,
    np.dtype(np.float64): 1e-12,
}


def new_rng() -> tuple[np.random.Generator, int]:
    """A generator seeded fresh each run; the seed goes into failure messages."""
    seed = int.from_bytes(os.urandom(4), "little")
    return np.random.default_rng(seed), seed


def xp():
    """The array module kernels run on: NumPy on the simulator, CuPy on a GPU."""
    if SIMULATOR:
        return np
    import cupy

    return cupy


def to_device(a):
    return a if SIMULATOR else xp().asarray(a)


def to_host(a):
    return a if isinstance(a, np.ndarray) else a.get()


@dataclass
class Shape:
    batch: int
    seqlen_q: int
    seqlen_k: int
    heads_q: int
    heads_kv: int
    head_dim: int
    head_dim_v: int

    def qkv_shapes(self, layout):
        def one(seqlen, heads, dim):
            if layout == "bshd":
                return (self.batch, seqlen, heads, dim)
            return (self.batch, heads, seqlen, dim)

        return (
            one(self.seqlen_q, self.heads_q, self.head_dim),
            one(self.seqlen_k, self.heads_kv, self.head_dim),
            one(self.seqlen_k, self.heads_kv, self.head_dim_v),
        )


def draw_shape(rng, *, large=False, group=None, seqlen_q=None, seqlen_k=None, head_dim=None) -> Shape:
    """A random shape. Sizes avoid multiples of every tile size on purpose (odd
    lengths, odd head_dims) unless a caller pins a value. ``large`` is the GPU tier."""
    max_seq = 700 if large else 40
    max_dim = 256 if large else 24
    group = group if group is not None else int(rng.choice([1, 2, 4, 8]))
    heads_kv = int(rng.integers(1, 3))
    dim = head_dim if head_dim is not None else int(rng.integers(1, max_dim + 1))
    dim_v = dim if rng.random() < 0.6 else int(rng.integers(1, max_dim + 1))
    return Shape(
        batch=int(rng.integers(1, 3)),
        seqlen_q=seqlen_q if seqlen_q is not None else int(rng.integers(1, max_seq + 1)),
        seqlen_k=seqlen_k if seqlen_k is not None else int(rng.integers(1, max_seq + 1)),
        heads_q=heads_kv * group,
        heads_kv=heads_kv,
        head_dim=dim,
        head_dim_v=dim_v,
    )


def random_array(rng, shape, dtype, strided=False):
    """Normal values cast to ``dtype`` (host). With ``strided``, a non-contiguous view
    (a slice of a larger buffer along every axis but the last, plus padding there)."""
    if not strided:
        return rng.standard_normal(shape).astype(dtype)
    return strided_pair(rng, shape, dtype)[0]


def strided_pair(rng, shape, dtype):
    """(host view, device view) of the same values, each a strided slice of a larger
    buffer, so kernels read through real strides on the GPU too."""
    big_shape = tuple(2 * n for n in shape[:-1]) + (shape[-1] + 3,)
    big = rng.standard_normal(big_shape).astype(dtype)
    window = tuple(slice(None, None, 2) for _ in shape[:-1]) + (slice(1, 1 + shape[-1]),)
    return big[window], to_device(big)[window]


def poisoned(shape, dtype):
    """An output buffer full of NaN: an element the kernel forgets to write fails."""
    return to_device(np.full(shape, np.nan, dtype=dtype))


def assert_close(out, ref, dtype, what="out", seed=None):
    out = to_host(out).astype(np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    where = f" (seed {seed})" if seed is not None else ""
    assert out.shape == ref.shape, f"{what}: shape {out.shape} != {ref.shape}{where}"
    assert not np.isnan(out).any(), f"{what}: {np.isnan(out).sum()} NaN elements{where}"
    tol = TOLERANCE[np.dtype(dtype)]
    scale = np.linalg.norm(ref)
    if scale == 0:
        assert np.all(out == 0), f"{what}: expected all zeros{where}"
        return
    rel = np.linalg.norm(out - ref) / scale
    assert rel <= tol, f"{what}: relative error {rel:.3g} > {tol:.1g} for {dtype}{where}"
    worst = np.abs(out - ref).max() / np.abs(ref).max()
    assert worst <= 8 * tol, f"{what}: max error {worst:.3g} of max|ref| > {8 * tol:.1g}{where}"


def assert_lse_close(lse, ref, seed=None):
    """lse is float32 whatever the inputs: compare at float32 precision; -inf exactly."""
    lse = to_host(lse).astype(np.float64)
    where = f" (seed {seed})" if seed is not None else ""
    assert lse.shape == ref.shape, f"lse: shape {lse.shape} != {ref.shape}{where}"
    assert to_host(lse).dtype == np.float64  # converted above; source dtype checked by callers
    hidden = np.isneginf(ref)
    assert np.array_equal(np.isneginf(lse), hidden), f"lse: -inf rows differ{where}"
    err = np.abs(lse[~hidden] - ref[~hidden]) / (1 + np.abs(ref[~hidden]))
    assert err.size == 0 or err.max() <= 2e-5, f"lse: error {err.max():.3g}{where}"


def flops(shape: Shape, causal: bool) -> float:
    f = 2.0 * shape.batch * shape.heads_q * shape.seqlen_q * shape.seqlen_k * (shape.head_dim + shape.head_dim_v)
    return f / 2 if causal else f




# Gradients (attention_backward): normwise relative error allowed per dtype, as a
# multiple of the forward's TOLERANCE, derived from the roundings, not from runs. The
# forward's bound covers one rounding to the storage dtype (out) over float32
# accumulation (float64 for fp64). A gradient meets four: out, which enters
# delta = rowsum(dO * O) and is subtracted from dP (dP - delta can cancel, so its
# error does not shrink with the difference); P and dS, which a tensor-core family
# rounds to the storage dtype to feed mma (the portable kernels keep them in
# float32/float64); and the gradient itself. Its reductions are longer too: dK and dV
# sum over group * seqlen_q rows, dQ over seqlen_k keys after a second reduction over
# head_dim_v for dP. Letting the four roundings add linearly rather than in
# quadrature gives 4x the forward's bound; the fp32 and fp64 bounds already leave
# ample room for the longer sums (sqrt(n) growth for n ~ 10^4 terms at the gpu tier).
GRAD_ROUNDINGS = 4
GRAD_TOLERANCE = {dtype: GRAD_ROUNDINGS * tol for dtype, tol in TOLERANCE.items()}


def gradient_magnitudes(do, q, k, v, *, causal=False, scale=None, layout="bshd"):
    """(dq, dk, dv) sizes to measure errors against. dQ and dK are sums of
    dS = P * (dP - delta), which can cancel to nearly 0 (a row that sees one key has
    dS = 0 exactly) while the kernel's roundings of P, dP and delta stay the size of
    their terms; so dS is taken as P * (|dP| + |delta|) here, keeping K's and Q's signs
    (the roundings still average out over keys). dV = P^T dO has no such cancellation:
    its size is the oracle's own."""
    from nbflash import reference

    qd, kd, vd, dod = (reference._to_bshd(x, layout) for x in (q, k, v, do))
    group = qd.shape[2] // kd.shape[2]
    scale = 1.0 / np.sqrt(qd.shape[3]) if scale is None else scale
    kr, vr = np.repeat(kd, group, axis=2), np.repeat(vd, group, axis=2)
    probs = reference._softmax(qd, kr, scale, causal)[0]
    dp = np.einsum("bihd,bjhd->bhij", dod, vr)
    ds = probs * (np.abs(dp) + np.abs((probs * dp).sum(axis=-1, keepdims=True)))
    mq = scale * np.einsum("bhij,bjhd->bihd", ds, kr)
    mk = scale * np.einsum("bhij,bihd->bjhd", ds, qd)
    mv = np.einsum("bhij,bihd->bjhd", probs, dod)
    b, nk, hkv = kd.shape[:3]
    mk = mk.reshape(b, nk, hkv, group, -1).sum(axis=3)
    mv = mv.reshape(b, nk, hkv, group, -1).sum(axis=3)
    out = []
    for m in (mq, mk, mv):
        m = m if layout == "bshd" else m.transpose(0, 2, 1, 3)
        out.append(m[0] if np.ndim(q) == 3 else m)
    return out


def assert_grads_close(grads, refs, dtype, seed=None, magnitudes=None):
    """(dq, dk, dv) against the oracle's, with GRAD_TOLERANCE, normwise and elementwise
    as assert_close; never NaN. With ``magnitudes`` (gradient_magnitudes), errors are
    relative to them where they exceed the oracle's (cancelled) gradients."""
    where = f" (seed {seed})" if seed is not None else ""
    tol = GRAD_TOLERANCE[np.dtype(dtype)]
    for i, (what, got, ref) in enumerate(zip(("dq", "dk", "dv"), grads, refs)):
        got = to_host(got)
        assert got.dtype == np.dtype(dtype), f"{what}: dtype {got.dtype} != {np.dtype(dtype)}{where}"
        got = got.astype(np.float64)
        ref = np.asarray(ref, dtype=np.float64)
        assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}{where}"
        assert not np.isnan(got).any(), f"{what}: {np.isnan(got).sum()} NaN elements{where}"
        size = np.abs(ref)
        if magnitudes is not None and np.linalg.norm(magnitudes[i]) > np.linalg.norm(ref):
            size = np.abs(np.asarray(magnitudes[i], np.float64))
        scale = np.linalg.norm(size)
        if scale == 0:
            assert np.all(got == 0), f"{what}: expected all zeros{where}"
            continue
        rel = np.linalg.norm(got - ref) / scale
        assert rel <= tol, f"{what}: relative error {rel:.3g} > {tol:.1g} for {dtype}{where}"
        worst = np.abs(got - ref).max() / size.max()
        assert worst <= 8 * tol, f"{what}: max error {worst:.3g} of max|ref| > {8 * tol:.1g}{where}"


@dataclass
class VarlenShape:
    """A packed batch for attention_varlen: per-sequence query and key lengths."""

    seqlens_q: list
    seqlens_k: list
    heads_q: int
    heads_kv: int
    head_dim: int
    head_dim_v: int

    def cu_seqlens(self):
        """(cu_seqlens_q, cu_seqlens_k), int32 prefix sums starting at 0 (host)."""
        return tuple(np.concatenate([[0], np.cumsum(n, dtype=np.int64)]).astype(np.int32)
                     for n in (self.seqlens_q, self.seqlens_k))

    def qkv_shapes(self):
        total_q, total_k = sum(self.seqlens_q), sum(self.seqlens_k)
        return ((total_q, self.heads_q, self.head_dim), (total_k, self.heads_kv, self.head_dim),
                (total_k, self.heads_kv, self.head_dim_v))

    def flops(self, causal: bool) -> float:
        """Multiply-adds x 2 over the visible (query, key) pairs of every sequence."""
        pairs = 0
        for nq, nk in zip(self.seqlens_q, self.seqlens_k):
            if causal:  # query i sees keys 0 .. i + nk - nq
                pairs += sum(max(0, min(nk, i + nk - nq + 1)) for i in range(nq))
            else:
                pairs += nq * nk
        return 2.0 * self.heads_q * pairs * (self.head_dim + self.head_dim_v)


def draw_varlen(rng, *, large=False, batch=None, group=None, head_dim=None) -> VarlenShape:
    """A random packed batch of mixed lengths, seqlen_q != seqlen_k per sequence in
    general. Every batch of 3 or more holds a sequence with no queries, one with no
    keys and one of length 1, in random places. ``large`` is the GPU tier (lengths
    up to thousands)."""
    max_len = 3000 if large else 24
    batch = batch if batch is not None else int(rng.integers(4, 10) if large else rng.integers(3, 5))
    seqlens_q = [int(x) for x in rng.integers(1, max_len + 1, size=batch)]
    seqlens_k = [int(x) for x in rng.integers(1, max_len + 1, size=batch)]
    if batch >= 3:
        no_q, no_k, one = (int(i) for i in rng.permutation(batch)[:3])
        seqlens_q[no_q] = 0
        seqlens_k[no_k] = 0
        seqlens_q[one] = seqlens_k[one] = 1
    group = group if group is not None else int(rng.choice([1, 2, 4]))
    heads_kv = int(rng.integers(1, 3))
    max_dim = 256 if large else 24
    dim = head_dim if head_dim is not None else int(rng.integers(1, max_dim + 1))
    dim_v = dim if (head_dim is not None or rng.random() < 0.6) else int(rng.integers(1, max_dim + 1))
    return VarlenShape(seqlens_q, seqlens_k, heads_kv * group, heads_kv, dim, dim_v)


def check_forward_kernel(rng, seed, shape, dtype, causal, kernel, layout="bshd", **variants):
    """nbflash.attention on random inputs of ``shape`` runs spec.kernel == ``kernel`` and
    matches the float64 oracle (out into a poisoned buffer, and lse); ``variants`` (window,
    softcap, alibi_slopes as host arrays, ...) go to both. Returns the spec."""
    q, k, v = (to_device(random_array(rng, s, dtype)) for s in shape.qkv_shapes(layout))
    dev = {name: (to_device(x) if isinstance(x, np.ndarray) else x) for name, x in variants.items()}
    spec = nbflash.forward_spec(q, k, v, causal=causal, layout=layout, return_lse=True, **dev)
    assert spec.kernel == kernel, f"expected the {kernel} kernel, got {spec.key}"
    host = [to_host(a) for a in (q, k, v)]
    ref, ref_lse = nbflash.reference.attention(*host, causal=causal, layout=layout, return_lse=True, **variants)
    out = poisoned(ref.shape, dtype)
    got, lse = nbflash.attention(q, k, v, causal=causal, layout=layout, return_lse=True, out=out, **dev)
    assert_close(got, ref, dtype, seed=seed)
    assert_lse_close(lse, ref_lse, seed=seed)
    return spec


# ---- the tensor-core backward kernels, launched directly -------------------------
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


def run_backward_kernels(rng, dtype, *, batch, seqlen_q, seqlen_k, heads_kv, group, head_dim, causal,
                         deterministic, wgmma=False, tiles=None):
    """Random inputs, the tensor-core backward's gradients (run through
    kernels.backward_mma.launch_backward, the wgmma family when ``wgmma``; ``tiles``: spec
    fields to override, e.g. two warpgroups) and the oracle's: (dq, dk, dv), (dq_ref,
    dk_ref, dv_ref, do, q, k, v), spec."""
    from nbflash.kernels import backward_mma

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
    spec = backward_mma.choose_spec(nbflash.arrays.short_name(dtype), head_dim, causal, SIMULATOR, wgmma=wgmma)
    assert spec is not None and spec.wgmma == wgmma, f"no such tensor-core backward for head_dim {head_dim}"
    if not wgmma:  # the atomic-dQ kernels stay tested even where the tuning ships the separate dQ kernel
        spec = dataclasses.replace(spec, dq_atomics=not deterministic)
    elif not deterministic and not spec.dq_atomics:  # the fused dQ needs 64-row query tiles (the simulator's are 16)
        spec = dataclasses.replace(spec, dq_atomics=True, block_m=64)
    if tiles:
        spec = dataclasses.replace(spec, **tiles)
    bits = [nbflash.arrays.kernel_view(to_device(x), raw_bits=True) for x in (q, k, v, do)]
    bits += [to_device(lse.astype(np.float32)), to_device(delta)]
    bits += [nbflash.arrays.kernel_view(x, raw_bits=True) for x in got]
    backward_mma.launch_backward(spec, *bits, scale, group, deterministic)
    return got, (dq_ref, dk_ref, dv_ref, do, q, k, v), spec


def check_backward_kernels(rng, seed, dtype, **problem):
    """run_backward_kernels, then every gradient against the oracle (assert_grad_close)."""
    got, refs, _ = run_backward_kernels(rng, dtype, **problem)
    sizes = gradient_magnitudes(*refs[3:], causal=problem["causal"])
    for what, g, r, m in zip(("dq", "dk", "dv"), got, refs, sizes):
        assert_grad_close(g, r, dtype, what, seed, m)
    return got, refs


def check_varlen_forward(shape: VarlenShape, dtype, *, causal, rng, seed, kernel=None, max_seqlens=False,
                         slack=0, device_seqlens=False, values=None, check_seqlens=True):
    """Run attention_varlen into a NaN-poisoned out and compare out and lse with the
    oracle. ``kernel`` pins the expected backend; ``max_seqlens`` passes the maxima
    (plus ``slack``); ``device_seqlens`` passes cu_seqlens as device arrays."""
    q, k, v = values if values is not None else (random_array(rng, s, dtype) for s in shape.qkv_shapes())
    dq, dk, dv = (to_device(a) for a in (q, k, v))
    cu_q, cu_k = shape.cu_seqlens()
    spec = nbflash.forward_spec_varlen(dq, dk, dv, causal=causal, return_lse=True)
    assert spec.varlen and "-varlen" in spec.key
    if kernel is not None:
        assert spec.kernel == kernel, f"expected the {kernel} kernel, got {spec.key}"
    ref, ref_lse = nbflash.reference.attention_varlen(q, k, v, cu_q, cu_k, causal=causal, return_lse=True)
    kwargs = {}
    if max_seqlens:
        kwargs = dict(max_seqlen_q=max(shape.seqlens_q, default=0) + slack,
                      max_seqlen_k=max(shape.seqlens_k, default=0) + slack)
    if device_seqlens:
        cu_q, cu_k = to_device(cu_q), to_device(cu_k)
    out = poisoned(ref.shape, dtype)
    got, lse = nbflash.attention_varlen(dq, dk, dv, cu_q, cu_k, causal=causal, return_lse=True, out=out,
                                        check_seqlens=check_seqlens, **kwargs)
    assert got is out
    assert lse.dtype == np.float32 and lse.shape == (shape.heads_q, sum(shape.seqlens_q))
    assert_close(got, ref, dtype, seed=seed)
    assert_lse_close(lse, ref_lse, seed=seed)
    return got, lse
