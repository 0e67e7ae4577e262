"""Every refusal of nbflash.attention: the error type, a message naming the argument,
and every buffer left as it was."""

from __future__ import annotations

import numpy as np
import pytest

import nbflash
from helpers import SIMULATOR, new_rng, to_device, to_host

B, NQ, NK, HQ, HKV, D = 2, 5, 7, 4, 2, 8


def arrays(dtype=np.float32, **shapes):
    rng, _ = new_rng()
    s = {"q": (B, NQ, HQ, D), "k": (B, NK, HKV, D), "v": (B, NK, HKV, D), "out": (B, NQ, HQ, D)}
    s.update(shapes)
    made = {name: to_device(rng.standard_normal(shape).astype(dtype)) for name, shape in s.items()}
    return made


def refused(exc, match, q, k, v, **kwargs):
    """Call attention, expect ``exc`` matching ``match``, and check that out and the
    inputs are bit for bit what they were."""
    inputs = [(name, a) for name, a in (("q", q), ("k", k), ("v", v)) if hasattr(a, "shape")]
    before = {name: to_host(a).copy() for name, a in inputs}
    out = kwargs.get("out")
    out_before = to_host(out).copy() if out is not None and hasattr(out, "shape") else None
    with pytest.raises(exc, match=match):
        nbflash.attention(q, k, v, **kwargs)
    for name, a in inputs:
        assert np.array_equal(to_host(a), before[name], equal_nan=True), f"{name} was modified"
    if out_before is not None:
        assert np.array_equal(to_host(out), out_before, equal_nan=True), "out was written"


def test_unknown_layout():
    a = arrays()
    refused(ValueError, r"layout: expected one of \('bshd', 'bhsd'\); got 'bsdh'", a["q"], a["k"], a["v"], layout="bsdh", out=a["out"])


def test_batch_mismatch():
    a = arrays(k=(B + 1, NK, HKV, D))
    refused(ValueError, r"k, v: batch must match q's 2; got k 3, v 2", a["q"], a["k"], a["v"], out=a["out"])


def test_seqlen_of_k_and_v_differ():
    a = arrays(v=(B, NK + 2, HKV, D))
    refused(ValueError, r"v: seqlen 9 differs from k's seqlen 7", a["q"], a["k"], a["v"], out=a["out"])


def test_heads_of_k_and_v_differ():
    a = arrays(v=(B, NK, HKV + 1, D))
    refused(ValueError, r"v: heads 3 differs from k's heads 2", a["q"], a["k"], a["v"], out=a["out"])


def test_head_dim_of_q_and_k_differ():
    a = arrays(k=(B, NK, HKV, D + 1))
    refused(ValueError, r"k: head_dim 9 differs from q's head_dim 8", a["q"], a["k"], a["v"], out=a["out"])


def test_heads_q_not_a_multiple_of_heads_kv():
    a = arrays(k=(B, NK, 3, D), v=(B, NK, 3, D))
    refused(ValueError, r"heads_q \(4\) must be a multiple of heads_kv \(3\)", a["q"], a["k"], a["v"], out=a["out"])


@pytest.mark.parametrize("name", ["q", "v"])
def test_head_dim_over_256(name):
    dims = {"q": (B, NQ, HQ, 257), "k": (B, NK, HKV, 257)} if name == "q" else {"v": (B, NK, HKV, 257)}
    a = arrays(**dims)
    refused(ValueError, rf"{name}: head_dim must be between 1 and 256; got 257", a["q"], a["k"], a["v"])


def test_dtypes_differ():
    a = arrays()
    k16 = a["k"].astype(np.float16)
    refused(TypeError, r"k: dtype float16 differs from q's dtype float32", a["q"], k16, a["v"], out=a["out"])


def test_unsupported_dtype():
    a = arrays(dtype=np.int32)
    refused(TypeError, r"q: dtype int32 is not supported", a["q"], a["k"], a["v"])


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_scale_not_positive_and_finite(scale):
    a = arrays()
    refused(ValueError, r"scale: expected a positive finite number", a["q"], a["k"], a["v"], scale=scale, out=a["out"])


def test_scale_of_wrong_type():
    a = arrays()
    refused(TypeError, r"scale: expected a positive finite real number or None; got str", a["q"], a["k"], a["v"], scale="0.1", out=a["out"])


def test_out_of_wrong_shape():
    a = arrays(out=(B, NQ, HQ, D + 1))
    refused(ValueError, r"out: expected shape \(2, 5, 4, 8\); got \(2, 5, 4, 9\)", a["q"], a["k"], a["v"], out=a["out"])


def test_out_of_wrong_dtype():
    a = arrays()
    out = a["out"].astype(np.float64)
    refused(TypeError, r"out: expected dtype float32 \(q's\); got float64", a["q"], a["k"], a["v"], out=out)


def test_out_overlapping_an_input():
    a = arrays(q=(B, NQ, HQ, D))
    refused(ValueError, r"out: overlaps q in memory", a["q"], a["k"], a["v"], out=a["q"])


def test_non_unit_stride_on_head_dim():
    a = arrays(k=(B, NK, HKV, 2 * D))
    k = a["k"][..., ::2]
    refused(ValueError, r"k: the head_dim axis must have unit stride \(4 bytes\); got 8 bytes", a["q"], k, a["v"], out=a["out"])


def test_wrong_number_of_dims():
    a = arrays(q=(B, NQ, HQ, D, 1))
    refused(ValueError, r"q: expected 4 dims \(bshd\) or 3 \(no batch axis\); got shape \(2, 5, 4, 8, 1\)", a["q"], a["k"], a["v"])


def test_mixed_numbers_of_dims():
    a = arrays(q=(NQ, HQ, D))
    refused(ValueError, r"q, k, v: expected the same number of dims", a["q"], a["k"], a["v"])


def test_not_an_array():
    a = arrays()
    refused(TypeError, r"q: expected a CuPy or NumPy array, or an object with __cuda_array_interface__ or __dlpack__; got list", [[1.0]], a["k"], a["v"], out=a["out"])


def test_flags_must_be_bool():
    a = arrays()
    refused(TypeError, r"causal: expected a bool; got str", a["q"], a["k"], a["v"], causal="yes", out=a["out"])
    refused(TypeError, r"return_lse: expected a bool; got int", a["q"], a["k"], a["v"], return_lse=1, out=a["out"])


@pytest.mark.skipif(SIMULATOR, reason="needs device arrays, so a GPU")
def test_host_and_device_arrays_mixed():
    a = arrays()
    refused(TypeError, r"q, k, v: host \(NumPy\) and device arrays mixed", a["q"], to_host(a["k"]), a["v"])


@pytest.mark.skipif(SIMULATOR, reason="needs device arrays, so a GPU")
def test_host_out_for_device_inputs():
    a = arrays()
    refused(TypeError, r"out: expected a device array like q; got a host array", a["q"], a["k"], a["v"], out=to_host(a["out"]).copy())


@pytest.mark.skipif(not SIMULATOR, reason="on a GPU device arrays are accepted")
def test_device_array_without_a_gpu_is_refused():
    class FakeDeviceArray:
        __cuda_array_interface__ = {"shape": (B, NQ, HQ, D), "typestr": "<f4", "data": (0, False), "version": 3}

    a = arrays()
    refused(TypeError, r"q: got a device array \(FakeDeviceArray\) but no GPU is in use", FakeDeviceArray(), a["k"], a["v"], out=a["out"])


