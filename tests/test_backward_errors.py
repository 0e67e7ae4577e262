"""Every refusal of nbflash.attention_backward and attention_vjp: the error type, a
message naming the argument, and every buffer left as it was."""

from __future__ import annotations

import numpy as np
import pytest

import nbflash
from helpers import SIMULATOR, new_rng, to_device, to_host, xp

B, NQ, NK, HQ, HKV, D, DV = 2, 5, 7, 4, 2, 8, 6
SHAPES = {
    "do": (B, NQ, HQ, DV), "q": (B, NQ, HQ, D), "k": (B, NK, HKV, D), "v": (B, NK, HKV, DV),
    "out": (B, NQ, HQ, DV), "lse": (B, HQ, NQ),
    "dq": (B, NQ, HQ, D), "dk": (B, NK, HKV, D), "dv": (B, NK, HKV, DV),
}
POSITIONAL = ("do", "q", "k", "v", "out", "lse")


def arrays(dtype=np.float32, **shapes):
    """Valid arguments (random values; lse float32), with ``shapes`` overriding."""
    rng, _ = new_rng()
    s = dict(SHAPES, **shapes)
    made = {name: to_device(rng.standard_normal(shape).astype(dtype)) for name, shape in s.items()}
    made["lse"] = to_device(rng.standard_normal(s["lse"]).astype(np.float32))
    return made


def refused(exc, match, a, **kwargs):
    """Call attention_backward with ``a``'s arrays (kwargs override), expect ``exc``
    matching ``match``, and check every array argument is bit for bit what it was."""
    args = {name: a[name] for name in POSITIONAL}
    args.update({name: kwargs.pop(name) for name in list(kwargs) if name in POSITIONAL})
    given = {**args, **{k: v for k, v in kwargs.items() if k in ("dq", "dk", "dv")}}
    before = {name: to_host(x).copy() for name, x in given.items() if hasattr(x, "shape")}
    with pytest.raises(exc, match=match):
        nbflash.attention_backward(*(args[name] for name in POSITIONAL), **kwargs)
    for name, x in given.items():
        if name in before:
            assert np.array_equal(to_host(x), before[name], equal_nan=True), f"{name} was modified"


def test_valid_arguments_are_accepted():
    a = arrays()
    out, lse = nbflash.attention(a["q"], a["k"], a["v"], return_lse=True)
    grads = nbflash.attention_backward(a["do"], a["q"], a["k"], a["v"], out, lse, dq=a["dq"], dk=a["dk"], dv=a["dv"])
    assert grads[0] is a["dq"] and grads[1] is a["dk"] and grads[2] is a["dv"]


def test_qkv_are_validated_as_in_attention():
    a = arrays(v=(B, NK, HKV + 1, DV))
    refused(ValueError, r"v: heads 3 differs from k's heads 2", a)


def test_unknown_layout():
    a = arrays()
    refused(ValueError, r"layout: expected one of \('bshd', 'bhsd'\); got 'sbhd'", a, layout="sbhd", dq=a["dq"])


@pytest.mark.parametrize("name", ["do", "out"])
def test_do_and_out_of_wrong_shape(name):
    a = arrays(**{name: (B, NQ, HQ, DV + 1)})
    refused(ValueError, rf"{name}: expected shape \(2, 5, 4, 6\); got \(2, 5, 4, 7\)", a, dq=a["dq"])


@pytest.mark.parametrize("name", ["do", "out"])
def test_do_and_out_of_wrong_dtype(name):
    a = arrays()
    refused(TypeError, rf"{name}: expected dtype float32 \(q's\); got float16", a, **{name: a[name].astype(np.float16)}, dk=a["dk"])


def test_do_not_an_array():
    a = arrays()
    refused(TypeError, r"do: expected a CuPy or NumPy array", a, do=[[1.0]], dq=a["dq"])


def test_do_with_non_unit_stride_on_head_dim():
    a = arrays(do=(B, NQ, HQ, 2 * DV))
    refused(ValueError, r"do: the head_dim axis must have unit stride \(4 bytes\); got 8 bytes", a, do=a["do"][..., ::2], dv=a["dv"])


def test_lse_of_wrong_shape():
    a = arrays(lse=(B, NQ, HQ))
    refused(ValueError, r"lse: expected shape \(2, 4, 5\); got \(2, 5, 4\)", a, dq=a["dq"])


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_lse_of_wrong_dtype(dtype):
    a = arrays()
    refused(TypeError, rf"lse: expected dtype float32; got {np.dtype(dtype)}", a, lse=a["lse"].astype(dtype), dq=a["dq"])


def test_lse_float64_only_for_float64_inputs():
    a = arrays(dtype=np.float64)
    refused(TypeError, r"lse: expected dtype float32 or float64; got float16", a, lse=a["lse"].astype(np.float16), dq=a["dq"])


@pytest.mark.parametrize("name", ["dq", "dk", "dv"])
def test_gradient_buffer_of_wrong_shape(name):
    shape = SHAPES[name]
    a = arrays(**{name: shape[:-1] + (shape[-1] + 1,)})
    want = rf"{name}: expected shape \({', '.join(map(str, shape))}\)"
    refused(ValueError, want, a, **{name: a[name]})


@pytest.mark.parametrize("name", ["dq", "dk", "dv"])
def test_gradient_buffer_of_wrong_dtype(name):
    a = arrays()
    refused(TypeError, rf"{name}: expected dtype float32 \(q's\); got float64", a, **{name: a[name].astype(np.float64)})


def test_broadcast_gradient_buffer():
    a = arrays()
    row = to_device(np.zeros(DV, np.float32))
    refused(ValueError, r"dv: broadcast \(zero-stride\) arrays cannot be written", a, dv=xp().broadcast_to(row, SHAPES["dv"]), dq=a["dq"])


@pytest.mark.parametrize("grad, input_", [("dq", "q"), ("dk", "k"), ("dv", "v"), ("dq", "do"), ("dv", "out")])
def test_gradient_buffer_overlapping_an_input(grad, input_):
    a = arrays()
    shape = SHAPES[grad]
    if SHAPES[input_] == shape:
        alias = a[input_]
    else:  # carve both from one buffer, overlapping by one element
        flat = to_device(np.zeros(int(np.prod(SHAPES[input_])) + int(np.prod(shape)) - 1, np.float32))
        a[input_] = flat[: int(np.prod(SHAPES[input_]))].reshape(SHAPES[input_])
        alias = flat[int(np.prod(SHAPES[input_])) - 1:].reshape(shape)
    refused(ValueError, rf"{grad}: overlaps {input_} in memory; pass a separate buffer", a, **{grad: alias})


def test_gradient_buffer_overlapping_lse():
    a = arrays()
    flat = to_device(np.zeros(int(np.prod(SHAPES["dk"])), np.float32))
    a["lse"] = flat[: B * HQ * NQ].reshape(SHAPES["lse"])
    refused(ValueError, r"dk: overlaps lse in memory", a, dk=flat.reshape(SHAPES["dk"]))


def test_gradient_buffers_overlapping_each_other():
    a = arrays()
    n_dq, n_dv = int(np.prod(SHAPES["dq"])), int(np.prod(SHAPES["dv"]))
    flat = to_device(np.zeros(n_dq + n_dv - 1, np.float32))
    dq, dv = flat[:n_dq].reshape(SHAPES["dq"]), flat[n_dq - 1:].reshape(SHAPES["dv"])
    refused(ValueError, r"dv: overlaps dq in memory", a, dq=dq, dv=dv)


def test_flags_must_be_bool():
    a = arrays()
    refused(TypeError, r"causal: expected a bool; got str", a, causal="yes", dq=a["dq"])
    refused(TypeError, r"deterministic: expected a bool; got int", a, deterministic=1, dq=a["dq"])


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan")])
def test_scale_not_positive_and_finite(scale):
    a = arrays()
    refused(ValueError, r"scale: expected a positive finite number", a, scale=scale, dq=a["dq"])


def test_vjp_refuses_before_running_the_forward():
    a = arrays()
    with pytest.raises(TypeError, match=r"deterministic: expected a bool; got str"):
        nbflash.attention_vjp(a["q"], a["k"], a["v"], deterministic="no")
    with pytest.raises(ValueError, match=r"k: head_dim 9 differs from q's head_dim 8"):
        nbflash.attention_vjp(a["q"], arrays(k=(B, NK, HKV, D + 1))["k"], a["v"])


def test_vjp_refuses_do_of_wrong_shape():
    a = arrays()
    _, vjp = nbflash.attention_vjp(a["q"], a["k"], a["v"], causal=True)
    bad = to_device(np.ones((B, NQ, HQ, DV + 1), np.float32))
    with pytest.raises(ValueError, match=r"do: expected shape \(2, 5, 4, 6\); got \(2, 5, 4, 7\)"):
        vjp(bad)


@pytest.mark.skipif(SIMULATOR, reason="needs device arrays, so a GPU")
@pytest.mark.parametrize("name", ["do", "out", "lse"])
def test_host_input_with_device_inputs(name):
    a = arrays()
    refused(TypeError, rf"{name}: expected a device array like q; got a host array", a, **{name: to_host(a[name]).copy()}, dq=a["dq"])


@pytest.mark.skipif(SIMULATOR, reason="needs device arrays, so a GPU")
@pytest.mark.parametrize("name", ["dq", "dk", "dv"])
def test_host_gradient_buffer_for_device_inputs(name):
    a = arrays()
    refused(TypeError, rf"{name}: expected a device array like q; got a host array", a, **{name: to_host(a[name]).copy()})


@pytest.mark.skipif(not SIMULATOR, reason="on a GPU device arrays are accepted")
def test_device_array_without_a_gpu_is_refused():
    class FakeDeviceArray:
        __cuda_array_interface__ = {"shape": SHAPES["do"], "typestr": "<f4", "data": (0, False), "version": 3}

    a = arrays()
    refused(TypeError, r"do: got a device array \(FakeDeviceArray\) but no GPU is in use", a, do=FakeDeviceArray(), dq=a["dq"])
