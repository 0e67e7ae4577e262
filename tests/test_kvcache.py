"""nbflash.attention_with_kvcache against the float64 oracle: contiguous and paged
caches, appended tokens, split-KV, GQA, causal decoding and speculative rows, the
refusals, and a prefill-then-decode loop."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

import nbflash
from helpers import DTYPES, SIMULATOR, assert_close, assert_lse_close, new_rng, poisoned, to_device, to_host
from nbflash.api_kvcache import choose_num_splits

TIERS = [pytest.param(False, id="small"), pytest.param(True, id="large", marks=pytest.mark.gpu)]
F16, BF16, F32, F64 = DTYPES


@dataclass
class Case:
    """A logical cache (batch, capacity, heads_kv, dim) and its paged twin."""

    q: np.ndarray
    k_cache: np.ndarray  # contiguous, host
    v_cache: np.ndarray
    lengths: np.ndarray  # int32 keys already cached
    k: np.ndarray | None  # new tokens, host
    v: np.ndarray | None
    block_size: int = 0
    paged_k: np.ndarray | None = None
    paged_v: np.ndarray | None = None
    table: np.ndarray | None = None

    def caches(self, paged):
        """Host arrays of the cache as the kernel gets it."""
        if paged:
            return self.paged_k, self.paged_v, self.table
        return self.k_cache, self.v_cache, None


def paginate(rng, cache, block_size, spare=2):
    """The paged twin of a contiguous cache: blocks in shuffled order in a pool with
    ``spare`` extra blocks, and the block table that finds them."""
    batch, capacity = cache.shape[:2]
    per_seq = -(-capacity // block_size)
    pool = batch * per_seq + spare
    table = rng.permutation(pool)[: batch * per_seq].reshape(batch, per_seq).astype(np.int32)
    paged = rng.standard_normal((pool, block_size, *cache.shape[2:])).astype(cache.dtype)
    for b in range(batch):
        for t in range(capacity):
            paged[table[b, t // block_size], t % block_size] = cache[b, t]
    return paged, table


def draw_case(rng, dtype, *, large=False, batch=None, seqlen_q=None, group=None, new=None, block_size=None,
              head_dim=None, head_dim_v=None, max_len=None, zero_lengths=False):
    batch = batch if batch is not None else int(rng.integers(1, 5 if large else 3))
    seqlen_q = seqlen_q if seqlen_q is not None else int(rng.choice([1, 1, 2, 3]))
    group = group if group is not None else int(rng.choice([1, 2, 4]))
    heads_kv = int(rng.integers(1, 3))
    if head_dim is None:
        head_dim = int(rng.choice([64, 128, 80, 256])) if large else int(rng.choice([8, 16, 5]))
    if head_dim_v is None:
        head_dim_v = head_dim if rng.random() < 0.7 else (head_dim - 16 if large else 12)
    new = new if new is not None else int(rng.choice([0, 1, 3]))
    max_len = max_len if max_len is not None else (3000 if large else 40)
    lengths = rng.integers(0 if zero_lengths else 1, max_len + 1, batch).astype(np.int32)
    if zero_lengths:
        lengths[0] = 0
    capacity = int(lengths.max()) + new + int(rng.integers(0, 4))
    block_size = block_size if block_size is not None else int(rng.choice([16, 64, 256] if large else [4, 16]))
    r = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    case = Case(
        q=r(batch, seqlen_q, heads_kv * group, head_dim),
        k_cache=r(batch, capacity, heads_kv, head_dim),
        v_cache=r(batch, capacity, heads_kv, head_dim_v),
        lengths=lengths,
        k=r(batch, new, heads_kv, head_dim) if new else None,
        v=r(batch, new, heads_kv, head_dim_v) if new else None,
        block_size=block_size,
    )
    case.paged_k, case.table = paginate(rng, case.k_cache, block_size)
    case.paged_v = r(case.paged_k.shape[0], block_size, heads_kv, head_dim_v)
    for b in range(batch):
        for t in range(capacity):
            case.paged_v[case.table[b, t // block_size], t % block_size] = case.v_cache[b, t]
    return case


def run_case(case, *, paged, causal, num_splits=0, seed=None, dtype=None):
    """Run nbflash on device copies; check out, lse and the caches after the append
    against the oracle. Returns the output (host)."""
    kc, vc, table = case.caches(paged)
    dtype = dtype or case.q.dtype
    ref, ref_lse = nbflash.reference.attention_with_kvcache(
        case.q, kc, vc, cache_seqlens=case.lengths, k=case.k, v=case.v, block_table=table,
        causal=causal, return_lse=True,
    )
    dkc, dvc = to_device(kc.copy()), to_device(vc.copy())
    dk, dv = (None, None) if case.k is None else (to_device(case.k), to_device(case.v))
    out = poisoned(ref.shape, dtype)
    got, lse = nbflash.attention_with_kvcache(
        to_device(case.q), dkc, dvc, cache_seqlens=to_device(case.lengths), k=dk, v=dv,
        block_table=None if table is None else to_device(table), causal=causal,
        num_splits=num_splits, return_lse=True, out=out,
    )
    assert got is out
    assert lse.dtype == np.float32 and lse.shape == ref_lse.shape
    assert_close(got, ref, dtype, seed=seed)
    assert_lse_close(lse, ref_lse, seed=seed)
    if case.k is not None:
        want_k, want_v = nbflash.reference.append_to_kvcache(
            kc, vc, cache_seqlens=case.lengths, k=case.k, v=case.v, block_table=table)
        assert np.array_equal(to_host(dkc).astype(np.float64), want_k), f"k_cache after append (seed {seed})"
        assert np.array_equal(to_host(dvc).astype(np.float64), want_v), f"v_cache after append (seed {seed})"
    else:
        assert np.array_equal(to_host(dkc), kc) and np.array_equal(to_host(dvc), vc)
    return to_host(got)


@pytest.mark.parametrize("large", TIERS)
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_batches_match_oracle(dtype, paged, large):
    rng, seed = new_rng()
    case = draw_case(rng, dtype, large=large)
    run_case(case, paged=paged, causal=bool(rng.integers(2)), num_splits=int(rng.choice([0, 1, 3])), seed=seed)


@pytest.mark.parametrize("large", TIERS)
@pytest.mark.parametrize("block_size", [16, 64, 256])
def test_paged_matches_contiguous_with_shuffled_blocks(block_size, large):
    rng, seed = new_rng()
    case = draw_case(rng, F16, large=large, block_size=block_size, new=1, seqlen_q=1,
                     max_len=(4000 if large else 2 * block_size // (1 if block_size == 16 else 4)))
    contiguous = run_case(case, paged=False, causal=True, seed=seed)
    paged = run_case(case, paged=True, causal=True, seed=seed)
    assert_close(paged, contiguous.astype(np.float64), F16, what="paged vs contiguous", seed=seed)


@pytest.mark.parametrize("large", TIERS)
def test_append_then_attend_equals_attend_over_concatenation(large):
    rng, seed = new_rng()
    case = draw_case(rng, F32, large=large, new=int(rng.integers(1, 5)), zero_lengths=True)
    appended = run_case(case, paged=True, causal=True, seed=seed)
    # the same keys, written into the cache beforehand: nothing to append
    written_k, written_v = nbflash.reference.append_to_kvcache(
        case.paged_k, case.paged_v, cache_seqlens=case.lengths, k=case.k, v=case.v, block_table=case.table)
    whole = Case(case.q, case.k_cache, case.v_cache, case.lengths + case.k.shape[1], None, None, case.block_size,
                 written_k.astype(F32), written_v.astype(F32), case.table)
    direct = run_case(whole, paged=True, causal=True, seed=seed)
    assert_close(appended, direct.astype(np.float64), F32, what="append vs pre-written", seed=seed)


@pytest.mark.parametrize("large", TIERS)
@pytest.mark.parametrize("num_splits", [1, 2, 7, 0])
def test_split_counts_agree(num_splits, large):
    """One split writes the output directly; several merge partials by lse (7 leaves
    some splits without keys); 0 chooses."""
    rng, seed = new_rng()
    case = draw_case(rng, BF16, large=large, seqlen_q=1, new=0)
    run_case(case, paged=bool(rng.integers(2)), causal=True, num_splits=num_splits, seed=seed)


@pytest.mark.parametrize("large", TIERS)
@pytest.mark.parametrize("group,seqlen_q", [(1, 1), (8, 1), (4, 2), (8, 3)])
def test_gqa_groups_and_query_row_chunks(group, seqlen_q, large):
    """group x seqlen_q beyond the rows one CTA holds runs in row chunks."""
    rng, seed = new_rng()
    case = draw_case(rng, F16, large=large, group=group, seqlen_q=seqlen_q)
    run_case(case, paged=bool(rng.integers(2)), causal=True, seed=seed)


@pytest.mark.parametrize("large", TIERS)
@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
@pytest.mark.parametrize("block_size", [0, 16, 64, 256], ids=lambda b: f"paged{b}" if b else "contiguous")
def test_tensor_core_kernel_matches_oracle(block_size, dtype, large):
    """The fast path (kernels/decode_mma.py): 16-bit caches with 16-byte aligned rows.
    GQA 8 with 1-3 query rows each (8, 16 or 24 rows: a padded, a full and two row
    chunks of 16), head dims that need zero-padded columns (8, 24, 40 stage as 32 / 16
    / 48), causal or not, one split or several (some of them empty)."""
    rng, seed = new_rng()
    head_dim = int(rng.choice([64, 128, 96]) if large else rng.choice([8, 16, 24, 32]))
    head_dim_v = head_dim if rng.random() < 0.5 else max(8, head_dim - 8)  # Dv != D, still a multiple of 8
    case = draw_case(rng, dtype, large=large, group=8 if large or rng.random() < 0.7 else 2,
                     seqlen_q=int(rng.integers(1, 4)), head_dim=head_dim, head_dim_v=head_dim_v,
                     new=int(rng.choice([0, 1])), block_size=block_size or 16, max_len=(5000 if large else 48),
                     zero_lengths=rng.random() < 0.3)
    paged = block_size > 0
    kc, vc, table = case.caches(paged)
    spec = nbflash.kvcache_spec(case.q, kc, vc, cache_seqlens=case.lengths, k=case.k, v=case.v, block_table=table)
    assert spec.key.startswith("decode_mma-"), spec.key
    causal = bool(rng.integers(2))
    run_case(case, paged=paged, causal=causal, num_splits=int(rng.choice([0, 1, 2, 5])), seed=seed)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_speculative_rows_and_rows_that_see_no_key(causal):
    """seqlen_q > total length: under causal the first rows see no key (0, lse -inf)."""
    rng, seed = new_rng()
    case = draw_case(rng, F32, batch=2, seqlen_q=4, group=2, new=1, max_len=2, zero_lengths=True)
    run_case(case, paged=False, causal=causal, num_splits=2, seed=seed)


def test_empty_caches_without_new_tokens_give_zeros():
    rng, seed = new_rng()
    case = draw_case(rng, F16, batch=2, seqlen_q=1, new=0, max_len=0, zero_lengths=True)
    got = run_case(case, paged=True, causal=True, num_splits=3, seed=seed)
    assert np.all(got == 0)


def test_misaligned_cache_falls_back_to_scalar_loads():
    rng, seed = new_rng()
    batch, cap, heads_kv, dim = 2, 20, 1, 16
    q = rng.standard_normal((batch, 1, 2, dim)).astype(F16)
    k = rng.standard_normal((batch, 1, heads_kv, dim)).astype(F16)
    v = rng.standard_normal((batch, 1, heads_kv, dim)).astype(F16)
    lengths = rng.integers(0, cap, batch).astype(np.int32)
    # caches one element into larger buffers: every row starts 2 bytes past 16
    big_k, big_v = (to_device(rng.standard_normal((batch, cap, heads_kv, dim + 1)).astype(F16)) for _ in range(2))
    kc, vc = big_k[..., 1:], big_v[..., 1:]
    args = dict(cache_seqlens=lengths, k=to_device(k), v=to_device(v))
    assert "-scalar" in nbflash.kvcache_spec(q, kc, vc, **args).key
    host_k, host_v = to_host(kc).copy(), to_host(vc).copy()
    # the same values in aligned buffers take the tensor-core kernel (16-byte cp.async copies)
    assert nbflash.kvcache_spec(q, host_k, host_v, cache_seqlens=lengths, k=k, v=v).key.startswith("decode_mma-")
    ref = nbflash.reference.attention_with_kvcache(q, host_k, host_v, cache_seqlens=lengths, k=k, v=v)
    got = nbflash.attention_with_kvcache(to_device(q), kc, vc, num_splits=2, **args)
    assert_close(got, ref, F16, seed=seed)
    want_k, _ = nbflash.reference.append_to_kvcache(host_k, host_v, cache_seqlens=lengths, k=k, v=v)
    assert np.array_equal(to_host(kc).astype(np.float64), want_k)


def test_int_cache_seqlens_and_fresh_output():
    rng, _ = new_rng()
    q = rng.standard_normal((2, 1, 4, 8)).astype(F32)
    kc = rng.standard_normal((2, 12, 2, 8)).astype(F32)
    vc = rng.standard_normal((2, 12, 2, 8)).astype(F32)
    got = nbflash.attention_with_kvcache(to_device(q), to_device(kc), to_device(vc), cache_seqlens=9)
    ref = nbflash.reference.attention_with_kvcache(q, kc, vc, cache_seqlens=9)
    assert got.shape == (2, 1, 4, 8) and got.dtype == F32
    assert_close(got, ref, F32)


@pytest.mark.parametrize("block_size", [4, 16])
def test_prefill_then_decode_grows_paged_cache(block_size):
    """Prefill a prompt through the cache (seqlen_q = prompt, causal), then decode
    token by token; every step matches full attention over the sequence so far."""
    rng, seed = new_rng()
    batch, heads_kv, group, dim, prompt, steps = 2, 1, 2, 8, 5, 3
    dtype = F16
    per_seq = -(-(prompt + steps) // block_size)
    pool = batch * per_seq + 1
    table = rng.permutation(pool)[: batch * per_seq].reshape(batch, per_seq).astype(np.int32)
    k_pool = to_device(np.zeros((pool, block_size, heads_kv, dim), dtype))
    v_pool = to_device(np.zeros((pool, block_size, heads_kv, dim), dtype))
    ks = rng.standard_normal((batch, prompt + steps, heads_kv, dim)).astype(dtype)
    vs = rng.standard_normal((batch, prompt + steps, heads_kv, dim)).astype(dtype)
    qs = rng.standard_normal((batch, prompt + steps, heads_kv * group, dim)).astype(dtype)
    length = 0
    for n in [prompt] + [1] * steps:
        sl = slice(length, length + n)
        out = nbflash.attention_with_kvcache(
            to_device(qs[:, sl]), k_pool, v_pool, cache_seqlens=to_device(np.full(batch, length, np.int32)),
            k=to_device(ks[:, sl]), v=to_device(vs[:, sl]), block_table=to_device(table), causal=True,
            num_splits=int(rng.choice([0, 2])))
        length += n
        full = nbflash.reference.attention(qs[:, :length], ks[:, :length], vs[:, :length], causal=True)
        assert_close(out, full[:, sl], dtype, what=f"step at length {length}", seed=seed)


# ---- refusals: every one before anything is written --------------------------------


def _refusal_inputs(rng, paged=False):
    q = rng.standard_normal((2, 1, 4, 8)).astype(F16)
    if paged:
        kc = rng.standard_normal((6, 4, 2, 8)).astype(F16)
        vc = rng.standard_normal((6, 4, 2, 8)).astype(F16)
        table = np.array([[0, 1, 2], [3, 4, 5]], np.int32)
    else:
        kc = rng.standard_normal((2, 12, 2, 8)).astype(F16)
        vc = rng.standard_normal((2, 12, 2, 8)).astype(F16)
        table = None
    k = rng.standard_normal((2, 2, 2, 8)).astype(F16)
    v = rng.standard_normal((2, 2, 2, 8)).astype(F16)
    return dict(q=q, k_cache=kc, v_cache=vc, cache_seqlens=np.array([3, 5], np.int32), k=k, v=v, block_table=table)


D = to_device
REFUSALS = {  # name: (paged, change the device arguments, error, words in its message)
    "past capacity": (False, lambda a: a.update(cache_seqlens=D(np.array([3, 11], np.int32))), ValueError, "capacity"),
    "past paged capacity": (True, lambda a: a.update(cache_seqlens=np.array([11, 0], np.int32)), ValueError, "capacity"),
    "negative length": (False, lambda a: a.update(cache_seqlens=D(np.array([-1, 2], np.int32))), ValueError, ">= 0"),
    "negative int length": (False, lambda a: a.update(cache_seqlens=-2), ValueError, ">= 0"),
    "seqlens dtype": (False, lambda a: a.update(cache_seqlens=D(np.array([1, 2], np.int64))), TypeError, "int32"),
    "seqlens shape": (False, lambda a: a.update(cache_seqlens=D(np.array([1, 2, 3], np.int32))), ValueError, "shape"),
    "table dtype": (True, lambda a: a.update(block_table=a["block_table"].astype(np.int64)), TypeError, "int32"),
    "table ndim": (True, lambda a: a.update(block_table=a["block_table"].reshape(-1)), ValueError, "2 dims"),
    "table rows": (True, lambda a: a.update(block_table=a["block_table"][:1]), ValueError, "rows"),
    "heads": (False, lambda a: a.update(q=a["q"][:, :, :3]), ValueError, "multiple of heads_kv"),
    "q dtype": (False, lambda a: a.update(q=a["q"].astype(F32)), TypeError, "dtype"),
    "cache dtype": (False, lambda a: a.update(v_cache=a["v_cache"].astype(F32)), TypeError, "dtype"),
    "new k dtype": (False, lambda a: a.update(k=a["k"].astype(F32)), TypeError, "dtype"),
    "head_dim": (False, lambda a: a.update(q=a["q"][..., :4]), ValueError, "head_dim"),
    "new k head_dim": (False, lambda a: a.update(k=a["k"][..., :4]), ValueError, "k: expected shape"),
    "new v heads": (False, lambda a: a.update(v=a["v"][:, :, :1]), ValueError, "v: expected shape"),
    "k without v": (False, lambda a: a.update(v=None), ValueError, "both"),
    "cache heads": (False, lambda a: a.update(v_cache=a["v_cache"][:, :, :1]), ValueError, "v_cache"),
    "cache batch": (False, lambda a: a.update(k_cache=a["k_cache"][:1], v_cache=a["v_cache"][:1]), ValueError, "batch"),
    "num_splits negative": (False, lambda a: a.update(num_splits=-1), ValueError, "num_splits"),
    "num_splits huge": (False, lambda a: a.update(num_splits=5000), ValueError, "num_splits"),
    "num_splits float": (False, lambda a: a.update(num_splits=2.0), TypeError, "num_splits"),
    "out shape": (False, lambda a: a.update(out=D(np.zeros((2, 1, 4, 4), F16))), ValueError, "out"),
    "out dtype": (False, lambda a: a.update(out=D(np.zeros((2, 1, 4, 8), F32))), TypeError, "out"),
    "out overlaps q": (False, lambda a: a.update(out=a["q"]), ValueError, "overlaps"),
    "scale": (False, lambda a: a.update(scale=-1.0), ValueError, "scale"),
    "q 3-D": (False, lambda a: a.update(q=a["q"][0]), ValueError, "4 dims"),
    "new k overlaps cache": (False, lambda a: a.update(k=a["k_cache"][:, :2]), ValueError, "overlaps"),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refusals_leave_caches_untouched(name):
    paged, change, error, words = REFUSALS[name]
    rng, _ = new_rng()
    args = {n: (to_device(x) if isinstance(x, np.ndarray) else x) for n, x in _refusal_inputs(rng, paged).items()}
    change(args)
    caches = {n: args[n] for n in ("k_cache", "v_cache")}
    before = {n: to_host(c).copy() for n, c in caches.items()}
    with pytest.raises(error, match=words):
        nbflash.attention_with_kvcache(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"), **args)
    for n, c in caches.items():
        assert np.array_equal(to_host(c), before[n]), n


@pytest.mark.gpu
def test_host_device_mix_is_refused():
    rng, _ = new_rng()
    args = _refusal_inputs(rng)
    with pytest.raises(TypeError, match="mixed"):
        nbflash.attention_with_kvcache(to_device(args["q"]), args["k_cache"], to_device(args["v_cache"]),
                                       cache_seqlens=args["cache_seqlens"])


def test_reference_raises_on_block_ids_outside_the_cache():
    rng, _ = new_rng()
    args = _refusal_inputs(rng, paged=True)
    args["block_table"] = np.array([[0, 1, 2], [3, 9, 5]], np.int32)
    with pytest.raises(IndexError, match=r"block_table\[1, 1\] = 9"):
        nbflash.reference.attention_with_kvcache(**args)
    args["block_table"] = np.array([[0, 1, 2], [3, -1, 5]], np.int32)
    with pytest.raises(IndexError, match="outside"):
        nbflash.reference.append_to_kvcache(args["k_cache"], args["v_cache"], cache_seqlens=args["cache_seqlens"],
                                            k=args["k"], v=args["v"], block_table=args["block_table"])


def test_reference_does_not_mutate_and_refuses_capacity():
    rng, _ = new_rng()
    args = _refusal_inputs(rng)
    before = args["k_cache"].copy()
    nbflash.reference.attention_with_kvcache(**args)
    nbflash.reference.append_to_kvcache(args["k_cache"], args["v_cache"], cache_seqlens=args["cache_seqlens"],
                                        k=args["k"], v=args["v"])
    assert np.array_equal(args["k_cache"], before)
    with pytest.raises(ValueError, match="capacity"):
        nbflash.reference.attention_with_kvcache(**{**args, "cache_seqlens": np.array([11, 0], np.int32)})


def test_auto_splits_fill_the_gpu_and_keep_splits_long():
    sms = 132
    assert choose_num_splits(64 * 8, 4096, sms, 256) == 1  # batch 64: already > 2 CTAs per SM
    wide = choose_num_splits(1 * 8, 131072, sms, 256)  # batch 1, 128k keys: many splits
    assert 8 * wide >= 1.9 * sms and 131072 // wide >= 256
    mid = choose_num_splits(8 * 8, 32768, sms, 256)  # batch 8: every SM gets work
    assert 64 * mid >= sms and 32768 // mid >= 256
    assert choose_num_splits(8, 300, sms, 256) == 1  # too short to split
    assert choose_num_splits(0, 100, sms, 256) == 1
    # the tensor-core kernel: two CTAs per SM fill it, splits of >= 512 keys
    busy, keys = nbflash.tuning.DECODE_MMA_BUSY_CTAS_PER_SM, nbflash.tuning.DECODE_MMA_MIN_SPLIT_KEYS
    assert choose_num_splits(64 * 8, 4096, sms, keys, busy) == 1  # 512 CTAs: ~2 rounds of 2 per SM
    wide = choose_num_splits(1 * 8, 131072, sms, keys, busy)
    assert 8 * wide >= 1.9 * sms and 131072 // wide >= keys
    mid = choose_num_splits(8 * 8, 32768, sms, keys, busy)
    assert 1.9 * sms <= 64 * mid <= busy * sms


@pytest.mark.gpu
def test_numpy_inputs_on_a_gpu_machine_append_into_the_host_caches():
    rng, seed = new_rng()
    case = draw_case(rng, F16, large=True, new=2)
    kc, vc = case.paged_k.copy(), case.paged_v.copy()
    got = nbflash.attention_with_kvcache(case.q, kc, vc, cache_seqlens=case.lengths, k=case.k, v=case.v,
                                         block_table=case.table)
    assert isinstance(got, np.ndarray)
    ref = nbflash.reference.attention_with_kvcache(case.q, case.paged_k, case.paged_v, cache_seqlens=case.lengths,
                                                   k=case.k, v=case.v, block_table=case.table)
    assert_close(got, ref, F16, seed=seed)
    want_k, _ = nbflash.reference.append_to_kvcache(case.paged_k, case.paged_v, cache_seqlens=case.lengths,
                                                    k=case.k, v=case.v, block_table=case.table)
    assert np.array_equal(kc.astype(np.float64), want_k)


# --- check_seqlens=False: lengths trusted, clamped by the kernels (issue 5) ------------

INT32_MAX = 2**31 - 1


@pytest.mark.parametrize("kernel,paged", [("mma", False), ("mma", True), ("portable", False), ("portable", True)])
def test_unchecked_bad_lengths_are_clamped_and_stay_inside_the_cache(kernel, paged):
    """check_seqlens=False never reads cache_seqlens on the host; lengths below 0 or
    past capacity - seqlen_new give the result of the clamped length, and neither the
    append nor the attention touches a byte outside the cache: the caches sit in
    NaN-filled buffers with guard rows (blocks) on both sides, which must stay NaN
    and must not leak into the output."""
    rng, seed = new_rng()
    dtype, head_dim = (F16, 16) if kernel == "mma" else (F32, int(rng.choice([5, 8])))
    batch, heads_kv, group, new, block_size, guard = 4, 1, 2, int(rng.integers(1, 3)), 4, 3
    capacity = 12
    seqlen_q = int(rng.integers(1, 3))
    bad = np.array([-int(rng.integers(1, 9)), capacity + int(rng.integers(0, 9)), capacity - new + 1, INT32_MAX,
                    -(2**31), int(rng.integers(0, capacity - new + 1))], np.int32)
    lengths = rng.choice(bad, batch).astype(np.int32)
    lengths[0] = bad[int(rng.integers(0, 4))]  # at least one bad length
    clamped = np.clip(lengths.astype(np.int64), 0, capacity - new).astype(np.int32)
    r = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    q = r(batch, seqlen_q, heads_kv * group, head_dim)
    k, v = r(batch, new, heads_kv, head_dim), r(batch, new, heads_kv, head_dim)
    if paged:
        per_seq = capacity // block_size
        blocks = batch * per_seq + 1
        table = rng.permutation(blocks)[: batch * per_seq].reshape(batch, per_seq).astype(np.int32)
        shape, axis = (blocks, block_size, heads_kv, head_dim), 0
    else:
        table, shape, axis = None, (batch, capacity, heads_kv, head_dim), 1
    buffers, caches, hosts = [], [], []
    for _ in range(2):  # k_cache, v_cache
        host = r(*shape)
        big_shape = list(shape)
        big_shape[axis] += 2 * guard
        big = np.full(big_shape, np.nan, dtype)
        inside = [slice(None)] * 4
        inside[axis] = slice(guard, guard + shape[axis])
        inside = tuple(inside)
        big[inside] = host
        dev = to_device(big)
        buffers.append(dev)
        caches.append(dev[inside])
        hosts.append(host)
    args = dict(k=to_device(k), v=to_device(v), block_table=None if table is None else to_device(table))
    spec = nbflash.kvcache_spec(to_device(q), *caches, cache_seqlens=to_device(lengths), check_seqlens=False, **args)
    assert spec.key.startswith("decode_mma-" if kernel == "mma" else "decode-"), spec.key
    with pytest.raises(ValueError, match="cache_seqlens"):  # the checked path refuses them, nothing written
        nbflash.attention_with_kvcache(to_device(q), *caches, cache_seqlens=to_device(lengths), **args)
    assert np.array_equal(to_host(caches[0]), hosts[0]) and np.array_equal(to_host(caches[1]), hosts[1])

    out = poisoned((batch, seqlen_q, heads_kv * group, head_dim), dtype)
    got, lse = nbflash.attention_with_kvcache(
        to_device(q), *caches, cache_seqlens=to_device(lengths), causal=True,
        num_splits=int(rng.choice([0, 1, 3])), return_lse=True, out=out, check_seqlens=False, **args)
    ref, ref_lse = nbflash.reference.attention_with_kvcache(
        q, *hosts, cache_seqlens=clamped, k=k, v=v, block_table=table, causal=True, return_lse=True)
    assert_close(got, ref, dtype, seed=seed)
    assert_lse_close(lse, ref_lse, seed=seed)
    want = nbflash.reference.append_to_kvcache(*hosts, cache_seqlens=clamped, k=k, v=v, block_table=table)
    for name, dev_buffer, cache, wanted in zip(("k_cache", "v_cache"), buffers, caches, want):
        assert np.array_equal(to_host(cache).astype(np.float64), wanted), f"{name} after the append (seed {seed})"
        big = to_host(dev_buffer)
        before = big.take(range(guard), axis)
        after = big.take(range(big.shape[axis] - guard, big.shape[axis]), axis)
        assert np.isnan(before).all() and np.isnan(after).all(), f"{name}: a guard was written (seed {seed})"


def test_unchecked_lengths_accept_ints_and_host_arrays_and_refuse_what_metadata_shows():
    rng, seed = new_rng()
    q = rng.standard_normal((2, 1, 2, 8)).astype(F32)
    kc, vc = (rng.standard_normal((2, 6, 1, 8)).astype(F32) for _ in range(2))
    dev = [to_device(x) for x in (q, kc, vc)]
    for lengths in (4, np.array([4, 4], np.int32)):
        got = nbflash.attention_with_kvcache(*dev, cache_seqlens=lengths, check_seqlens=False)
        assert_close(got, nbflash.reference.attention_with_kvcache(q, kc, vc, cache_seqlens=4), F32, seed=seed)
    new = to_device(rng.standard_normal((2, 7, 1, 8)).astype(F32))
    for kwargs, exc, match in (
        (dict(cache_seqlens=to_device(np.zeros(2, np.int64))), TypeError, r"cache_seqlens: expected dtype int32"),
        (dict(cache_seqlens=to_device(np.zeros(3, np.int32))), ValueError, r"cache_seqlens: expected shape \(2,\)"),
        (dict(cache_seqlens=2**31), ValueError, r"cache_seqlens: 2147483648 does not fit int32"),
        (dict(cache_seqlens=0, k=new, v=new), ValueError, r"k: 7 new tokens exceed the cache capacity 6"),
        (dict(cache_seqlens=0, check_seqlens=1), TypeError, r"check_seqlens: expected a bool"),
    ):
        kwargs.setdefault("check_seqlens", False)
        with pytest.raises(exc, match=match):
            nbflash.attention_with_kvcache(*dev, **kwargs)
    assert np.array_equal(to_host(dev[1]), kc) and np.array_equal(to_host(dev[2]), vc)


@pytest.mark.gpu
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged16"])
def test_gpu_unchecked_lengths_do_not_synchronize_and_match_the_checked_call(paged):
    """check_seqlens=False with a device cache_seqlens: the call returns while a spin
    kernel still holds the stream (no device-to-host copy), and its result is the
    checked call's, bit for bit, at decode sizes with split-KV."""
    import time

    import cupy

    rng, seed = new_rng()
    case = draw_case(rng, F16, large=True, batch=4, seqlen_q=1, group=4, new=1, head_dim=128, head_dim_v=128,
                     block_size=16, max_len=3000)
    kc, vc, table = case.caches(paged)
    args = dict(k=to_device(case.k), v=to_device(case.v), block_table=None if table is None else to_device(table),
                num_splits=4)
    q, lengths = to_device(case.q), to_device(case.lengths)
    checked_caches = [to_device(x.copy()) for x in (kc, vc)]
    want = nbflash.attention_with_kvcache(q, *checked_caches, cache_seqlens=lengths, **args)
    caches = [to_device(x.copy()) for x in (kc, vc)]
    spin = cupy.RawKernel(r'''extern "C" __global__ void spin(long long n) {
        long long t0 = clock64(); while (clock64() - t0 < n) { } }''', "spin")
    got = nbflash.attention_with_kvcache(q, *caches, cache_seqlens=lengths, check_seqlens=False, **args)  # warm
    caches = [to_device(x.copy()) for x in (kc, vc)]
    cupy.cuda.get_current_stream().synchronize()
    spin((1,), (1,), (cupy.int64(cupy.cuda.Device().attributes["ClockRate"] * 200),))  # ~200 ms
    start = time.perf_counter()
    got = nbflash.attention_with_kvcache(q, *caches, cache_seqlens=lengths, check_seqlens=False, **args)
    took = time.perf_counter() - start
    busy = not cupy.cuda.get_current_stream().done
    cupy.cuda.get_current_stream().synchronize()
    assert busy and took < 0.1, f"the call waited for the stream ({took:.3f} s)"
    assert np.array_equal(to_host(got).view(np.uint16), to_host(want).view(np.uint16)), f"seed {seed}"
    for a, b in zip(caches, checked_caches):
        assert np.array_equal(to_host(a).view(np.uint16), to_host(b).view(np.uint16)), f"seed {seed}"


@pytest.mark.gpu
@pytest.mark.skipif(SIMULATOR, reason="device dummies are kept per device on a GPU only")
def test_gpu_contiguous_cache_calls_reuse_one_dummy_block_table(monkeypatch):
    """A contiguous-cache call passes the kernels a dummy block table (and a dummy lse
    without return_lse): made once per device and kept, not allocated (and zeroed by
    a kernel) on every call."""
    from nbflash import launch

    seen = []
    real = launch.launch

    def recording(kernel, grid, threads, args, *rest, **kw):
        seen.append([a.ptr for a in args if isinstance(a, launch.DeviceArg) and a.shape in ((1, 1), (1, 1, 1))])
        return real(kernel, grid, threads, args, *rest, **kw)

    monkeypatch.setattr(launch, "launch", recording)
    rng, _ = new_rng()
    q = to_device(rng.standard_normal((2, 1, 2, 64)).astype(F16))
    kc, vc = (to_device(rng.standard_normal((2, 40, 1, 64)).astype(F16)) for _ in range(2))
    for _ in range(2):
        nbflash.attention_with_kvcache(q, kc, vc, cache_seqlens=30, num_splits=1, check_seqlens=False)
    assert len(seen) == 2 and seen[0] and seen[0] == seen[1], seen
