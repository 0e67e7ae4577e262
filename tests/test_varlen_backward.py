"""nbflash.attention_varlen_backward against the float64 oracle run on each packed
sequence, and its refusals (error naming the argument, buffers left as they were).

fp16/bf16 with a shipped head_dim run the single-launch varlen tensor-core backward
(BackwardMmaSpec.varlen); it is also compared with the dense backward run on each
sequence's slices (bitwise, in deterministic mode: the same kernels, tiles and
summation order). Other dtypes run the dense backward per sequence."""

from __future__ import annotations

import numpy as np
import pytest

import nbflash
from helpers import (
    DTYPES, assert_grads_close, draw_varlen, new_rng, poisoned, random_array,
    to_device, to_host, VarlenShape,
)
from test_variants_backward import magnitudes

SIM_HEAD_DIM = 32  # the cheapest shipped tensor-core head_dim to emulate


def sequence_variants(kw, b):
    """The variant arguments of packed sequence b (ALiBi slopes (batch, heads_q) -> row b)."""
    kw = dict(kw)
    slopes = kw.get("alibi_slopes")
    if slopes is not None and slopes.ndim == 2:
        kw["alibi_slopes"] = slopes[b]
    return kw


def oracle(do, q, k, v, cu_q, cu_k, causal, **kw):
    """(dq, dk, dv) and their magnitudes (test_variants_backward.magnitudes: dS without
    its cancellation), sequence by sequence, with the variants ``kw``."""
    refs = [np.zeros(x.shape) for x in (q, k, v)]
    sizes = [np.zeros(x.shape) for x in (q, k, v)]
    for b in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        if qs.start == qs.stop or ks.start == ks.stop:
            continue
        seq_kw = sequence_variants(kw, b)
        args = (do[qs], q[qs], k[ks], v[ks])
        scale = 1 / np.sqrt(q.shape[2])
        ref = nbflash.reference.attention_backward(*args, causal=causal, **seq_kw)
        size = magnitudes(*(x[None] for x in args), causal, scale, seq_kw)[:3]
        refs[0][qs], refs[1][ks], refs[2][ks] = ref
        sizes[0][qs], sizes[1][ks], sizes[2][ks] = (x[0] for x in size)
    return refs, sizes


def run_and_check(shape: VarlenShape, dtype, *, causal, rng, seed, deterministic=False, compare_dense=False,
                  **kw):
    """attention_varlen, then its backward into poisoned buffers, against the oracle;
    with compare_dense also against attention_backward on each sequence's slices
    (bitwise when deterministic). Returns the gradients."""
    q, k, v = (random_array(rng, s, dtype) for s in shape.qkv_shapes())
    cu_q, cu_k = shape.cu_seqlens()
    do = random_array(rng, (q.shape[0], q.shape[1], v.shape[2]), dtype)
    dev_kw = {name: to_device(x) if isinstance(x, np.ndarray) else x for name, x in kw.items()}
    packed = [to_device(x) for x in (q, k, v)]
    out, lse = nbflash.attention_varlen(*packed, cu_q, cu_k, causal=causal, return_lse=True, **dev_kw)
    grads = [to_device(poisoned(x.shape, dtype)) for x in (q, k, v)]
    got = nbflash.attention_varlen_backward(
        to_device(do), *packed, out, lse, cu_q, cu_k, causal=causal,
        deterministic=deterministic, dq=grads[0], dk=grads[1], dv=grads[2], **dev_kw)
    assert all(g is h for g, h in zip(got, grads))
    refs, sizes = oracle(do, q, k, v, cu_q, cu_k, causal, **kw)
    where = f"{seed}, {shape}, {kw}"
    assert_grads_close(got, refs, dtype, seed=where, magnitudes=sizes)
    if compare_dense:
        dense = dense_per_sequence(to_device(do), packed, out, lse, cu_q, cu_k, causal, deterministic, dev_kw)
        for name, a, b in zip(("dq", "dk", "dv"), got, dense):
            a, b = to_host(a).astype(np.float64), to_host(b).astype(np.float64)
            if deterministic:
                np.testing.assert_array_equal(a, b, err_msg=f"{name} ({where})")
            else:  # float32 atomics: the order of dQ's additions may differ
                assert_grads_close((a,) * 3, (b,) * 3, dtype, seed=where)
    return got


def dense_per_sequence(do, packed, out, lse, cu_q, cu_k, causal, deterministic, kw):
    """attention_backward on each sequence's slices (zeros where nothing attends)."""
    grads = [np.zeros(to_host(x).shape, to_host(x).dtype) for x in packed]
    for b in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        if qs.start == qs.stop or ks.start == ks.stop:
            continue
        part = nbflash.attention_backward(
            do[qs], packed[0][qs], packed[1][ks], packed[2][ks], out[qs], lse[:, qs], causal=causal,
            deterministic=deterministic, **sequence_variants(kw, b))
        grads[0][qs], grads[1][ks], grads[2][ks] = (to_host(x) for x in part)
    return grads


def random_varlen_variants(rng, shape: VarlenShape, **on):
    """Variant arguments for a packed batch (window, softcap, ALiBi as attention_varlen
    takes them): each drawn when ``on`` asks for it."""
    longest = max(shape.seqlens_k)
    kw = {}
    if on.get("window"):
        kw["window"] = (int(rng.integers(-1, longest + 2)), int(rng.integers(-1, longest + 2)))
    if on.get("softcap"):
        kw["softcap"] = float(rng.choice([1.0, 2.5, 5.0]))  # exact in float32
    if on.get("alibi"):
        rows = (shape.heads_q,) if rng.random() < 0.5 else (len(shape.seqlens_q), shape.heads_q)
        kw["alibi_slopes"] = rng.uniform(0.0, 0.5, size=rows).astype(np.float32)
    return kw


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_batches_match_oracle(dtype, causal):
    rng, seed = new_rng()
    shape = draw_varlen(rng)
    run_and_check(shape, dtype, causal=causal, rng=rng, seed=seed)


def test_varlen_kernel_equals_dense_backward_per_sequence():
    """The single-launch varlen backward (fp16 or bf16, head_dim 32 on the simulator)
    on mixed lengths with empty and length-1 sequences, seqlen_q != seqlen_k, causal or
    not, GQA: the oracle's gradients, and in deterministic mode exactly the dense
    backward's bits on each sequence."""
    rng, seed = new_rng()
    shape = draw_varlen(rng, batch=4, group=int(rng.choice([1, 2])), head_dim=SIM_HEAD_DIM)
    shape = VarlenShape(shape.seqlens_q, shape.seqlens_k, shape.heads_q, 1, SIM_HEAD_DIM, SIM_HEAD_DIM)
    dtype = DTYPES[int(rng.integers(2))]
    spec = nbflash.backward_spec(*(to_device(random_array(rng, (1, 1, *s[1:]), dtype)) for s in shape.qkv_shapes()))
    assert spec.module == "backward_mma", spec.key
    run_and_check(shape, dtype, causal=bool(rng.integers(2)), rng=rng, seed=seed, deterministic=True,
                  compare_dense=True)


def test_varlen_kernel_with_variants():
    """window, softcap and ALiBi (slopes (heads_q,) or per sequence (batch, heads_q))
    through the varlen tensor-core backward: each on at random, at least one."""
    rng, seed = new_rng()
    names = ("window", "softcap", "alibi")
    on = {name: bool(rng.integers(2)) for name in names}
    on[names[int(rng.integers(3))]] = True
    shape = draw_varlen(rng, batch=3, group=int(rng.choice([1, 2])), head_dim=SIM_HEAD_DIM)
    shape = VarlenShape(shape.seqlens_q, shape.seqlens_k, shape.heads_q, 1, SIM_HEAD_DIM, SIM_HEAD_DIM)
    kw = random_varlen_variants(rng, shape, **on)
    run_and_check(shape, DTYPES[int(rng.integers(2))], causal=bool(rng.integers(2)), rng=rng, seed=seed,
                  deterministic=bool(rng.integers(2)), **kw)


def test_per_sequence_path_with_alibi_per_sequence():
    """float32 (no varlen kernel: the dense backward per sequence) with per-sequence
    ALiBi slopes and a window: sequence b gets row b of the slopes."""
    rng, seed = new_rng()
    shape = draw_varlen(rng, batch=3, group=1, head_dim=int(rng.integers(1, 9)))
    kw = random_varlen_variants(rng, shape, window=True)
    kw["alibi_slopes"] = rng.uniform(0.0, 0.5, size=(3, shape.heads_q)).astype(np.float32)
    run_and_check(shape, np.dtype(np.float32), causal=bool(rng.integers(2)), rng=rng, seed=seed, **kw)


def test_no_keys_anywhere_gives_zero_gradients():
    """Every sequence without keys (total_k = 0): dq is 0, nothing is launched."""
    rng, _ = new_rng()
    dtype = DTYPES[int(rng.integers(2))]
    shape = VarlenShape([3, 0, 2], [0, 0, 0], heads_q=2, heads_kv=1, head_dim=SIM_HEAD_DIM, head_dim_v=SIM_HEAD_DIM)
    q, k, v = (to_device(random_array(rng, s, dtype)) for s in shape.qkv_shapes())
    cu_q, cu_k = shape.cu_seqlens()
    out, lse = nbflash.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True)
    dq = to_device(poisoned(q.shape, dtype))
    got = nbflash.attention_varlen_backward(to_device(random_array(rng, out.shape, dtype)), q, k, v, out, lse,
                                            cu_q, cu_k, dq=dq)
    assert got[0] is dq
    np.testing.assert_array_equal(to_host(dq).astype(np.float64), 0)
    assert got[1].shape == k.shape and got[2].shape == v.shape


def test_tensor_core_head_dim_with_gqa_and_empty_sequences():
    """head_dim 32 (a shipped tensor-core size: the fp16 tensor-core backward on each
    sequence), GQA 2, sequences without queries or keys."""
    rng, seed = new_rng()
    shape = VarlenShape([5, 0, 1, 19, 3], [7, 4, 1, 11, 0], heads_q=2, heads_kv=1, head_dim=32, head_dim_v=32)
    run_and_check(shape, np.dtype(np.float16), causal=bool(rng.integers(2)), rng=rng, seed=seed,
                  deterministic=bool(rng.integers(2)))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES[:2], ids=str)
def test_large_batches_match_oracle(dtype):
    rng, seed = new_rng()
    shape = draw_varlen(rng, large=True, head_dim=int(rng.choice([64, 128])))
    run_and_check(shape, dtype, causal=bool(rng.integers(2)), rng=rng, seed=seed)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [32, 64, 96, 128])
def test_large_varlen_kernel_equals_dense_per_sequence(head_dim):
    """Every shipped head_dim at the shipped tiles: the oracle, and bitwise the dense
    backward on each sequence (deterministic mode)."""
    rng, seed = new_rng()
    shape = draw_varlen(rng, large=True, head_dim=head_dim)
    shape = VarlenShape(shape.seqlens_q, shape.seqlens_k, shape.heads_q, shape.heads_kv, head_dim, head_dim)
    run_and_check(shape, DTYPES[int(rng.integers(2))], causal=bool(rng.integers(2)), rng=rng, seed=seed,
                  deterministic=True, compare_dense=True)


@pytest.mark.gpu
def test_large_varlen_kernel_with_variants_and_repeatable_bits():
    """window + softcap + ALiBi per sequence at a shipped head_dim; deterministic mode
    gives the same bits on a second run."""
    import cupy

    rng, seed = new_rng()
    head_dim = int(rng.choice([64, 128]))
    shape = draw_varlen(rng, large=True, head_dim=head_dim)
    shape = VarlenShape(shape.seqlens_q, shape.seqlens_k, shape.heads_q, shape.heads_kv, head_dim, head_dim)
    kw = random_varlen_variants(rng, shape, window=True, softcap=True, alibi=True)
    dtype = DTYPES[int(rng.integers(2))]
    causal = bool(rng.integers(2))
    q, k, v = (cupy.asarray(random_array(rng, s, dtype)) for s in shape.qkv_shapes())
    cu_q, cu_k = shape.cu_seqlens()
    dev_kw = {name: cupy.asarray(x) if isinstance(x, np.ndarray) else x for name, x in kw.items()}
    out, lse = nbflash.attention_varlen(q, k, v, cu_q, cu_k, causal=causal, return_lse=True, **dev_kw)
    do = cupy.asarray(random_array(rng, out.shape, dtype))
    runs = [nbflash.attention_varlen_backward(do, q, k, v, out, lse, cu_q, cu_k, causal=causal, deterministic=True,
                                              **dev_kw) for _ in range(2)]
    for a, b in zip(*runs):
        assert bool((a.view(np.uint16) == b.view(np.uint16)).all()), seed
    refs, sizes = oracle(*(to_host(x) for x in (do, q, k, v)), cu_q, cu_k, causal, **kw)
    assert_grads_close(runs[0], refs, dtype, seed=f"{seed}, {kw}", magnitudes=sizes)


def test_refusals_leave_buffers_untouched():
    rng, _ = new_rng()
    shape = VarlenShape([3, 2], [4, 1], heads_q=2, heads_kv=1, head_dim=8, head_dim_v=8)
    dtype = np.dtype(np.float32)
    q, k, v = (to_device(random_array(rng, s, dtype)) for s in shape.qkv_shapes())
    cu_q, cu_k = shape.cu_seqlens()
    out, lse = nbflash.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True)
    do = to_device(random_array(rng, tuple(out.shape), dtype))
    dq = to_device(poisoned(q.shape, dtype))
    before = to_host(dq).copy()
    cases = [
        (ValueError, "cu_seqlens_q", dict(cu_seqlens_q=np.array([0, 6, 5], np.int32))),
        (ValueError, "lse", dict(lse=to_device(np.zeros((2, 4), np.float32)))),
        (ValueError, "do", dict(do=to_device(np.zeros((4, 2, 8), np.float32)))),
        (ValueError, "do: the head_dim axis must have unit stride",
         dict(do=to_device(random_array(rng, (5, 2, 16), dtype))[:, :, ::2])),
        (ValueError, "out: the head_dim axis must have unit stride",
         dict(out=to_device(random_array(rng, (5, 2, 16), dtype))[:, :, ::2])),
        (ValueError, "max_seqlen_q", dict(max_seqlen_q=2)),
        (TypeError, "causal", dict(causal=1)),
        (ValueError, "dq: overlaps q", dict(dq=q)),
        (ValueError, "window", dict(window=(-2, 0))),
        (ValueError, "softcap", dict(softcap=-1.0)),
        (ValueError, "alibi_slopes", dict(alibi_slopes=to_device(np.zeros((3, 2), np.float32)))),
        (TypeError, "alibi_slopes", dict(alibi_slopes=to_device(np.zeros(2, np.float64)))),
    ]
    for error, name, change in cases:
        args = dict(do=do, q=q, k=k, v=v, out=out, lse=lse, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, dq=dq)
        args.update(change)
        with pytest.raises(error, match=name):
            nbflash.attention_varlen_backward(**args)
        np.testing.assert_array_equal(to_host(dq), before)
