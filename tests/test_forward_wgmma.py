"""The Hopper wgmma forward (kernels/forward_wgmma.py; on by default on sm_90, turned on
here with NBFLASH_WGMMA=1) against the float64 oracle, plain and with the light variants
it compiles in (sliding window, softcap, ALiBi). On the simulator its wgmma, cp.async and
shuffles run as emulated warpgroup-wide operations (one warpgroup, 64-row and 64-key
tiles), so these tests check the staged layouts, the descriptors and the fragment maps of
the whole kernel without a GPU; the gpu tier runs the shipped tiles on an H100."""

from __future__ import annotations

import numpy as np
import pytest

from numba import cuda

import nbflash
from helpers import DTYPES, VarlenShape, check_forward_kernel, check_varlen_forward, draw_shape, draw_varlen, new_rng
from helpers import assert_close, assert_lse_close, poisoned, random_array, to_device, to_host
from nbflash import launch, plans, tuning
from nbflash.kernels import ptx

HALF_DTYPES = DTYPES[:2]
SOFTCAPS = (0.75, 2.0, 5.0)  # exact in float32: the kernel receives softcap as float32


@pytest.fixture
def wgmma_on(monkeypatch):
    """NBFLASH_WGMMA=1 for one test, and no dispatch decision remembered across it."""
    monkeypatch.setenv("NBFLASH_WGMMA", "1")
    plans.forget()
    yield
    plans.forget()


def check(rng, seed, shape, dtype, causal, layout="bshd", **variants):
    return check_forward_kernel(rng, seed, shape, dtype, causal, "wgmma", layout, **variants)


def sim_shape(rng, seqlen_q, seqlen_k, group=1, head_dim=64):
    shape = draw_shape(rng, head_dim=head_dim, group=group, seqlen_q=seqlen_q, seqlen_k=seqlen_k)
    shape.head_dim_v, shape.heads_kv, shape.heads_q, shape.batch = head_dim, 1, group, 1
    return shape


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_wgmma_kernel_matches_oracle_two_tiles_each_way(dtype, wgmma_on):
    """Non-multiples of the 64-row and 64-key tiles, two of each; GQA 2."""
    rng, seed = new_rng()
    shape = sim_shape(rng, int(rng.integers(65, 100)), int(rng.integers(65, 100)), group=2)
    check(rng, seed, shape, dtype, False, layout=str(rng.choice(["bshd", "bhsd"])))


@pytest.mark.parametrize("size", ["small", pytest.param("large", marks=pytest.mark.gpu)])
def test_wgmma_kernel_reads_negative_sequence_strides(size, wgmma_on):
    """q, k and v viewed with the sequence axis reversed (negative row strides): the
    cp.async row addresses step by the signed stride (a zero-extended 32-bit one read
    2^32 bytes off); GQA 2, causal or not, two tiles each way. The simulator's twin
    indexes the arrays, so only the device runs the stride arithmetic: "large" (every
    shipped head_dim) is the gpu tier's case."""
    from nbflash import reference

    rng, seed = new_rng()
    dtype = HALF_DTYPES[int(rng.integers(2))]
    causal = bool(rng.integers(2))
    if size == "small":
        head_dim, seqlen_q, seqlen_k = 64, int(rng.integers(65, 100)), int(rng.integers(65, 100))
    else:
        head_dim = int(rng.choice(sorted(tuning.WGMMA_TILES)))
        seqlen_q, seqlen_k = int(rng.integers(300, 900)), int(rng.integers(300, 900))
    q = random_array(rng, (1, seqlen_q, 2, head_dim), dtype)
    k, v = (random_array(rng, (1, seqlen_k, 1, head_dim), dtype) for _ in range(2))
    views = [to_device(a)[:, ::-1] for a in (q, k, v)]
    assert nbflash.forward_spec(*views, causal=causal).kernel == "wgmma"
    out = nbflash.attention(*views, causal=causal)
    ref = reference.attention(*(a[:, ::-1].astype(np.float64) for a in (q, k, v)), causal=causal)
    assert_close(out, ref, dtype, seed=seed)


@pytest.mark.parametrize("relation", ["q<k", "q>k"])
def test_wgmma_kernel_causal_unequal_seqlens(relation, wgmma_on):
    """Bottom-right causal: with seqlen_q > seqlen_k the first rows see no key (0, -inf)."""
    rng, seed = new_rng()
    a, b = int(rng.integers(1, 60)), int(rng.integers(66, 100))
    seqlen_q, seqlen_k = (a, b) if relation == "q<k" else (b, a)
    check(rng, seed, sim_shape(rng, seqlen_q, seqlen_k), HALF_DTYPES[int(rng.integers(2))], True)


@pytest.mark.parametrize("head_dim", [192, 256])
def test_wgmma_kernel_wide_head_dims(head_dim, wgmma_on, monkeypatch):
    """3 and 4 64-column panels: the S chain steps across Q and K panels, P V's N spans
    every panel of V (LBO); head_dim 192 copies its 24 chunks a row in strided order.
    One warpgroup with the shipped key tile (112 and 80 keys: not powers of two); two
    key tiles, the second partial."""
    block_n = tuning.WGMMA_TILES[head_dim][1]
    monkeypatch.setattr(tuning, "WGMMA_TILES_SIMULATOR", (64, block_n, 128))
    rng, seed = new_rng()
    shape = sim_shape(rng, int(rng.integers(1, 64)), int(rng.integers(block_n + 1, 2 * block_n)), head_dim=head_dim)
    check(rng, seed, shape, HALF_DTYPES[int(rng.integers(2))], bool(rng.integers(2)))


def test_wgmma_runs_by_default_on_sm90_for_dense_attention_and_light_variants(monkeypatch):
    rng, _ = new_rng()
    shape = sim_shape(rng, 5, 7)
    q, k, v = (to_device(random_array(rng, s, HALF_DTYPES[0])) for s in shape.qkv_shapes("bshd"))
    monkeypatch.delenv("NBFLASH_WGMMA", raising=False)
    plans.forget()
    # off unless asked on the simulator; on by default on an sm_90 GPU
    hopper = not nbflash.device.SIMULATOR and nbflash.device.compute_capability()[:2] == (9, 0)
    assert nbflash.forward_spec(q, k, v).kernel == ("wgmma" if hopper else "mma")
    assert tuning.wgmma_tiles(64, False, (9, 0)) == tuning.WGMMA_TILES[64]  # a GPU: on by default
    assert tuning.wgmma_tiles(256, False, (9, 0)) == tuning.WGMMA_TILES[256]
    assert tuning.wgmma_tiles(192, False, (9, 0)) is None  # mma.sync measured faster there
    monkeypatch.setenv("NBFLASH_WGMMA", "0")
    assert tuning.wgmma_tiles(64, False, (9, 0)) is None
    monkeypatch.setenv("NBFLASH_WGMMA", "1")
    assert tuning.wgmma_tiles(192, False, (9, 0)) == tuning.WGMMA_TILES[192]  # asked for
    assert nbflash.forward_spec(q, k, v).kernel == "wgmma"
    # window, softcap and ALiBi are compiled into the wgmma kernel; bias, mask and dropout run mma
    spec = nbflash.forward_spec(q, k, v, causal=True, window=(3, -1), softcap=5.0,
                                alibi_slopes=to_device(np.ones(shape.heads_q, np.float32)))
    assert spec.kernel == "wgmma" and spec.variant.key == "-win-cap-alibi", spec.key
    for heavy in (dict(bias=np.zeros((5, 7), np.float32)), dict(mask=np.ones((5, 7), bool)),
                  dict(dropout_p=0.1, seed=1), dict(softcap=5.0, bias=np.zeros((5, 7), np.float32))):
        dev = {name: (to_device(x) if isinstance(x, np.ndarray) else x) for name, x in heavy.items()}
        assert nbflash.forward_spec(q, k, v, **dev).kernel == "mma", heavy
    shape32 = draw_shape(rng, head_dim=32, group=1, seqlen_q=5, seqlen_k=7)
    shape32.head_dim_v = 32
    q, k, v = (to_device(random_array(rng, s, HALF_DTYPES[0])) for s in shape32.qkv_shapes("bshd"))
    assert nbflash.forward_spec(q, k, v).kernel == "mma"  # head_dim 32: no whole 64-column panel
    assert tuning.wgmma_tiles(64, False, (8, 0)) is None  # sm_80 has no wgmma
    assert tuning.wgmma_tiles(64, False, (9, 0)) == tuning.WGMMA_TILES[64]


# --- the light variants (window, softcap, ALiBi) -----------------------------------


def window_of(rng, seqlen_k, widest):
    """(left, right), each side -1 (unbounded) or up to ``widest`` keys, not both -1."""
    left, right = (int(rng.integers(-1, widest)) for _ in range(2))
    return (left, right) if (left, right) != (-1, -1) else (int(rng.integers(0, widest)), -1)


def slopes_of(rng, shape):
    """ALiBi slopes (heads_q,) or (batch, heads_q), float32."""
    size = [(shape.heads_q,), (shape.batch, shape.heads_q)][int(rng.integers(2))]
    return rng.uniform(0.0, 0.5, size).astype(np.float32)


def pick(rng, values):
    return values[int(rng.integers(len(values)))]


def test_wgmma_window_skips_and_masks_tiles(wgmma_on):
    """Up to 4 key tiles and 3 query tiles: a window narrower than a tile skips tiles at
    both ends, and its edges cross tiles; with and without causal (folded into the band)."""
    rng, seed = new_rng()
    shape = sim_shape(rng, int(rng.integers(65, 180)), int(rng.integers(100, 230)))
    causal = bool(rng.integers(2))
    spec = check(rng, seed, shape, pick(rng, HALF_DTYPES), causal, window=window_of(rng, shape.seqlen_k, 60))
    assert spec.variant.window and spec.kernel == "wgmma", spec.key


@pytest.mark.parametrize("which", ["softcap", "alibi", "softcap+alibi"])
def test_wgmma_softcap_and_alibi(which, wgmma_on):
    """Three query and key tiles (full attention): ALiBi's key part on tiles left and
    right of every diagonal and its exact term on the tiles that cross them; softcap's
    tanh before ALiBi (the oracle's order). GQA 2 for one of the three."""
    rng, seed = new_rng()
    group = 2 if which == "softcap+alibi" else 1
    n = int(rng.integers(129, 180)) if group == 1 else int(rng.integers(65, 110))
    shape = sim_shape(rng, n, n + int(rng.integers(-20, 20)), group=group)
    variants = {}
    if "softcap" in which:
        variants["softcap"] = pick(rng, SOFTCAPS)
    if "alibi" in which:
        variants["alibi_slopes"] = slopes_of(rng, shape)
    spec = check(rng, seed, shape, pick(rng, HALF_DTYPES), bool(rng.integers(2)) and group == 2, **variants)
    assert spec.variant.softcap == ("softcap" in which) and spec.variant.alibi == ("alibi" in which), spec.key


def test_wgmma_every_light_variant_with_gqa_and_rows_that_see_nothing(wgmma_on):
    """causal + window + softcap + ALiBi, GQA 2; seqlen_q > seqlen_k, so the first rows
    see no key (0, lse -inf) and whole query tiles may visit no key tile."""
    rng, seed = new_rng()
    seqlen_k = int(rng.integers(20, 60))
    shape = sim_shape(rng, seqlen_k + int(rng.integers(40, 90)), seqlen_k, group=2)
    spec = check(rng, seed, shape, pick(rng, HALF_DTYPES), True, layout=pick(rng, ["bshd", "bhsd"]),
                 window=(int(rng.integers(0, 40)), int(rng.integers(-1, 3))), softcap=pick(rng, SOFTCAPS),
                 alibi_slopes=slopes_of(rng, shape))
    assert spec.variant.key == "-win-cap-alibi", spec.key


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", tuning.WGMMA_VARIANT_HEAD_DIMS)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_wgmma_light_variants_at_gpu_sizes(dtype, head_dim, wgmma_on):
    """Every shipped tile, a random non-empty subset of window / softcap / ALiBi, causal or
    not, GQA, both layouts."""
    rng, seed = new_rng()
    for _ in range(3):
        shape = draw_shape(rng, large=True, head_dim=head_dim)
        shape.head_dim_v = head_dim
        variants = dict(window=window_of(rng, shape.seqlen_k, max(2, shape.seqlen_k // 2)),
                        softcap=pick(rng, SOFTCAPS), alibi_slopes=slopes_of(rng, shape))
        chosen = rng.permutation(list(variants))[: int(rng.integers(1, len(variants) + 1))]
        check(rng, seed, shape, dtype, bool(rng.integers(2)), layout=pick(rng, ["bshd", "bhsd"]),
              **{name: variants[name] for name in chosen})


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", tuning.WGMMA_VARIANT_HEAD_DIMS)
def test_wgmma_sliding_window_long_sequences(head_dim, wgmma_on):
    """A few thousand keys and windows of tens to hundreds: most tiles skipped, with
    softcap and ALiBi on top; seqlen_q != seqlen_k."""
    rng, seed = new_rng()
    for dtype in HALF_DTYPES:
        shape = draw_shape(rng, head_dim=head_dim, seqlen_q=int(rng.integers(1000, 4000)),
                           seqlen_k=int(rng.integers(1000, 4000)))
        shape.head_dim_v, shape.batch, shape.heads_kv, shape.heads_q = head_dim, 1, 1, 2
        window = (int(rng.integers(0, 300)), int(rng.integers(-1, 300)))
        extra = dict(softcap=pick(rng, SOFTCAPS), alibi_slopes=slopes_of(rng, shape)) if rng.integers(2) else {}
        check(rng, seed, shape, dtype, bool(rng.integers(2)), window=window, **extra)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", sorted(tuning.WGMMA_TILES))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_wgmma_kernel_matches_oracle_every_shipped_head_dim(dtype, causal, head_dim, wgmma_on):
    rng, seed = new_rng()
    shape = draw_shape(rng, large=True, head_dim=head_dim)
    shape.head_dim_v = head_dim
    check(rng, seed, shape, dtype, causal, layout=str(rng.choice(["bshd", "bhsd"])))


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", sorted(tuning.WGMMA_TILES))
def test_wgmma_kernel_seqlen_one_and_long_keys(head_dim, wgmma_on):
    rng, seed = new_rng()
    for seqlen_q, seqlen_k in ((1, 1), (1, 3000), (3000, 1), (1000, 3001)):
        shape = draw_shape(rng, head_dim=head_dim, seqlen_q=seqlen_q, seqlen_k=seqlen_k)
        shape.head_dim_v = head_dim
        check(rng, seed, shape, HALF_DTYPES[0], bool(rng.integers(2)))


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("overlap", ["on", "off"])
def test_wgmma_softmax_overlap_on_and_off(overlap, stages, wgmma_on, monkeypatch):
    """Both loops of the kernel: the pipelined one (K a tile ahead of V, the softmax of
    tile j beside P V of tile j - 1, the last P V after the loop) that head_dim 128
    ships, and the serial one that the other head_dims and NBFLASH_WGMMA_OVERLAP=0 run;
    each with two K/V stages (a second barrier a tile) and three (none; head_dim 128's
    default); head_dim 128, one to six key tiles (three stages: four or more, so the ring
    wraps), a random subset of the light variants, causal or not."""
    if overlap == "off":
        monkeypatch.setenv("NBFLASH_WGMMA_OVERLAP", "0")
    monkeypatch.setenv("NBFLASH_WGMMA_STAGES", str(stages))
    rng, seed = new_rng()
    block_n = tuning.wgmma_tiles(128, nbflash.device.SIMULATOR, nbflash.device.compute_capability())[1]
    seqlen_k = int(rng.integers(3 * block_n + 1, 6 * block_n + 1)) if stages == 3 else int(rng.integers(1, 250))
    shape = sim_shape(rng, int(rng.integers(1, 130)), seqlen_k, group=int(rng.integers(1, 3)), head_dim=128)
    variants = dict(window=window_of(rng, shape.seqlen_k, 80), softcap=pick(rng, SOFTCAPS),
                    alibi_slopes=slopes_of(rng, shape))
    chosen = list(rng.permutation(list(variants))[: int(rng.integers(0, len(variants) + 1))])
    if overlap == "on" and {"window", "alibi_slopes"} <= set(chosen):
        chosen.remove("alibi_slopes")  # that pair keeps the serial loop at head_dim 128
    spec = check(rng, seed, shape, pick(rng, HALF_DTYPES), bool(rng.integers(2)),
                 **{name: variants[name] for name in chosen})
    assert spec.kernel == "wgmma" and spec.softmax_overlap == (overlap == "on"), spec.key
    assert spec.stages == stages, spec.key


@pytest.mark.parametrize("loop", ["overlap", "serial"])
def test_wgmma_three_stages_match_two_bit_for_bit(loop, wgmma_on, monkeypatch):
    """Three K/V stages change only which buffer a tile lands in and drop a barrier, not
    the arithmetic: head_dim 128 gives the same bits with two and three stages, over
    enough key tiles that the ring wraps twice (on a GPU with the shipped tiles, many
    CTAs and both warpgroups: a missing barrier would show as a race)."""
    if loop == "serial":
        monkeypatch.setenv("NBFLASH_WGMMA_OVERLAP", "0")
    rng, _ = new_rng()
    block_n = tuning.wgmma_tiles(128, nbflash.device.SIMULATOR, nbflash.device.compute_capability())[1]
    if nbflash.device.SIMULATOR:
        batch, seqlen_q, heads = 1, int(rng.integers(1, 65)), 1
    else:
        batch, seqlen_q, heads = 2, 1024 + int(rng.integers(0, 200)), 8
    seqlen_k = 7 * block_n + int(rng.integers(1, block_n))
    dtype = pick(rng, HALF_DTYPES)
    q = to_device(random_array(rng, (batch, seqlen_q, heads, 128), dtype))
    k, v = (to_device(random_array(rng, (batch, seqlen_k, heads, 128), dtype)) for _ in range(2))
    causal = bool(rng.integers(2))
    outs = []
    for stages in (2, 3, 3):
        monkeypatch.setenv("NBFLASH_WGMMA_STAGES", str(stages))
        plans.forget()
        spec = nbflash.forward_spec(q, k, v, causal=causal, softcap=2.0)
        assert spec.kernel == "wgmma" and spec.stages == stages and spec.softmax_overlap == (loop == "overlap")
        outs.append(to_host(nbflash.attention(q, k, v, causal=causal, softcap=2.0)).view(np.uint16))
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[1], outs[2])


def test_wgmma_stages_fit_shared_memory(monkeypatch):
    """Three K/V stages at head_dim 128 (its Q and three stages fill 225 KB of the 227),
    two where three do not fit (192, 256) and at 64; NBFLASH_WGMMA_STAGES overrides
    where the buffers fit; the count the spec carries sizes the kernel's shared memory."""
    from nbflash.kernels import forward_wgmma
    from nbflash.spec import ForwardSpec

    monkeypatch.delenv("NBFLASH_WGMMA_STAGES", raising=False)
    assert [tuning.wgmma_stages(d, *tuning.WGMMA_TILES[d][:2]) for d in (64, 128, 192, 256)] == [2, 3, 2, 2]
    monkeypatch.setenv("NBFLASH_WGMMA_STAGES", "2")
    assert tuning.wgmma_stages(128, 128, 128) == 2
    monkeypatch.setenv("NBFLASH_WGMMA_STAGES", "3")
    assert tuning.wgmma_stages(64, 128, 64) == 3 and tuning.wgmma_stages(256, 128, 80) == 2
    for d, (bm, bn, threads) in tuning.WGMMA_TILES.items():
        stages = tuning.wgmma_stages(d, bm, bn)
        spec = ForwardSpec("wgmma", "fp16", d, d, True, True, bm, bn, threads, stages)
        assert forward_wgmma.shared_bytes(spec) <= tuning.WGMMA_MAX_SHARED_BYTES, spec.key
        assert forward_wgmma.shared_bytes(spec) == 2 * d * (bm + 2 * stages * bn) + 1024, spec.key


def test_wgmma_softmax_overlap_follows_the_register_budget(monkeypatch):
    """Overlap at head_dim 128 (measured faster there, slower at 64) but not with window
    and ALiBi together (spills), nor at 192 / 256; NBFLASH_WGMMA_OVERLAP=0 turns it off."""
    from nbflash.spec import Variant

    monkeypatch.delenv("NBFLASH_WGMMA_OVERLAP", raising=False)
    assert tuning.wgmma_overlap(128) and not tuning.wgmma_overlap(64)
    assert tuning.wgmma_overlap(128, Variant(window=True, softcap=True))
    assert not tuning.wgmma_overlap(128, Variant(window=True, alibi=True))
    assert not tuning.wgmma_overlap(192) and not tuning.wgmma_overlap(256)
    monkeypatch.setenv("NBFLASH_WGMMA_OVERLAP", "0")
    assert not tuning.wgmma_overlap(128)


def _apply_ex2_fma(x, out):
    i = cuda.grid(1)
    if i < x.shape[0]:
        out[i] = ptx.ex2_fma(x[i])


def test_ex2_fma_matches_exp2_within_its_bound():
    """kernels.ptx.ex2_fma (the exp2 polynomial on the FMA pipe) on random exponents over
    [-125, 0], the integers there (its rounding splits x exactly) and x = 0: relative
    error at most 2**-18 (the fit's 2.7e-6); under -125 a non-negative number under
    2**-125, and exactly 0 at -127 and from -127.5 down, -inf included (a row's masked
    scores); a NaN stays NaN (as the MUFU's exp2)."""
    rng, seed = new_rng()
    x = np.concatenate([rng.uniform(-125, 0, 2000), -rng.integers(0, 126, 200), [0.0, -0.0, -0.5, 0.5 - 1e-7],
                        [-125.5, -126.0, -127.0], [-127.5, -200.0, -1e30, -np.inf], [np.nan]]).astype(np.float32)
    args = [to_device(x), to_device(np.full_like(x, np.nan))]
    launch.launch(cuda.jit(_apply_ex2_fma), (x.size + 127) // 128, 128, [launch.numba_view(a) for a in args], 0)
    got = to_host(args[1]).astype(np.float64)
    assert np.isnan(got[-1]), got[-1]
    got, x = got[:-1], x[:-1]
    normal = x >= -125
    rel = np.abs(got[normal] / np.exp2(x[normal].astype(np.float64)) - 1)
    assert rel.max() <= 2.0**-18, (seed, float(rel.max()), x[normal][np.argmax(rel)])
    assert np.all((got[~normal] >= 0) & (got[~normal] < 2.0**-125)), (seed, got[~normal])
    zero = (x <= -127.5) | (x == -127)
    assert np.all(got[zero] == 0), got[zero]


@pytest.mark.parametrize("count", [1, 4])
def test_wgmma_exp2_on_the_fma_pipe(count, wgmma_on, monkeypatch):
    """NBFLASH_EXP2_FMA=count: count of every four 8-key blocks of a softcap kernel take
    exp2 by ptx.ex2_fma (4: all of them, 1: a mix within each row), either loop (head_dim
    64 serial, 128 overlapped), with or without ALiBi, against the oracle."""
    monkeypatch.setenv("NBFLASH_EXP2_FMA", str(count))
    rng, seed = new_rng()
    head_dim = pick(rng, (64, 128))
    shape = sim_shape(rng, int(rng.integers(1, 130)), int(rng.integers(1, 250)), head_dim=head_dim)
    variants = dict(softcap=pick(rng, SOFTCAPS))
    if rng.integers(2):
        variants["alibi_slopes"] = slopes_of(rng, shape)
    spec = check(rng, seed, shape, pick(rng, HALF_DTYPES), bool(rng.integers(2)), **variants)
    assert spec.kernel == "wgmma" and spec.exp2_fma == count, spec.key


def test_wgmma_exp2_fma_goes_to_softcap(monkeypatch):
    """Softcap (a tanh beside every exp2 on the MUFU) takes tuning.EXP2_FMA_SOFTCAP of
    every four blocks' exp2 onto the FMA pipe where it was measured faster (head_dim 128),
    none at 64; plain and the other variants none, whatever NBFLASH_EXP2_FMA says."""
    from nbflash.spec import Variant

    monkeypatch.delenv("NBFLASH_EXP2_FMA", raising=False)
    assert tuning.wgmma_exp2_fma(128, Variant(softcap=True)) == tuning.EXP2_FMA_SOFTCAP[128] > 0
    assert tuning.wgmma_exp2_fma(128, Variant(softcap=True, alibi=True, window=True)) == tuning.EXP2_FMA_SOFTCAP[128]
    assert tuning.wgmma_exp2_fma(64, Variant(softcap=True)) == 0
    assert tuning.wgmma_exp2_fma(128) == 0 and tuning.wgmma_exp2_fma(128, Variant(alibi=True, window=True)) == 0
    monkeypatch.setenv("NBFLASH_EXP2_FMA", "3")  # A/B runs: softcap's count only
    assert tuning.wgmma_exp2_fma(64, Variant(softcap=True)) == 3
    assert tuning.wgmma_exp2_fma(128, Variant(alibi=True)) == 0


def test_wgmma_two_warpgroups_with_every_light_variant(wgmma_on, monkeypatch):
    """The shipped CTA shape, two warpgroups of 64 rows (block_m 128, 256 threads): each
    warpgroup's rows in the window band, ALiBi's row part and the CTA-wide tile bounds."""
    monkeypatch.setattr(tuning, "WGMMA_TILES_SIMULATOR", (128, 64, 256))
    rng, seed = new_rng()
    shape = sim_shape(rng, int(rng.integers(100, 140)), int(rng.integers(100, 200)))
    spec = check(rng, seed, shape, pick(rng, HALF_DTYPES), bool(rng.integers(2)),
                 window=window_of(rng, shape.seqlen_k, 80), softcap=pick(rng, SOFTCAPS),
                 alibi_slopes=slopes_of(rng, shape))
    assert spec.block_m == 128 and spec.threads == 256, spec.key


def test_wgmma_varlen_batches_with_empty_and_nan_filler_sequences(wgmma_on):
    """Packed sequences on the wgmma kernel (head_dim 64): lengths across two 64-row and
    64-key tiles, sequences without queries or keys, GQA 2, and key-only filler sequences
    full of NaN between the real ones (a read past a sequence's end turns rows NaN)."""
    rng, seed = new_rng()
    dtype = pick(rng, HALF_DTYPES)
    lengths_q = [int(rng.integers(1, 100)), 0, 1, int(rng.integers(0, 70))]
    lengths_k = [int(rng.integers(1, 100)), int(rng.integers(1, 9)), 0, int(rng.integers(60, 140))]
    filler = [0] * 4
    shape = VarlenShape([x for pair in zip(filler, lengths_q) for x in pair],
                        [x for pair in zip([5, 3, 7, 2], lengths_k) for x in pair], heads_q=2, heads_kv=1,
                        head_dim=64, head_dim_v=64)
    q, k, v = (random_array(rng, s, dtype) for s in shape.qkv_shapes())
    cu_k = shape.cu_seqlens()[1]
    for b in range(0, 8, 2):
        k[cu_k[b]:cu_k[b + 1]] = np.nan
        v[cu_k[b]:cu_k[b + 1]] = np.nan
    check_varlen_forward(shape, dtype, causal=bool(rng.integers(2)), rng=rng, seed=seed, kernel="wgmma",
                         values=(q, k, v))


def test_wgmma_varlen_with_light_variants_matches_each_sequence(wgmma_on):
    """window, softcap and per-sequence ALiBi slopes through the varlen wgmma kernel: each
    sequence's rows equal the oracle's attention over that sequence alone."""
    rng, seed = new_rng()
    dtype = pick(rng, HALF_DTYPES)
    shape = VarlenShape([int(rng.integers(1, 80)), int(rng.integers(1, 80))],
                        [int(rng.integers(1, 100)), int(rng.integers(1, 100))], 1, 1, 64, 64)
    q, k, v = (random_array(rng, s, dtype) for s in shape.qkv_shapes())
    cu_q, cu_k = shape.cu_seqlens()
    causal = bool(rng.integers(2))
    window = window_of(rng, max(shape.seqlens_k), 40)
    softcap = pick(rng, SOFTCAPS)
    slopes = rng.uniform(0.0, 0.5, size=(2, 1)).astype(np.float32)
    kw = dict(causal=causal, window=window, softcap=softcap)
    assert nbflash.forward_spec_varlen(*(to_device(x) for x in (q, k, v)), **kw, alibi_slopes=to_device(slopes)
                                       ).kernel == "wgmma"
    out = nbflash.attention_varlen(*(to_device(x) for x in (q, k, v)), cu_q, cu_k, alibi_slopes=to_device(slopes),
                                   **kw)
    out = to_host(out)
    for b in range(2):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        ref = nbflash.reference.attention(q[qs][None], k[ks][None], v[ks][None], alibi_slopes=slopes[b], **kw)[0]
        assert_close(out[qs], ref, dtype, seed=seed)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [d for d in sorted(tuning.WGMMA_TILES) if tuning.wgmma_varlen(d)])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_wgmma_varlen_large_batches(dtype, head_dim, wgmma_on):
    rng, seed = new_rng()
    shape = draw_varlen(rng, large=True, head_dim=head_dim)
    shape.head_dim_v = head_dim
    check_varlen_forward(shape, dtype, causal=bool(rng.integers(2)), rng=rng, seed=seed, kernel="wgmma",
                         device_seqlens=bool(rng.integers(2)))


def test_wgmma_varlen_dispatch_follows_the_register_budget():
    """Varlen on wgmma where ptxas leaves it spill-free (tuning.wgmma_varlen): plain at
    head_dim 64 and 128, with variants only at 64; 192, 256 and bias keep mma."""
    from nbflash.spec import Variant

    everything = Variant(window=True, softcap=True, alibi=True)
    assert tuning.wgmma_varlen(64) and tuning.wgmma_varlen(128)
    assert tuning.wgmma_varlen(64, everything) and not tuning.wgmma_varlen(128, everything)
    assert not tuning.wgmma_varlen(128, Variant(softcap=True))
    assert not tuning.wgmma_varlen(192) and not tuning.wgmma_varlen(256)
    assert not tuning.wgmma_varlen(64, Variant(bias=True))


def test_wgmma_varlen_keeps_the_serial_loop(wgmma_on):
    """Packed batches run without the softmax overlap (ptxas serializes that kernel's
    wgmma with it), also at head_dim 128 where dense attention has it on."""
    from nbflash import api_varlen
    from nbflash.api import _Problem

    problem = _Problem(batch=1, seqlen_q=200, seqlen_k=200, heads_q=2, heads_kv=2, head_dim=128, head_dim_v=128,
                       dtype=np.dtype(np.float16), squeeze=False, layout="bshd", on_device=True)
    spec = api_varlen._varlen_spec(problem, True, False, None)
    assert spec.kernel == "wgmma" and spec.varlen and not spec.softmax_overlap, spec.key


# --- a staged bias and a staged mask (tuning.wgmma_fwd_scores) -------------------------


@pytest.fixture
def scores_on(wgmma_on, monkeypatch):
    """The wgmma forward's staged bias / mask switched on (NBFLASH_WGMMA_FWD_SCORES=1)."""
    monkeypatch.setenv("NBFLASH_WGMMA_FWD_SCORES", "1")
    plans.forget()
    yield
    plans.forget()


SCORE_CASES = {
    "bias-fp16": dict(bias=np.float16),
    "bias-bf16": dict(bias=HALF_DTYPES[1]),
    "mask": dict(mask=True),
    "bias+mask": dict(bias=np.float16, mask=True),
    "bias+window+alibi+softcap": dict(bias=HALF_DTYPES[1], window=True, alibi=True, softcap=True),
    "mask+window+softcap": dict(mask=True, window=True, softcap=True),
}


def scores_run(rng, seed, case, *, seqlen_q, seqlen_k, group=1, head_dim=64, batch=1, heads_kv=1, causal=None):
    """One problem with the staged bias / mask of SCORE_CASES[case] (random broadcast
    axes, rows padded to 64 bytes so cp.async can copy them whatever seqlen_k; a mask
    row that sees nothing), beside the light variants it names, on the wgmma kernel:
    out (into a poisoned buffer) and lse against the float64 oracle. Returns the spec."""
    from test_bias_tile import laid_out, random_values

    what = SCORE_CASES[case]
    dtype = pick(rng, HALF_DTYPES)
    q = random_array(rng, (batch, seqlen_q, heads_kv * group, head_dim), dtype)
    k, v = (random_array(rng, (batch, seqlen_k, heads_kv, head_dim), dtype) for _ in range(2))
    full = (batch, heads_kv * group, seqlen_q, seqlen_k)
    host, dev = {}, {}
    if "bias" in what:
        _, values = random_values(rng, what["bias"], full)
        host["bias"], dev["bias"] = laid_out(values, 0)
    if "mask" in what:
        _, values = random_values(rng, "mask", full)
        host["mask"], dev["mask"] = laid_out(values, 0)
    if what.get("window"):
        host["window"] = dev["window"] = window_of(rng, seqlen_k, 80)
    if what.get("softcap"):
        host["softcap"] = dev["softcap"] = pick(rng, SOFTCAPS)
    if what.get("alibi"):
        slopes = rng.uniform(0.0, 0.5, (heads_kv * group,)).astype(np.float32)
        host["alibi_slopes"], dev["alibi_slopes"] = slopes, to_device(slopes)
    causal = bool(rng.integers(2)) if causal is None else causal
    qd, kd, vd = (to_device(a) for a in (q, k, v))
    spec = nbflash.forward_spec(qd, kd, vd, causal=causal, return_lse=True, **dev)
    assert spec.kernel == "wgmma", spec.key
    assert spec.variant.bias_staged == ("bias" in what) and spec.variant.mask_staged == ("mask" in what), spec.key
    ref, ref_lse = nbflash.reference.attention(q, k, v, causal=causal, return_lse=True, **host)
    out = poisoned(ref.shape, dtype)
    got, lse = nbflash.attention(qd, kd, vd, causal=causal, return_lse=True, out=out, **dev)
    assert_close(got, ref, dtype, seed=seed)
    assert_lse_close(lse, ref_lse, seed=seed)
    return spec


@pytest.mark.parametrize("case", sorted(SCORE_CASES))
def test_wgmma_staged_bias_and_mask(case, scores_on):
    """Two to three 64-row and 64-key tiles (the stages alternate and are refilled; the
    last ones end inside a 16-byte chunk); GQA 2 for half the draws."""
    rng, seed = new_rng()
    group = int(rng.integers(1, 3))
    scores_run(rng, seed, case, seqlen_q=int(rng.integers(65, 150)), seqlen_k=int(rng.integers(65, 190)),
               group=group)


def test_wgmma_staged_bias_and_mask_two_warpgroups_overlap_and_three_stages(scores_on, monkeypatch):
    """The shipped CTA shape (two warpgroups: the second's rows start 64 rows into the
    stage) with the softmax overlap and three stages (tile j's bias / mask rides in K_j's
    copy group, which the overlap issues a tile ahead of V), several key tiles."""
    monkeypatch.setattr(tuning, "WGMMA_TILES_SIMULATOR", (128, 64, 256))
    monkeypatch.setattr(tuning, "WGMMA_OVERLAP_HEAD_DIMS", (64,))
    monkeypatch.setenv("NBFLASH_WGMMA_STAGES", "3")
    rng, seed = new_rng()
    spec = scores_run(rng, seed, pick(rng, sorted(SCORE_CASES)), seqlen_q=int(rng.integers(100, 200)),
                      seqlen_k=int(rng.integers(200, 300)))
    assert spec.block_m == 128 and spec.softmax_overlap and spec.stages == 3, spec.key


def test_wgmma_staged_bias_and_mask_dispatch(monkeypatch):
    """Which forward runs which bias / mask: the wgmma kernel takes staged 16-bit bias and
    staged masks while the switch is on (by default at head_dim 128 only); a float32
    bias, a layout cp.async cannot copy, dropout and the switch off keep the mma kernel."""
    from test_bias_tile import laid_out

    monkeypatch.setenv("NBFLASH_WGMMA", "1")
    rng, _ = new_rng()
    q, k, v = (to_device(random_array(rng, s, HALF_DTYPES[0])) for s in ((1, 20, 2, 64), (1, 30, 2, 64), (1, 30, 2, 64)))
    bias16 = laid_out(rng.standard_normal((1, 2, 20, 30)).astype(np.float16), 0)[1]
    bias32 = laid_out(rng.standard_normal((1, 2, 20, 30)).astype(np.float32), 0)[1]
    unaligned = laid_out(rng.standard_normal((1, 2, 20, 30)).astype(np.float16), 1)[1]
    mask = laid_out(rng.random((1, 2, 20, 30)) < 0.5, 0)[1]
    cases = [(dict(bias=bias16), "wgmma"), (dict(mask=mask), "wgmma"), (dict(bias=bias16, mask=mask), "wgmma"),
             (dict(bias=bias16, softcap=5.0, window=(4, 0)), "wgmma"), (dict(bias=bias32), "mma"),
             (dict(bias=unaligned), "mma"), (dict(mask=mask, dropout_p=0.1, seed=3), "mma")]
    for switch in ("1", "0", None):  # unset: head_dim 128 only (tuning.WGMMA_FWD_SCORES_HEAD_DIMS)
        if switch is None:
            monkeypatch.delenv("NBFLASH_WGMMA_FWD_SCORES")
        else:
            monkeypatch.setenv("NBFLASH_WGMMA_FWD_SCORES", switch)
        plans.forget()
        for kwargs, kernel in cases:
            spec = nbflash.forward_spec(q, k, v, **kwargs)
            assert spec.kernel == (kernel if switch == "1" else "mma"), (switch, spec.key)
    assert tuning.wgmma_variant(nbflash.spec.Variant(bias="fp16", bias_staged=True), 128)
    assert not tuning.wgmma_variant(nbflash.spec.Variant(mask=True, mask_staged=True), 64)
    plans.forget()


def test_wgmma_bias_and_mask_stages_fit_shared_memory(monkeypatch):
    """At the shipped head_dim 128 tiles a bias stage beside each of three K/V stages
    does not fit: two do (the chosen spec fits the 227 KB); a bias and a mask together do
    not fit beside even two, and run the mma kernel."""
    from nbflash import api, spec as spec_module
    from nbflash.kernels import forward_wgmma

    monkeypatch.setenv("NBFLASH_WGMMA_FWD_SCORES", "1")
    monkeypatch.setattr(nbflash.device, "SIMULATOR", False)
    monkeypatch.setattr(nbflash.device, "compute_capability", lambda: (9, 0))
    monkeypatch.setattr(nbflash.device, "max_shared_bytes", lambda: tuning.WGMMA_MAX_SHARED_BYTES)
    problem = api._Problem(batch=1, seqlen_q=2048, seqlen_k=2048, heads_q=1, heads_kv=1, head_dim=128,
                           head_dim_v=128, dtype=np.dtype(np.float16), squeeze=False, layout="bshd", on_device=True)
    for variant, kernel, stages in ((spec_module.Variant(bias="fp16", bias_staged=True), "wgmma", 2),
                                    (spec_module.Variant(mask=True, mask_staged=True), "wgmma", 2),
                                    (spec_module.Variant(bias="bf16", bias_staged=True, mask=True, mask_staged=True),
                                     "mma", None)):
        chosen = api.choose_forward_spec(problem, False, True, variant=variant)
        assert chosen.kernel == kernel, chosen.key
        if kernel == "wgmma":
            assert chosen.stages == stages and forward_wgmma.shared_bytes(chosen) <= tuning.WGMMA_MAX_SHARED_BYTES


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", tuning.WGMMA_VARIANT_HEAD_DIMS)
@pytest.mark.parametrize("case", ["bias-fp16", "mask", "bias+window+alibi+softcap", "mask+window+softcap"])
def test_wgmma_staged_bias_and_mask_at_gpu_sizes(case, head_dim, scores_on):
    """The shipped tiles (two warpgroups, many key tiles, 128 x 128 stages at head_dim
    128) with GQA and a batch, causal or not."""
    rng, seed = new_rng()
    scores_run(rng, seed, case, seqlen_q=int(rng.integers(300, 900)), seqlen_k=int(rng.integers(300, 1200)),
               group=2, head_dim=head_dim, batch=2, heads_kv=2)
