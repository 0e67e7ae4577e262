"""The tensor-core backward's preprocess (kernels/backward_delta.py): delta = rowsum(dO * O)
in float32 from 16-byte loads, against float64 on random shapes, every head_dim the
tensor-core kernels ship (power-of-two lane groups and the padded ones of 96 and 192),
strided views; and attention_backward with an O whose rows are not 16-byte aligned,
which must fall back to the portable preprocess and still be right."""

from __future__ import annotations

import numpy as np
import pytest

import nbflash
from helpers import DTYPES, SIMULATOR, assert_grads_close, gradient_magnitudes, new_rng, poisoned, to_device, to_host
from nbflash import arrays, launch, tuning
from nbflash.spec import DeltaSpec

HALF_DTYPES = DTYPES[:2]
HEAD_DIMS = (32, 64, 96, 128, 192, 256)


def run_delta(do, out, dtype, head_dim):
    spec = DeltaSpec(arrays.short_name(dtype), head_dim, tuning.delta_threads(SIMULATOR))
    batch, seqlen, heads, _ = do.shape
    delta = poisoned((batch, heads, seqlen), np.float32)
    grid = (-(-seqlen * heads // spec.rows_per_cta()), batch)
    args = [launch.numba_view(arrays.kernel_view(a, True)) for a in (do, out)] + [launch.numba_view(delta)]
    launch.launch(launch.compiled(spec), grid, spec.threads, args)
    return to_host(delta)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_delta_matches_float64_rowsum(dtype, head_dim):
    rng, seed = new_rng()
    shape = (int(rng.integers(1, 3)), int(rng.integers(1, 40 if SIMULATOR else 3000)), int(rng.integers(1, 4)),
             head_dim)
    if rng.integers(2):  # views of every other row and head of a wider buffer; rows stay 16-byte aligned
        wide = (shape[0], 2 * shape[1], 2 * shape[2], head_dim + 8)
        do_host, out_host = (rng.standard_normal(wide).astype(dtype)[:, ::2, ::2, :head_dim] for _ in range(2))
        do, out = (to_device(np.ascontiguousarray(np.zeros(wide, dtype))) for _ in range(2))
        do, out = do[:, ::2, ::2, :head_dim], out[:, ::2, ::2, :head_dim]
        do[...], out[...] = to_device(np.ascontiguousarray(do_host)), to_device(np.ascontiguousarray(out_host))
    else:
        do_host, out_host = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
        do, out = to_device(do_host), to_device(out_host)
    want = np.einsum("bihd,bihd->bhi", do_host.astype(np.float64), out_host.astype(np.float64))
    got = run_delta(do, out, dtype, head_dim)
    # float32 accumulation of head_dim exact products: a few float32 ulps of sum |products|
    bound = 8 * head_dim * np.finfo(np.float32).eps * np.einsum(
        "bihd,bihd->bhi", np.abs(do_host.astype(np.float64)), np.abs(out_host.astype(np.float64)))
    assert np.all(np.abs(got - want) <= bound), f"seed {seed}: max error {np.abs(got - want).max()}"


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned-out", "unaligned-out"])
def test_attention_backward_takes_the_fast_delta_where_out_rows_are_aligned(aligned, monkeypatch):
    """O's rows on 16 bytes: the tensor-core backward computes delta with this module's
    kernel. One element off: the tensor-core kernels still run (they do not read O),
    delta comes from the portable kernel. The gradients are right either way."""
    import nbflash.api_backward as api_backward

    built = []
    monkeypatch.setattr(api_backward, "DeltaSpec", lambda *a: built.append(a) or DeltaSpec(*a))
    rng, seed = new_rng()
    dtype = HALF_DTYPES[int(rng.integers(2))]
    shape = (1, int(rng.integers(5, 30)), 2, 32)
    q, k, v, do = (rng.standard_normal(shape).astype(dtype) for _ in range(4))
    out, lse = nbflash.reference.attention(q, k, v, return_lse=True)
    offset = 0 if aligned else 1
    buffer = to_device(np.zeros(out.size + 8, dtype))
    out_view = buffer[offset:offset + out.size].reshape(shape)
    out_view[...] = to_device(out.astype(dtype))
    args = [to_device(x) for x in (q, k, v)]
    assert nbflash.backward_spec(*args).module in ("backward_mma", "backward_wgmma")
    grads = nbflash.attention_backward(to_device(do), *args, out_view, to_device(lse.astype(np.float32)))
    assert bool(built) == aligned, built
    refs = nbflash.reference.attention_backward(do, q, k, v)
    assert_grads_close([to_host(g) for g in grads], refs, np.dtype(dtype), seed, gradient_magnitudes(do, q, k, v))
