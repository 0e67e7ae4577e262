"""attention_with_kvcache: decoding over a KV cache (contiguous or paged), with the
new tokens appended in place first, computed by split-KV kernels (kernels/decode_mma.py,
the tensor-core fast path for 16-bit caches with 16-byte aligned rows; kernels/decode.py,
the portable path for the rest; decode_combine.py, kv_append.py).

As everywhere in nbflash, every argument is checked before anything is launched or
written; the cache lengths are checked on the host, unless the caller opts out
(check_seqlens=False: no device-to-host copy, no synchronization), in which case the
kernels clamp every length into the cache.
"""

from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass

import numpy as np

from . import api, arrays, device, launch, tuning
from .api import MAX_HEAD_DIM, _check_flag, _check_scale
from .spec import AppendSpec, CombineSpec, DecodeMmaSpec, DecodeSpec

MAX_SPLITS = 1024
_MAX_GRID_YZ = 65535
_APPEND_THREADS = 64
_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


@dataclass(frozen=True)
class _KVProblem:
    """A validated attention_with_kvcache call."""

    batch: int
    seqlen_q: int
    heads_q: int
    heads_kv: int
    head_dim: int
    head_dim_v: int
    seqlen_new: int
    capacity: int
    block_size: int  # 0: contiguous cache
    dtype: np.dtype
    on_device: bool
    lengths: np.ndarray | None  # host int64 (batch,): keys already in the cache; None: not read (trusted)
    max_total: int  # longest sequence after the append (trusted lengths: capacity, its bound)

    @property
    def group(self) -> int:
        return self.heads_q // self.heads_kv

    def out_shape(self):
        return (self.batch, self.seqlen_q, self.heads_q, self.head_dim_v)

    def lse_shape(self):
        return (self.batch, self.heads_q, self.seqlen_q)


def _same_kind(ops: dict) -> bool:
    kinds = {name: ("device" if op.on_device else "host") for name, op in ops.items()}
    if len(set(kinds.values())) > 1:
        raise TypeError(f"q, k_cache, v_cache, k, v, block_table, out: host (NumPy) and device arrays mixed: {kinds}")
    on_device = next(iter(ops.values())).on_device
    if on_device:
        devs = {name: arrays.device_id(op.array) for name, op in ops.items()}
        if len(set(devs.values())) > 1:
            raise ValueError(f"arrays on different devices: {devs}")
    return on_device


def _unit_last_axis(name, a):
    if a.size and a.shape[-1] > 1 and a.strides[-1] != a.itemsize:
        raise ValueError(f"{name}: the last axis must have unit stride ({a.itemsize} bytes); got {a.strides[-1]} bytes")


def _host_lengths(cache_seqlens, batch, on_device):
    """(host int64 lengths, the int32 array the kernels read or None to make one)."""
    if isinstance(cache_seqlens, numbers.Integral) and not isinstance(cache_seqlens, (bool, np.bool_)):
        return np.full(batch, int(cache_seqlens), dtype=np.int64), None
    if cache_seqlens is None or isinstance(cache_seqlens, (bool, np.bool_)):
        raise TypeError(f"cache_seqlens: expected an int32 array of shape ({batch},) or an int; got {cache_seqlens!r}")
    op = arrays.intake(cache_seqlens, "cache_seqlens")
    a = op.array
    if a.dtype != np.int32:
        raise TypeError(f"cache_seqlens: expected dtype int32; got {a.dtype}")
    if a.shape != (batch,):
        raise ValueError(f"cache_seqlens: expected shape ({batch},); got {a.shape}")
    host = a.get() if op.on_device else a  # a device -> host copy (synchronizes)
    kernel_array = a if op.on_device == on_device else None
    return host.astype(np.int64), kernel_array


_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def _trusted_lengths(cache_seqlens, batch):
    """The array the kernels read, for check_seqlens=False: its kind, dtype and shape
    are checked (metadata only), its values never read on the host. An int becomes a
    host int32 array (made device side by _run)."""
    if isinstance(cache_seqlens, numbers.Integral) and not isinstance(cache_seqlens, (bool, np.bool_)):
        if not _INT32_MIN <= int(cache_seqlens) <= _INT32_MAX:
            raise ValueError(f"cache_seqlens: {int(cache_seqlens)} does not fit int32")
        return np.full(batch, int(cache_seqlens), dtype=np.int32)
    if cache_seqlens is None or isinstance(cache_seqlens, (bool, np.bool_)):
        raise TypeError(f"cache_seqlens: expected an int32 array of shape ({batch},) or an int; got {cache_seqlens!r}")
    a = arrays.intake(cache_seqlens, "cache_seqlens").array
    if a.dtype != np.int32:
        raise TypeError(f"cache_seqlens: expected dtype int32; got {a.dtype}")
    if a.shape != (batch,):
        raise ValueError(f"cache_seqlens: expected shape ({batch},); got {a.shape}")
    return a


def _validate(q, k_cache, v_cache, cache_seqlens, k, v, block_table, out, check_seqlens=True):
    ops = {"q": arrays.intake(q, "q"), "k_cache": arrays.intake(k_cache, "k_cache"),
           "v_cache": arrays.intake(v_cache, "v_cache")}
    if (k is None) != (v is None):
        raise ValueError("k, v: give both new keys and new values, or neither")
    if k is not None:
        ops["k"] = arrays.intake(k, "k")
        ops["v"] = arrays.intake(v, "v")
    if block_table is not None:
        ops["block_table"] = arrays.intake(block_table, "block_table")
    if out is not None:
        ops["out"] = arrays.intake(out, "out")
    on_device = _same_kind(ops)
    a = {name: op.array for name, op in ops.items()}

    for name in ("q", "k_cache", "v_cache", "k", "v"):
        if name in a and a[name].ndim != 4:
            raise ValueError(f"{name}: expected 4 dims; got shape {a[name].shape}")
    dtype = a["q"].dtype
    if dtype not in arrays.SHORT_NAMES:
        raise TypeError(f"q: dtype {dtype} is not supported; expected float16, bfloat16, float32 or float64")
    for name in ("k_cache", "v_cache", "k", "v"):
        if name in a and a[name].dtype != dtype:
            raise TypeError(f"{name}: dtype {a[name].dtype} differs from q's dtype {dtype}")
    batch, seqlen_q, heads_q, head_dim = a["q"].shape
    kc, vc = a["k_cache"], a["v_cache"]
    if vc.shape[:3] != kc.shape[:3]:
        raise ValueError(f"v_cache: shape {vc.shape} differs from k_cache's {kc.shape} before the last axis")
    heads_kv, head_dim_v = kc.shape[2], vc.shape[3]
    if kc.shape[3] != head_dim:
        raise ValueError(f"k_cache: head_dim {kc.shape[3]} differs from q's head_dim {head_dim}")
    if heads_kv == 0 or heads_q % heads_kv != 0:
        raise ValueError(f"q, k_cache: heads_q ({heads_q}) must be a multiple of heads_kv ({heads_kv}) for MQA/GQA")
    for name, dim in (("q", head_dim), ("v_cache", head_dim_v)):
        if not 1 <= dim <= MAX_HEAD_DIM:
            raise ValueError(f"{name}: head_dim must be between 1 and {MAX_HEAD_DIM}; got {dim}")

    if "block_table" in a:
        table = a["block_table"]
        if table.ndim != 2:
            raise ValueError(f"block_table: expected 2 dims (batch, max_blocks_per_seq); got shape {table.shape}")
        if table.dtype != np.int32:
            raise TypeError(f"block_table: expected dtype int32; got {table.dtype}")
        if table.shape[0] != batch:
            raise ValueError(f"block_table: expected {batch} rows (q's batch); got shape {table.shape}")
        block_size = kc.shape[1]
        if block_size == 0:
            raise ValueError("k_cache: a paged cache needs block_size >= 1; got 0")
        capacity = table.shape[1] * block_size
    else:
        if kc.shape[0] != batch:
            raise ValueError(f"k_cache: batch {kc.shape[0]} differs from q's batch {batch} (contiguous cache)")
        block_size, capacity = 0, kc.shape[1]

    seqlen_new = 0
    if "k" in a:
        kn, vn = a["k"], a["v"]
        expect_k = (batch, kn.shape[1], heads_kv, head_dim)
        expect_v = (batch, kn.shape[1], heads_kv, head_dim_v)
        if kn.shape != expect_k:
            raise ValueError(f"k: expected shape (batch, seqlen_new, heads_kv, head_dim) = {expect_k}; got {kn.shape}")
        if vn.shape != expect_v:
            raise ValueError(f"v: expected shape (batch, seqlen_new, heads_kv, head_dim_v) = {expect_v}; got {vn.shape}")
        seqlen_new = kn.shape[1]
        for cache_name in ("k_cache", "v_cache"):
            c = a[cache_name]
            if any(st == 0 for st, n in zip(c.strides, c.shape) if n > 1):
                raise ValueError(f"{cache_name}: broadcast (zero-stride) caches cannot be appended to")
            for name in ("q", "k", "v"):
                if arrays.overlaps(c, a[name]):
                    raise ValueError(f"{name}: overlaps {cache_name}, which the append writes; pass a separate buffer")
    for name, x in a.items():
        if name != "block_table":
            _unit_last_axis(name, x)
    if batch > _MAX_GRID_YZ:
        raise ValueError(f"q: batch {batch} exceeds the supported {_MAX_GRID_YZ}")
    if seqlen_new > 2**31 - 1:
        raise ValueError(f"k: seqlen_new {seqlen_new} is too long")

    if not check_seqlens:
        if seqlen_new > capacity:
            raise ValueError(f"k: {seqlen_new} new tokens exceed the cache capacity {capacity}"
                             + (f" (max_blocks_per_seq {capacity // block_size} x block_size {block_size})"
                                if block_size else ""))
        if capacity > _INT32_MAX:
            raise ValueError(f"k_cache: capacity {capacity} exceeds int32")
        seqlens_array = _trusted_lengths(cache_seqlens, batch)
        problem = _KVProblem(batch, seqlen_q, heads_q, heads_kv, head_dim, head_dim_v, seqlen_new, capacity,
                             block_size, dtype, on_device, None, capacity if batch else 0)
        return problem, a, seqlens_array
    lengths, seqlens_array = _host_lengths(cache_seqlens, batch, on_device)
    if batch and lengths.min() < 0:
        b = int(np.argmin(lengths))
        raise ValueError(f"cache_seqlens: expected lengths >= 0; got {lengths[b]} for sequence {b}")
    if batch and lengths.max() + seqlen_new > capacity:
        b = int(np.argmax(lengths))
        raise ValueError(
            f"cache_seqlens: sequence {b} holds {lengths[b]} keys; with the {seqlen_new} new ones that "
            f"exceeds the cache capacity {capacity}"
            + (f" (max_blocks_per_seq {capacity // block_size} x block_size {block_size})" if block_size else "")
        )
    max_total = int(lengths.max()) + seqlen_new if batch else 0
    if max_total > 2**31 - 1:
        raise ValueError(f"cache_seqlens: {max_total} keys exceed int32")
    problem = _KVProblem(batch, seqlen_q, heads_q, heads_kv, head_dim, head_dim_v, seqlen_new, capacity,
                         block_size, dtype, on_device, lengths, max_total)
    return problem, a, seqlens_array


def _check_out(problem, a):
    o = a["out"]
    if o.shape != problem.out_shape():
        raise ValueError(f"out: expected shape {problem.out_shape()}; got {o.shape}")
    if o.dtype != problem.dtype:
        raise TypeError(f"out: expected dtype {problem.dtype} (q's); got {o.dtype}")
    if any(st == 0 for st, n in zip(o.strides, o.shape) if n > 1):
        raise ValueError("out: broadcast (zero-stride) arrays cannot be written")
    for name, x in a.items():
        if name != "out" and arrays.overlaps(o, x):
            raise ValueError(f"out: overlaps {name} in memory; pass a separate buffer")


def _check_num_splits(num_splits) -> int:
    if isinstance(num_splits, (bool, np.bool_)) or not isinstance(num_splits, numbers.Integral):
        raise TypeError(f"num_splits: expected an int; got {type(num_splits).__name__}")
    if not 0 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits: expected 0 (automatic) to {MAX_SPLITS}; got {num_splits}")
    return int(num_splits)


def _sm_count() -> int:
    if device.SIMULATOR:
        return tuning.DECODE_SIMULATOR_SMS
    from numba import cuda

    return int(cuda.get_current_device().MULTIPROCESSOR_COUNT)


def choose_num_splits(ctas: int, max_total: int, sms: int, min_split_keys: int, busy: int | None = None) -> int:
    """Splits for ``ctas`` (batch x kv heads x row chunks) CTAs over keys of up to
    ``max_total``. Model: the busiest SM bounds the time, and an SM is only fully busy
    with ``busy`` CTAs (default tuning.DECODE_BUSY_CTAS_PER_SM), so S splits cost
    max(ceil(ctas * S / sms), busy) / S. Takes the fewest splits within 5% of the best
    cost (each split adds partial results and combine work), never splits shorter than
    min_split_keys keys."""
    if ctas == 0 or max_total == 0:
        return 1
    busy = tuning.DECODE_BUSY_CTAS_PER_SM if busy is None else busy
    return _choose_num_splits(ctas, max_total, sms, min_split_keys, busy, tuning.DECODE_MAX_AUTO_SPLITS)


@functools.lru_cache(maxsize=1024)
def _choose_num_splits(ctas: int, max_total: int, sms: int, min_split_keys: int, busy: int, max_auto: int) -> int:
    """choose_num_splits's search (up to DECODE_MAX_AUTO_SPLITS costs: ~50 us of Python,
    so remembered per argument set)."""
    limit = max(1, min(max_auto, max_total // max(1, min_split_keys)))

    def cost(splits):
        return max(-(-ctas * splits // sms), busy) / splits

    best = min(cost(s) for s in range(1, limit + 1))
    return next(s for s in range(1, limit + 1) if cost(s) <= 1.05 * best)


def _vectorizable(problem, caches) -> bool:
    """16-byte loads: 16-bit or fp32 data, head dims multiples of 16 bytes, every cache
    row starting on 16 bytes (base pointer and the strides of the first three axes)."""
    itemsize = problem.dtype.itemsize
    if itemsize == 8 or (problem.head_dim * itemsize) % 16 or (problem.head_dim_v * itemsize) % 16:
        return False
    for c in caches:
        base = c.__array_interface__["data"][0] if isinstance(c, np.ndarray) else c.data.ptr
        if base % 16 or any(st % 16 for st, n in zip(c.strides[:3], c.shape[:3]) if n > 1):
            return False
    return True


def _tensor_core_path(problem: _KVProblem, vectorized: bool) -> bool:
    """kernels/decode_mma.py runs 16-bit caches read 16 bytes at a time (rows on 16
    bytes, head dims multiples of 8) with head dims up to DECODE_MMA_MAX_HEAD_DIM."""
    return (vectorized and problem.dtype.itemsize == 2
            and max(problem.head_dim, problem.head_dim_v) <= tuning.DECODE_MMA_MAX_HEAD_DIM)


@dataclass(frozen=True)
class _Plan:
    spec: object  # DecodeSpec or DecodeMmaSpec
    num_splits: int
    row_chunks: int


def _plan(problem: _KVProblem, caches, causal: bool, with_lse: bool, num_splits: int) -> _Plan:
    """The kernel (tensor-core or portable), its split count and row chunks."""
    vectorized = _vectorizable(problem, caches)
    if _tensor_core_path(problem, vectorized):
        threads, stages = tuning.decode_mma_tiles(problem.head_dim, problem.head_dim_v, device.SIMULATOR)

        def make(split):
            return DecodeMmaSpec(arrays.short_name(problem.dtype), problem.head_dim, problem.head_dim_v, causal,
                                 problem.block_size, split, with_lse and not split, threads, stages)

        busy, min_keys = tuning.DECODE_MMA_BUSY_CTAS_PER_SM, tuning.DECODE_MMA_MIN_SPLIT_KEYS
    else:

        def make(split):
            return decode_spec(problem, causal, split, with_lse, vectorized)

        busy, min_keys = tuning.DECODE_BUSY_CTAS_PER_SM, tuning.DECODE_MIN_SPLIT_KEYS
    if device.SIMULATOR:
        min_keys = tuning.DECODE_MIN_SPLIT_KEYS_SIMULATOR
    row_chunks = -(-problem.group * problem.seqlen_q // make(False).rows)
    if num_splits == 0:
        num_splits = choose_num_splits(problem.batch * problem.heads_kv * row_chunks, problem.max_total,
                                       _sm_count(), min_keys, busy)
    return _Plan(make(num_splits > 1), num_splits, row_chunks)


def decode_spec(problem: _KVProblem, causal: bool, split: bool, with_lse: bool, vectorized: bool) -> DecodeSpec:
    rows, threads, unroll = tuning.decode_tiles(
        problem.dtype.itemsize, problem.head_dim, problem.head_dim_v,
        problem.group * problem.seqlen_q, vectorized, device.SIMULATOR,
    )
    return DecodeSpec(arrays.short_name(problem.dtype), problem.head_dim, problem.head_dim_v, rows, causal,
                      problem.block_size, vectorized, split, with_lse and not split, threads, unroll)


def attention_with_kvcache(q, k_cache, v_cache, *, cache_seqlens, k=None, v=None, block_table=None,
                           causal=True, scale=None, num_splits=0, return_lse=False, out=None,
                           check_seqlens=True):
    """Attention of a few new query rows per sequence over a KV cache (decoding), with
    FlashAttention's flash_attn_with_kvcache conventions.

    Args:
        q: (batch, seqlen_q, heads_q, head_dim); seqlen_q is small (1 when decoding,
            a few for speculative decoding; any works). float16, bfloat16
            (ml_dtypes.bfloat16), float32 or float64.
        k_cache, v_cache: the cache, in q's dtype. Contiguous: (batch, capacity,
            heads_kv, head_dim) and (batch, capacity, heads_kv, head_dim_v). Paged
            (with block_table): (num_blocks, block_size, heads_kv, head_dim) and
            (num_blocks, block_size, heads_kv, head_dim_v). heads_q must be a
            multiple of heads_kv (MQA/GQA); head dims in 1..256.
        cache_seqlens: int32 (batch,) keys already in each sequence's cache, a
            device or host array; or one Python int for all.
        k, v: optional new tokens (batch, seqlen_new, heads_kv, head_dim) and
            (batch, seqlen_new, heads_kv, head_dim_v), q's dtype. They are written
            into the cache in place at positions cache_seqlens[b] ..
            cache_seqlens[b] + seqlen_new - 1, then attended to with the rest.
            cache_seqlens itself is not modified (advance it yourself).
        block_table: int32 (batch, max_blocks_per_seq): token t of sequence b
            lives in block block_table[b, t // block_size], row t % block_size.
        causal: bottom-right aligned over each sequence's total length L_b =
            cache_seqlens[b] + seqlen_new: query i sees keys j <= i + L_b - seqlen_q.
        scale: factor on q k^T; default 1/sqrt(head_dim).
        num_splits: how many CTAs share each sequence's keys (split-KV); 0 picks from
            the work and the number of SMs (from the longest sequence; with
            check_seqlens=False, from the capacity, the lengths being unread); 1
            writes the output directly, without partial results and the combine
            kernel. At most 1024.
        return_lse: also return the log-sum-exp of the scaled, masked scores.
        out: optional (batch, seqlen_q, heads_q, head_dim_v) array of q's dtype.
        check_seqlens: True (default): the lengths are checked on the host, so a
            device cache_seqlens is copied to the host, which synchronizes with the
            device on every call. False: the values of cache_seqlens are not read on
            the host (no copy, no synchronization: for decode loops), as
            FlashAttention trusts them; its kind, dtype and shape are still checked.
            The kernels then clamp each length into the cache: sequence b holds
            L_b = min(max(cache_seqlens[b], 0), capacity - seqlen_new) keys, the
            append writes at L_b .. L_b + seqlen_new - 1 and attention covers L_b +
            seqlen_new keys, so a bad length (negative, or past the capacity) can
            neither read nor write outside the cache: it gives the result of the
            clamped length, silently. seqlen_new <= capacity is still checked.

    Checked on the host before anything is written: every shape, dtype and stride,
    and (with check_seqlens) the lengths (0 <= cache_seqlens[b] and
    cache_seqlens[b] + seqlen_new <= capacity, which is the capacity axis, or
    max_blocks_per_seq x block_size when paged). Trusted, not checked: the block
    ids in block_table (an id outside 0..num_blocks-1 reads or writes out of
    bounds; nbflash.reference.attention_with_kvcache raises IndexError for them),
    and that no two sequences share a block they both append to.

    Arrays are CuPy arrays (or __cuda_array_interface__ / DLPack objects), read and
    written in place; or all NumPy arrays, which on a GPU machine travel to the
    device and back (caches included, so the append lands in them: slow, for tests).
    Every array needs a unit-stride last axis.

    Returns:
        out: (batch, seqlen_q, heads_q, head_dim_v), q's dtype; rows that see no key are 0.
        lse (with return_lse): float32 (batch, heads_q, seqlen_q), natural log; -inf
            for rows that see no key.

    Accumulation is float32 (float64 for float64 inputs). Runs on CuPy's current stream
    (the append, then the decode kernel, then the combine) without synchronizing, except
    for the copy of a device cache_seqlens that check_seqlens=True makes.
    """
    check_seqlens = _check_flag(check_seqlens, "check_seqlens")
    problem, a, seqlens_array = _validate(q, k_cache, v_cache, cache_seqlens, k, v, block_table, out,
                                          check_seqlens)
    causal = _check_flag(causal, "causal")
    return_lse = _check_flag(return_lse, "return_lse")
    scale = _check_scale(scale, problem.head_dim)
    num_splits = _check_num_splits(num_splits)
    if out is not None:
        _check_out(problem, a)
    plan = _plan(problem, (a["k_cache"], a["v_cache"]), causal, return_lse, num_splits)
    if problem.heads_kv * plan.row_chunks > _MAX_GRID_YZ:
        raise ValueError(f"q: heads_kv x chunks of {plan.spec.rows} query rows exceeds the grid limit {_MAX_GRID_YZ}")

    if problem.on_device or device.SIMULATOR:
        result = _run(problem, a, seqlens_array, causal, scale, num_splits, return_lse, plan)
    else:
        result = _run_via_gpu(problem, a, causal, scale, num_splits, return_lse, seqlens_array)
    return result if return_lse else result[0]


def _run_via_gpu(problem, a, causal, scale, num_splits, return_lse, seqlens_array=None):
    """NumPy arrays with a GPU present: copy in, run, copy out (and the caches back)."""
    import cupy

    dev = {name: cupy.asarray(x) for name, x in a.items() if name != "out"}
    dev_problem = _KVProblem(**{**problem.__dict__, "on_device": True})
    if problem.lengths is not None:
        seqlens_array = None  # checked lengths: made from the host copy
    out_dev, lse_dev = _run(dev_problem, dev, seqlens_array, causal, scale, num_splits, return_lse)
    out_host = a["out"] if "out" in a else np.empty(problem.out_shape(), problem.dtype)
    out_host[...] = out_dev.get()
    if problem.seqlen_new:
        a["k_cache"][...] = dev["k_cache"].get()
        a["v_cache"][...] = dev["v_cache"].get()
    return out_host, (lse_dev.get() if lse_dev is not None else None)


def _xp(problem):
    if problem.on_device:
        import cupy

        return cupy
    return np


_dummy_tables: dict = {}


def _dummy(problem, a, cache, shape, dtype):
    """A small array the kernels are passed but never read (the block table of a
    contiguous cache) or write (lse without return_lse): one per device, kept, so a
    call allocates (and, for zeros, launches) nothing for it."""
    return api._dummy(problem, [a["q"]], cache, shape, dtype)


def _run(problem: _KVProblem, a, seqlens_array, causal, scale, num_splits, return_lse, plan=None):
    """Allocate, append the new tokens, decode, combine (``plan``: from _plan on these arrays)."""
    xp = _xp(problem)
    out = a["out"] if "out" in a else xp.empty(problem.out_shape(), problem.dtype)
    lse = xp.empty(problem.lse_shape(), np.float32) if return_lse else None
    if problem.batch == 0:
        return out, lse
    if seqlens_array is None:
        seqlens_array = xp.asarray(problem.lengths.astype(np.int32))
    elif problem.on_device and isinstance(seqlens_array, np.ndarray):  # trusted host lengths go up as given
        seqlens_array = xp.asarray(seqlens_array)
    paged = problem.block_size > 0
    table = a["block_table"] if paged else _dummy(problem, a, _dummy_tables, (1, 1), np.int32)
    view = launch.numba_view

    if problem.seqlen_new and problem.heads_kv:
        bits = _UINT[problem.dtype.itemsize]
        spec = AppendSpec(8 * problem.dtype.itemsize, paged, _APPEND_THREADS)
        args = [view(a[name].view(bits)) for name in ("k", "v", "k_cache", "v_cache")]
        launch.launch(launch.compiled(spec), (problem.seqlen_new, problem.heads_kv, problem.batch),
                      spec.threads, args + [view(table), view(seqlens_array)])
    if problem.seqlen_q == 0 or problem.heads_q == 0:
        return out, lse

    if plan is None:
        plan = _plan(problem, (a["k_cache"], a["v_cache"]), causal, return_lse, num_splits)
    spec, num_splits, row_chunks = plan.spec, plan.num_splits, plan.row_chunks
    split = num_splits > 1
    mma = isinstance(spec, DecodeMmaSpec)
    acc_type = np.float64 if problem.dtype == arrays.FLOAT64 else np.float32
    raw = mma or spec.vectorized  # 16-bit caches as uint16 bits for the vector loads
    caches = [view(arrays.kernel_view(a[name], raw)) for name in ("k_cache", "v_cache")]
    out_k = view(arrays.kernel_view(out))
    if split:
        part_out = xp.empty((num_splits, problem.batch, problem.heads_q, problem.seqlen_q, problem.head_dim_v), acc_type)
        part_lse = xp.empty((num_splits, problem.batch, problem.heads_q, problem.seqlen_q), acc_type)
        results = [view(part_out), view(part_lse)]
    else:
        lse_arg = lse if return_lse else _dummy(problem, a, api._dummy_lse, (1, 1, 1), np.float32)
        results = [out_k, view(lse_arg)]
    grid = (num_splits, problem.heads_kv * row_chunks, problem.batch)
    args = [view(arrays.kernel_view(a["q"], mma)), *caches, view(table), view(seqlens_array),
            problem.seqlen_new, *results, acc_type(scale), problem.group, row_chunks]
    launch.launch(launch.compiled(spec), grid, spec.threads, args, launch.shared_bytes(spec))
    if split:
        threads = 32 if device.SIMULATOR else tuning.COMBINE_THREADS
        cspec = CombineSpec(spec.dtype, problem.head_dim_v, return_lse, threads)
        lse_arg = lse if return_lse else _dummy(problem, a, api._dummy_lse, (1, 1, 1), np.float32)
        launch.launch(launch.compiled(cspec), (problem.seqlen_q, problem.heads_q, problem.batch), threads,
                      [view(part_out), view(part_lse), out_k, view(lse_arg)])
    return out, lse


def kvcache_spec(q, k_cache, v_cache, *, cache_seqlens, k=None, v=None, block_table=None, causal=True,
                 num_splits=0, return_lse=False, check_seqlens=True):
    """The decode-kernel specialization :func:`attention_with_kvcache` runs for these
    arguments (same meanings): a DecodeMmaSpec (tensor cores: 16-bit caches with
    16-byte aligned rows) or a DecodeSpec (the portable kernel). Its ``key`` names it
    in logs and benchmark rows."""
    return kvcache_plan(q, k_cache, v_cache, cache_seqlens=cache_seqlens, k=k, v=v, block_table=block_table,
                        causal=causal, num_splits=num_splits, return_lse=return_lse,
                        check_seqlens=check_seqlens)[0]


def kvcache_plan(q, k_cache, v_cache, *, cache_seqlens, k=None, v=None, block_table=None, causal=True,
                 num_splits=0, return_lse=False, check_seqlens=True):
    """(spec, num_splits): the decode kernel and the split count (num_splits=0
    resolved) that :func:`attention_with_kvcache` uses for these arguments."""
    problem, a, _ = _validate(q, k_cache, v_cache, cache_seqlens, k, v, block_table, None,
                              _check_flag(check_seqlens, "check_seqlens"))
    num_splits = _check_num_splits(num_splits)
    plan = _plan(problem, (a["k_cache"], a["v_cache"]), _check_flag(causal, "causal"),
                 _check_flag(return_lse, "return_lse"), num_splits)
    return plan.spec, plan.num_splits


def _prepared(q, k_cache, v_cache, *, cache_seqlens, block_table=None, causal=True, scale=None, num_splits=0,
              out, check_seqlens=True):
    """For benchmarks (perf/): validate once (as attention_with_kvcache does, with its one
    synchronizing copy of a device cache_seqlens unless check_seqlens=False) and return
    ``go()``, which launches the decode (and combine) kernels into ``out`` again without
    validating or synchronizing, so that launches can queue on the stream and CUDA
    events time the kernels alone. The arrays, including cache_seqlens, must stay alive
    and unchanged in shape."""
    problem, a, seqlens_array = _validate(q, k_cache, v_cache, cache_seqlens, None, None, block_table, out,
                                          check_seqlens)
    causal = _check_flag(causal, "causal")
    scale = _check_scale(scale, problem.head_dim)
    num_splits = _check_num_splits(num_splits)
    _check_out(problem, a)
    plan = _plan(problem, (a["k_cache"], a["v_cache"]), causal, False, num_splits)
    if seqlens_array is None:
        seqlens_array = _xp(problem).asarray(problem.lengths.astype(np.int32))
    elif problem.on_device and isinstance(seqlens_array, np.ndarray):
        seqlens_array = _xp(problem).asarray(seqlens_array)

    def go():
        _run(problem, a, seqlens_array, causal, scale, plan.num_splits, False, plan)

    return go

