"""Arrays from other libraries, read in place through __dlpack__ or
__cuda_array_interface__, with small stand-in objects instead of torch or JAX."""

from __future__ import annotations

import numpy as np
import pytest

import nbflash
from helpers import DTYPES, SIMULATOR, assert_close, draw_shape, new_rng, random_array, to_device


class DLPackOnly:
    """Exposes nothing but the DLPack protocol of the array it wraps."""

    def __init__(self, a):
        self._a = a

    def __dlpack__(self, **kwargs):
        return self._a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


class CAIOnly:
    """Exposes nothing but __cuda_array_interface__ (as numba or torch do)."""

    def __init__(self, a):
        self._a = a
        self.__cuda_array_interface__ = a.__cuda_array_interface__


def _inputs(rng, dtype):
    shape = draw_shape(rng)
    return [random_array(rng, s, dtype) for s in shape.qkv_shapes("bshd")]


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), np.dtype(np.float16)], ids=str)
def test_dlpack_object_is_read(dtype):
    rng, seed = new_rng()
    q, k, v = _inputs(rng, dtype)
    wrapped = [DLPackOnly(to_device(a)) for a in (q, k, v)]
    out = nbflash.attention(*wrapped, causal=True)
    assert_close(out, nbflash.reference.attention(q, k, v, causal=True), dtype, seed=seed)
    if not SIMULATOR:
        import cupy

        assert isinstance(out, cupy.ndarray)


@pytest.mark.skipif(SIMULATOR, reason="__cuda_array_interface__ needs device memory, so a GPU")
@pytest.mark.parametrize("dtype", [d for d in DTYPES if d.name != "bfloat16"], ids=str)
def test_cuda_array_interface_object_is_read_in_place(dtype):
    import cupy

    rng, seed = new_rng()
    q, k, v = _inputs(rng, dtype)
    dq, dk, dv = (cupy.asarray(a) for a in (q, k, v))
    out = nbflash.attention(CAIOnly(dq), CAIOnly(dk), CAIOnly(dv))
    assert isinstance(out, cupy.ndarray)
    assert_close(out, nbflash.reference.attention(q, k, v), dtype, seed=seed)


@pytest.mark.skipif(SIMULATOR, reason="a CUDA DLPack producer needs a GPU")
def test_dlpack_bfloat16_device_object_is_read():
    import cupy

    rng, seed = new_rng()
    dtype = DTYPES[1]
    q, k, v = _inputs(rng, dtype)
    out = nbflash.attention(*(DLPackOnly(cupy.asarray(a)) for a in (q, k, v)))
    assert out.dtype == dtype
    assert_close(out, nbflash.reference.attention(q, k, v), dtype, seed=seed)


def test_strided_numpy_views_are_not_copied_when_written():
    """out= given as a transposed (bhsd) view of a larger buffer is written in place."""
    rng, seed = new_rng()
    shape = draw_shape(rng)
    q, k, v = (random_array(rng, s, np.float32) for s in shape.qkv_shapes("bhsd"))
    backing = to_device(np.full((shape.batch, shape.seqlen_q, shape.heads_q, shape.head_dim_v + 2), np.nan, np.float32))
    out = backing[..., 1:-1].transpose(0, 2, 1, 3)
    nbflash.attention(to_device(q), to_device(k), to_device(v), layout="bhsd", out=out)
    assert_close(out, nbflash.reference.attention(q, k, v, layout="bhsd"), np.float32, seed=seed)
    edges = np.asarray(backing[..., [0, -1]] if SIMULATOR else backing[..., [0, -1]].get())
    assert np.isnan(edges).all(), "padding outside out was written"
