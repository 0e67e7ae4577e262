"""nbflash.attention_varlen_backward against the float64 oracle run on each packed
sequence, and its refusals (error naming the argument, buffers left as they were)."""

from __future__ import annotations

import numpy as np
import pytest

import nbflash
from helpers import (
    DTYPES, assert_grads_close, draw_varlen, gradient_magnitudes, new_rng, poisoned, random_array,
    to_device, to_host, VarlenShape,
)


def oracle(do, q, k, v, cu_q, cu_k, causal):
    """(dq, dk, dv) and their magnitudes (helpers.gradient_magnitudes), sequence by sequence."""
    refs = [np.zeros(x.shape) for x in (q, k, v)]
    sizes = [np.zeros(x.shape) for x in (q, k, v)]
    for b in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        if qs.start == qs.stop or ks.start == ks.stop:
            continue
        args = (do[qs], q[qs], k[ks], v[ks])
        for acc, part in ((refs, nbflash.reference.attention_backward(*args, causal=causal)),
                          (sizes, gradient_magnitudes(*args, causal=causal))):
            acc[0][qs], acc[1][ks], acc[2][ks] = part
    return refs, sizes


def run_and_check(shape: VarlenShape, dtype, *, causal, rng, seed, deterministic=False):
    q, k, v = (random_array(rng, s, dtype) for s in shape.qkv_shapes())
    cu_q, cu_k = shape.cu_seqlens()
    do = random_array(rng, (q.shape[0], q.shape[1], v.shape[2]), dtype)
    out, lse = nbflash.attention_varlen(*(to_device(x) for x in (q, k, v)), cu_q, cu_k, causal=causal,
                                        return_lse=True)
    grads = [to_device(poisoned(x.shape, dtype)) for x in (q, k, v)]
    got = nbflash.attention_varlen_backward(
        to_device(do), *(to_device(x) for x in (q, k, v)), out, lse, cu_q, cu_k, causal=causal,
        deterministic=deterministic, dq=grads[0], dk=grads[1], dv=grads[2])
    assert all(g is h for g, h in zip(got, grads))
    refs, sizes = oracle(do, q, k, v, cu_q, cu_k, causal)
    assert_grads_close(got, refs, dtype, seed=seed, magnitudes=sizes)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_batches_match_oracle(dtype, causal):
    rng, seed = new_rng()
    shape = draw_varlen(rng)
    run_and_check(shape, dtype, causal=causal, rng=rng, seed=seed)


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
        (ValueError, "max_seqlen_q", dict(max_seqlen_q=2)),
        (TypeError, "causal", dict(causal=1)),
        (ValueError, "dq: overlaps q", dict(dq=q)),
    ]
    for error, name, change in cases:
        args = dict(do=do, q=q, k=k, v=v, out=out, lse=lse, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, dq=dq)
        args.update(change)
        with pytest.raises(error, match=name):
            nbflash.attention_varlen_backward(**args)
        np.testing.assert_array_equal(to_host(dq), before)
