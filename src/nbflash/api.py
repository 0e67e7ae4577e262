"""The public functions: validate every argument, normalize layouts, dispatch.

Nothing is launched and nothing is written until every argument has been checked.
Kernels see (batch, seqlen, heads, head_dim) views; "bhsd" inputs are transposed
views, never copies.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass, replace

import numpy as np

from . import arrays, device, dropout, launch, tuning, variants
from .spec import PLAIN, ForwardSpec, Variant

LAYOUTS = ("bshd", "bhsd")
MAX_HEAD_DIM = 256
_MAX_GRID_YZ = 65535


@dataclass(frozen=True)
class _Problem:
    """A validated attention call, in (batch, seqlen, heads, head_dim) terms."""

    batch: int
    seqlen_q: int
    seqlen_k: int
    heads_q: int
    heads_kv: int
    head_dim: int
    head_dim_v: int
    dtype: np.dtype
    squeeze: bool  # inputs were 3-D (no batch axis)
    layout: str
    on_device: bool

    def out_shape(self):
        dims = (self.seqlen_q, self.heads_q) if self.layout == "bshd" else (self.heads_q, self.seqlen_q)
        shape = (self.batch, *dims, self.head_dim_v)
        return shape[1:] if self.squeeze else shape

    def lse_shape(self):
        shape = (self.batch, self.heads_q, self.seqlen_q)
        return shape[1:] if self.squeeze else shape


def _bshd(a, layout: str, squeeze: bool):
    """A (batch, seqlen, heads, dim) view of a user array in ``layout``."""
    if squeeze:
        a = a[None]
    return a if layout == "bshd" else a.transpose(0, 2, 1, 3)


def _check_scale(scale, head_dim) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale: expected a positive finite real number or None; got {type(scale).__name__}")
    value = float(scale)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"scale: expected a positive finite number; got {scale!r}")
    return value


def _check_flag(value, name):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool; got {type(value).__name__}")
    return bool(value)


def _validate(q, k, v, layout):
    """Check q, k, v; return the problem description. q, k, v are Operands."""
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}; got {layout!r}")
    names = ("q", "k", "v")
    ops = (q, k, v)
    kinds = {name: ("device" if op.on_device else "host") for name, op in zip(names, ops)}
    if len(set(kinds.values())) > 1:
        raise TypeError(f"q, k, v: host (NumPy) and device arrays mixed: {kinds}")
    on_device = q.on_device
    if on_device:
        devs = {name: arrays.device_id(op.array) for name, op in zip(names, ops)}
        if len(set(devs.values())) > 1:
            raise ValueError(f"q, k, v: arrays on different devices: {devs}")
    for name, op in zip(names, ops):
        if op.array.ndim not in (3, 4):
            raise ValueError(f"{name}: expected 4 dims ({layout}) or 3 (no batch axis); got shape {op.array.shape}")
    ndims = {name: op.array.ndim for name, op in zip(names, ops)}
    if len(set(ndims.values())) > 1:
        raise ValueError(f"q, k, v: expected the same number of dims; got {ndims}")
    dtype = q.array.dtype
    if dtype not in arrays.SHORT_NAMES:
        raise TypeError(
            f"q: dtype {dtype} is not supported; expected float16, bfloat16, float32 or float64"
        )
    for name, op in zip(names[1:], ops[1:]):
        if op.array.dtype != dtype:
            raise TypeError(f"{name}: dtype {op.array.dtype} differs from q's dtype {dtype}")
    squeeze = q.array.ndim == 3
    qv, kv, vv = (_bshd(op.array, layout, squeeze) for op in ops)
    batch, seqlen_q, heads_q, head_dim = qv.shape
    if kv.shape[0] != batch or vv.shape[0] != batch:
        raise ValueError(
            f"k, v: batch must match q's {batch}; got k {kv.shape[0]}, v {vv.shape[0]}"
        )
    if vv.shape[1] != kv.shape[1]:
        raise ValueError(f"v: seqlen {vv.shape[1]} differs from k's seqlen {kv.shape[1]}")
    if vv.shape[2] != kv.shape[2]:
        raise ValueError(f"v: heads {vv.shape[2]} differs from k's heads {kv.shape[2]}")
    if kv.shape[3] != head_dim:
        raise ValueError(f"k: head_dim {kv.shape[3]} differs from q's head_dim {head_dim}")
    heads_kv = kv.shape[2]
    if heads_kv == 0 or heads_q % heads_kv != 0:
        raise ValueError(
            f"q, k: heads_q ({heads_q}) must be a multiple of heads_kv ({heads_kv}) for MQA/GQA"
        )
    for name, dim in (("q", head_dim), ("v", vv.shape[3])):
        if not 1 <= dim <= MAX_HEAD_DIM:
            raise ValueError(f"{name}: head_dim must be between 1 and {MAX_HEAD_DIM}; got {dim}")
    for name, a in zip(names, (qv, kv, vv)):
        _check_unit_head_dim_stride(name, a)
    if batch > _MAX_GRID_YZ:
        raise ValueError(f"q: batch {batch} exceeds the supported {_MAX_GRID_YZ}")
    return _Problem(
        batch, seqlen_q, kv.shape[1], heads_q, heads_kv, head_dim, vv.shape[3], dtype,
        squeeze, layout, on_device,
    ), (qv, kv, vv)


def _check_unit_head_dim_stride(name, a):
    """The last (head_dim) axis of ``a`` must be contiguous: the kernels read whole rows."""
    if a.size and a.shape[-1] > 1 and a.strides[-1] != a.itemsize:
        raise ValueError(f"{name}: the head_dim axis must have unit stride ({a.itemsize} bytes); "
                         f"got {a.strides[-1]} bytes")


def _check_out(out, problem: _Problem, inputs):
    op = arrays.intake(out, "out")
    where = "device" if problem.on_device else "host"
    if op.on_device != problem.on_device:
        raise TypeError(f"out: expected a {where} array like q; got a {'device' if op.on_device else 'host'} array")
    a = op.array
    if a.shape != problem.out_shape():
        raise ValueError(f"out: expected shape {problem.out_shape()}; got {a.shape}")
    if a.dtype != problem.dtype:
        raise TypeError(f"out: expected dtype {problem.dtype} (q's); got {a.dtype}")
    if problem.on_device and arrays.device_id(a) != arrays.device_id(inputs[0]):
        raise ValueError(f"out: on device {arrays.device_id(a)}, q on device {arrays.device_id(inputs[0])}")
    view = _bshd(a, problem.layout, problem.squeeze)
    _check_unit_head_dim_stride("out", view)
    if any(s == 0 for s, n in zip(view.strides, view.shape) if n > 1):
        raise ValueError("out: broadcast (zero-stride) arrays cannot be written")
    for name, x in zip(("q", "k", "v"), inputs):
        if arrays.overlaps(a, x):
            raise ValueError(f"out: overlaps {name} in memory; pass a separate buffer")
    return op, view


def _rows_16_byte_aligned(a) -> bool:
    """cp.async copies 16-byte chunks: every row of a (bshd view) must start on 16 bytes."""
    base = a.__array_interface__["data"][0] if isinstance(a, np.ndarray) else a.data.ptr
    return base % 16 == 0 and all(st % 16 == 0 for st, n in zip(a.strides[:3], a.shape[:3]) if n > 1)



def choose_forward_spec(problem: _Problem, causal: bool, with_lse: bool, views=None,
                        variant: Variant = PLAIN, wgmma: bool = True) -> ForwardSpec:
    """The kernel specialization that runs this problem: the tensor-core kernel for
    fp16/bf16 with a shipped head_dim (equal for q and v), 16-byte aligned q/k/v rows
    and an sm_80+ GPU; the portable kernel otherwise. ``variant`` (window, softcap,
    ...; see spec.Variant) is compiled in and may pick smaller tensor-core tiles.
    On sm_90 (tuning.wgmma_tiles; NBFLASH_WGMMA=0 turns it off), attention at head_dim 64,
    128, 192 and 256 runs the Hopper wgmma kernel instead: plain, or at head_dim 64 and 128
    also with window / softcap / ALiBi and a staged 16-bit bias / mask where their stages
    fit (tuning.wgmma_variant; others and dropout stay on mma); ``wgmma=False`` keeps the
    mma kernel (varlen callers pass tuning.wgmma_varlen's answer)."""
    dtype = arrays.short_name(problem.dtype)
    tiles = tuning.mma_tiles(problem.head_dim, device.SIMULATOR, device.compute_capability(), causal)
    if variant and tiles is not None:
        tiles = tuning.mma_variant_tiles(problem.head_dim, device.SIMULATOR, device.compute_capability(),
                                         causal, variant, tiles)
    if (
        dtype in ("fp16", "bf16")
        and tiles is not None
        and problem.head_dim_v == problem.head_dim
        and device.compute_capability() >= (8, 0)
        and (views is None or all(_rows_16_byte_aligned(a) for a in views))
    ):
        hopper = tuning.wgmma_tiles(problem.head_dim, device.SIMULATOR, device.compute_capability())
        if wgmma and hopper is not None and tuning.wgmma_variant(variant, problem.head_dim):
            block_m, block_n, threads = hopper
            spec = ForwardSpec("wgmma", dtype, problem.head_dim, problem.head_dim, causal, with_lse,
                               block_m, block_n, threads, tuning.wgmma_stages(problem.head_dim, block_m, block_n),
                               variant=variant,
                               softmax_overlap=tuning.wgmma_overlap(problem.head_dim, variant),
                               exp2_fma=tuning.wgmma_exp2_fma(problem.head_dim, variant))
            if not (variant.bias or variant.mask):
                return spec
            # a bias / mask stage beside each K/V stage: three may not fit, two may not either
            for stages in sorted({spec.stages, 2}, reverse=True):
                fitted = replace(spec, stages=stages)
                if launch.shared_bytes(fitted) <= device.max_shared_bytes():
                    return fitted
        block_m, block_n, threads, stages, q_in_registers = tiles
        spec = ForwardSpec("mma", dtype, problem.head_dim, problem.head_dim, causal, with_lse,
                           block_m, block_n, threads, stages, q_in_registers, variant=variant)
        fitted = variants.fit_staging(spec, device.max_shared_bytes())
        if fitted.variant != variant:  # staging dropped: the tiles of the per-element reads
            return choose_forward_spec(problem, causal, with_lse, views, fitted.variant, wgmma)
        return spec
    variant = variants.unstaged(variant)  # the portable kernel reads bias / mask per element
    acc_bytes = 8 if problem.dtype == arrays.FLOAT64 else 4
    block_m, block_n, threads = tuning.simt_tiles(
        acc_bytes, problem.head_dim, problem.head_dim_v, device.SIMULATOR
    )
    return ForwardSpec(
        "simt", arrays.short_name(problem.dtype), problem.head_dim, problem.head_dim_v,
        causal, with_lse, block_m, block_n, threads, variant=variant,
    )


def forward_spec(q, k, v, *, causal=False, layout="bshd", return_lse=False, window=None, softcap=0.0,
                 alibi_slopes=None, bias=None, mask=None, dropout_p=0.0, seed=None) -> ForwardSpec:
    """The kernel specialization :func:`attention` would run for these arguments
    (same argument meanings); its ``key`` names it in logs and benchmark rows (the
    variants compiled in show as "-win", "-cap", "-alibi", "-bias_<dtype>", "-mask",
    "-drop")."""
    ops = [arrays.intake(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v"))]
    problem, views = _validate(*ops, layout)
    causal_ok = _check_flag(causal, "causal")
    lse_ok = _check_flag(return_lse, "return_lse")
    var = variants.check_variants(problem, ops[0].array, causal=causal_ok, window=window, softcap=softcap,
                                  alibi_slopes=alibi_slopes, bias=bias, mask=mask, dropout_p=dropout_p,
                                  seed=seed)
    return choose_forward_spec(problem, causal_ok, lse_ok, views, var.variant)


MAX_DROPOUT_MASK_ELEMENTS = 1 << 26
"""return_dropout_mask builds the mask on the host: small inputs only."""


_REALS = (float, int)


def _plain(window, softcap, alibi_slopes, bias, mask, dropout_p, seed, return_extra) -> bool:
    """No variant argument given (the memos' fast paths serve only such calls);
    ``return_extra``: attention's return_dropout_mask, attention_backward's return_dbias."""
    return (window is None and alibi_slopes is None and bias is None and mask is None and seed is None
            and (softcap is None or (type(softcap) in _REALS and softcap == 0))
            and type(dropout_p) in _REALS and dropout_p == 0 and return_extra is False)


def attention(q, k, v, *, causal=False, scale=None, layout="bshd", return_lse=False, out=None, stream=None,
              window=None, softcap=0.0, alibi_slopes=None, bias=None, mask=None, dropout_p=0.0, seed=None,
              return_dropout_mask=False):
    """Exact softmax attention, softmax(scale * q k^T [masked]) v, computed tile by tile.

    Args:
        q: (batch, seqlen_q, heads_q, head_dim) for layout "bshd", or
            (batch, heads_q, seqlen_q, head_dim) for "bhsd"; 3-D without the batch axis
            also works. float16, bfloat16 (ml_dtypes.bfloat16), float32 or float64.
        k: (batch, seqlen_k, heads_kv, head_dim) in the same layout and dtype as q;
            heads_q must be a multiple of heads_kv (MQA/GQA).
        v: (batch, seqlen_k, heads_kv, head_dim_v); head_dim_v may differ from head_dim.
            head_dim and head_dim_v lie in 1..256.
        causal: hide key j from query i when j > i + seqlen_k - seqlen_q (bottom-right
            aligned, as FlashAttention >= 2.1).
        scale: factor on q k^T; default 1/sqrt(head_dim). Positive and finite.
        layout: "bshd" or "bhsd".
        return_lse: also return the log-sum-exp of the scaled, masked scores.
        out: optional array of the output's shape and q's dtype to write into.
        stream: where the kernel runs: a CuPy stream, a Numba stream, an object with
            ``__cuda_stream__``, or a raw CUstream handle (int); default CuPy's current
            stream.
        window: None, or (left, right) ints >= -1, FlashAttention's ``window_size``: query
            i sees keys j with i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k -
            seqlen_q + right; -1 leaves that side unbounded ((-1, -1) is plain
            attention). Combines with causal (which bounds the right side at 0). Key
            tiles outside the band are skipped: time grows with the window, not seqlen_k.
        softcap: float >= 0, FlashAttention's ``softcap``: scores t = scale * q k^T
            become softcap * tanh(t / softcap) before anything else is added; 0
            disables. The kernels receive it as float32 (float64 inputs: exact for
            softcaps a float32 holds).
        alibi_slopes: None, or float32 (heads_q,) or (batch, heads_q), FlashAttention's
            ``alibi_slopes``: -slope[b, h] * |i + seqlen_k - seqlen_q - j| is added to
            the (capped) scores.
        bias: None, or a float16/bfloat16/float32/float64 array broadcastable to
            (batch, heads_q, seqlen_q, seqlen_k) ((heads_q, seqlen_q, seqlen_k) for 3-D
            inputs), torch SDPA's float ``attn_mask``: added to the scaled (capped,
            ALiBi'd) scores. Read in place through its strides: a broadcast axis costs
            no memory.
        mask: None, or a bool array broadcastable like bias, torch SDPA's boolean
            ``attn_mask``: True attends, False hides the key (a row with every key
            hidden gets output 0 and lse -inf).
        dropout_p: float in [0, 1): each element of P is dropped with probability
            dropout_p and the kept ones scaled by 1 / (1 - dropout_p), as in
            FlashAttention and SDPA (training); the row sums (and lse) are of P before
            dropout. 1 / (1 - dropout_p) reaches the kernels as float32.
        seed: int, required when dropout_p > 0: the Philox key (nbflash.dropout); the
            same seed gives the same mask for any tile configuration, and in the
            backward.
        return_dropout_mask: also return the dropout keep mask (see Returns); small
            inputs only (at most 2**26 elements).

    Arrays are CuPy arrays, objects exposing ``__cuda_array_interface__`` or
    ``__dlpack__`` (read in place, never copied), or NumPy arrays (moved to the GPU and
    back; on a machine without a GPU they run on Numba's CUDA simulator, slowly). Every
    array needs a unit-stride last axis; other strides are free.

    Returns:
        out: (batch, seqlen_q, heads_q, head_dim_v) ("bshd") or (batch, heads_q,
            seqlen_q, head_dim_v) ("bhsd"), q's dtype; a CuPy array for device inputs, a
            NumPy array for NumPy inputs. Rows that see no key are 0.
        lse (with return_lse): float32 (batch, heads_q, seqlen_q), natural log; -inf for
            rows that see no key.
        dropout mask (with return_dropout_mask, last): bool (batch, heads_q, seqlen_q,
            seqlen_k) ((heads_q, seqlen_q, seqlen_k) for 3-D inputs), True where dropout
            kept the element, on q's side (CuPy or NumPy). It comes from the same Philox
            generator the kernels use (nbflash.dropout.keep_mask), so it is the mask
            this call applied; all True when dropout_p is 0.

    Accumulation is float32 for 16-bit inputs and float32 inputs, float64 for float64.
    Computed on the stream, without synchronizing. A call whose shapes, strides,
    dtypes and flags repeat an earlier one, and that passes none of the variant
    arguments (window ... return_dropout_mask), skips straight to the prepared launch
    (see :func:`nbflash.plan` for the least work per call, and
    :meth:`nbflash.AttentionPlan.capture` for a CUDA graph on fixed buffers); so does a
    call whose only variants are ``window`` (a tuple of two ints), ``softcap`` (a float
    or int) and ``alibi_slopes`` (a CuPy array) repeating the same values and the same
    slopes array; calls with bias, mask or dropout are validated in full every time.
    """
    if (  # _plain inlined (a frame less on every call), then the memo's fast path
        window is None and alibi_slopes is None and bias is None and mask is None and seed is None
        and return_dropout_mask is False and not device.SIMULATOR
        and (softcap is None or (type(softcap) in _REALS and softcap == 0))
        and type(dropout_p) in _REALS and dropout_p == 0
    ):
        result = _plans.memoized_attention(q, k, v, causal, scale, layout, return_lse, out, stream)
        if result is not None:
            return result
    light_variants = None  # window, softcap and / or ALiBi alone: remembered with their values
    if (
        bias is None and mask is None and seed is None and return_dropout_mask is False
        and not device.SIMULATOR and type(dropout_p) in _REALS and dropout_p == 0
    ):
        light_variants = _plans.variant_key(window, softcap, alibi_slopes)
        if light_variants is not None:
            result = _plans.memoized_attention(q, k, v, causal, scale, layout, return_lse, out, stream,
                                               light_variants)
            if result is not None:
                return result
    plain = _plain(window, softcap, alibi_slopes, bias, mask, dropout_p, seed, return_dropout_mask)
    stream_ptr = launch.stream_handle(stream) if stream is not None else None
    ops = [arrays.intake(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v"))]
    problem, views = _validate(*ops, layout)
    causal_ok = _check_flag(causal, "causal")
    lse_ok = _check_flag(return_lse, "return_lse")
    scale_ok = _check_scale(scale, problem.head_dim)
    given = dict(window=window, softcap=softcap, alibi_slopes=alibi_slopes, bias=bias, mask=mask,
                 dropout_p=dropout_p, seed=seed)
    var = variants.check_variants(problem, ops[0].array, causal=causal_ok, **given)
    mask_ok = _check_flag(return_dropout_mask, "return_dropout_mask")
    if mask_ok:
        _check_dropout_mask_size(problem)
    out_op = _check_out(out, problem, [op.array for op in ops]) if out is not None else None

    if problem.on_device or device.SIMULATOR:
        result = _forward(problem, views, out_op, causal_ok, scale_ok, lse_ok, stream_ptr, var)
        if problem.on_device and (plain or light_variants is not None):
            # keyed by the arguments exactly as given: the next call's lookup sees those,
            # not their validated forms (scale=None is not 0.125)
            _plans.remember(q, k, v, causal, scale, layout, return_lse, out, problem, views, result, var,
                            light_variants)
    else:  # NumPy inputs with a GPU present: there and back
        result = _forward_via_gpu(problem, ops, out_op, causal_ok, scale_ok, lse_ok, stream_ptr, given)
    returned = (result[0], result[1]) if lse_ok else (result[0],)
    if mask_ok:
        returned += (_dropout_mask(problem, var),)
    return returned if len(returned) > 1 else returned[0]


def _check_dropout_mask_size(problem):
    elements = problem.batch * problem.heads_q * problem.seqlen_q * problem.seqlen_k
    if elements > MAX_DROPOUT_MASK_ELEMENTS:
        raise ValueError(
            f"return_dropout_mask: small inputs only (at most {MAX_DROPOUT_MASK_ELEMENTS} elements of "
            f"(batch, heads_q, seqlen_q, seqlen_k)); got {elements}"
        )


def _dropout_mask(problem, var):
    """The keep mask the kernels applied, built on the host by the same generator."""
    keep = dropout.keep_mask(var.seed or 0, var.dropout_p, problem.batch, problem.heads_q,
                             problem.seqlen_q, problem.seqlen_k)
    if problem.squeeze:
        keep = keep[0]
    if problem.on_device:
        import cupy

        return cupy.asarray(keep)
    return keep


def _forward_via_gpu(problem, ops, out_op, causal, scale, return_lse, stream_ptr=None, given=None):
    import cupy

    with _on_stream(stream_ptr):
        dev_ops = [arrays.Operand(cupy.asarray(op.array), True) for op in ops]
        dev_problem, dev_views = _validate(*dev_ops, problem.layout)
        var = variants.NO_VARIANTS
        if given is not None:  # the variants' host arrays go up as given (broadcasts stay small)
            up = {name: (cupy.asarray(x) if isinstance(x, np.ndarray) else x) for name, x in given.items()}
            var = variants.check_variants(dev_problem, dev_ops[0].array, causal=causal, **up)
        out_dev, lse_dev = _forward(dev_problem, dev_views, None, causal, scale, return_lse, stream_ptr, var)
        out_host = out_op.array if out_op is not None else np.empty(problem.out_shape(), problem.dtype)
        out_host[...] = out_dev.get()
        return out_host, (lse_dev.get() if lse_dev is not None else None)


def _on_stream(stream_ptr):
    """CuPy work (allocations, copies) on the caller's stream, when one was given."""
    if stream_ptr is None or device.SIMULATOR:
        return contextlib.nullcontext()
    return launch.cupy_stream(stream_ptr)


def _empty(problem, shape, dtype):
    if problem.on_device:
        import cupy

        return cupy.empty(shape, dtype)
    return np.empty(shape, dtype)


def _forward(problem: _Problem, views, out_op, causal, scale, return_lse, stream_ptr=None,
             var=variants.NO_VARIANTS):
    """Allocate what the caller did not give, pick the kernel, launch."""
    with _on_stream(stream_ptr):  # CuPy's pool reuses memory per stream: allocate on ours
        out = out_op[0].array if out_op is not None else _empty(problem, problem.out_shape(), problem.dtype)
        lse = _empty(problem, problem.lse_shape(), np.float32) if return_lse else None
    out_view = out_op[1] if out_op is not None else _bshd(out, problem.layout, problem.squeeze)
    spec = choose_forward_spec(problem, causal, return_lse, views, var.variant)
    if problem.seqlen_q == 0 or problem.batch == 0 or problem.heads_q == 0:
        return out, lse
    kernel, grid, args, shared = forward_launch_args(problem, spec, views, out_view, lse, scale, var)
    launch.launch(kernel, grid, spec.threads, args, shared, stream_ptr)
    return out, lse


_dummy_lse = {}
_dummy_seqlens = {}


def _dummy(problem, views, cache, shape, dtype):
    """A small array a kernel is passed but never touches (one per device, kept)."""
    if not problem.on_device:
        return np.zeros(shape, dtype)
    dev = arrays.device_id(views[0])
    found = cache.get(dev)
    if found is None:
        import cupy

        with cupy.cuda.Device(dev):
            found = cache.setdefault(dev, cupy.zeros(shape, dtype))
    return found


def variant_kernel_args(problem: _Problem, views, var) -> list:
    """The variant arguments (variants.KERNEL_ARGS) of a launch, wrapped for the
    kernel: variants that are off get small cached dummies the kernel never reads."""
    def dummy(shape, dtype):
        return _dummy(problem, views, _dummy_variants.setdefault((shape, np.dtype(dtype).str), {}), shape, dtype)

    return [launch.numba_view(x) if hasattr(x, "shape") and x.ndim else x
            for x in variants.kernel_values(var, dummy)]


_dummy_variants: dict = {}


def forward_launch_args(problem: _Problem, spec: ForwardSpec, views, out_view, lse, scale,
                        var=variants.NO_VARIANTS):
    """(kernel, grid, kernel arguments, dynamic shared bytes) of one forward launch;
    ``lse`` is the caller-visible lse array or None (the kernel then gets a dummy it
    never writes). The kernels' cu_seqlens arguments (read only by varlen
    specializations, see api_varlen) get a dummy too, and so do the variant arguments
    (appended last, variants.KERNEL_ARGS) of variants that are off."""
    if lse is not None:
        lse_view = lse[None] if problem.squeeze else lse
    else:
        lse_view = _dummy(problem, views, _dummy_lse, (1, 1, 1), np.float32)
    no_seqlens = launch.numba_view(_dummy(problem, views, _dummy_seqlens, (1,), np.int32))
    acc_type = np.float64 if problem.dtype == arrays.FLOAT64 else np.float32
    kernel = launch.compiled(spec)
    grid = (-(-problem.seqlen_q // spec.block_m), problem.heads_q, problem.batch)
    args = [launch.numba_view(arrays.kernel_view(a, spec.kernel != "simt")) for a in (*views, out_view)]
    args += [launch.numba_view(lse_view), acc_type(scale), problem.heads_q // problem.heads_kv]
    args += [no_seqlens, no_seqlens]
    args += variant_kernel_args(problem, views, var)
    return kernel, grid, args, launch.shared_bytes(spec)


from . import plans as _plans  # noqa: E402  (plans build on the validation above)
