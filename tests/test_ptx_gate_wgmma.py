"""The no-GPU gate on the Hopper wgmma kernels: the probe's kernels (and the wgmma
forward specializations the tuning ships, plain, with window / softcap / ALiBi and with a
staged bias / mask, and
both kernels of every wgmma backward plan it ships)
compile for sm_90a with wgmma.mma_async in their PTX, ptxas does not serialize the wgmma
chain, no spills, no stack frame, and registers and shared memory their CTA can launch
with."""

from __future__ import annotations

import pytest

import gate_jobs
from nbflash import tuning
from nbflash.spec import Variant

EVERYTHING = Variant(window=True, softcap=True, alibi=True)
SM90_REGISTERS = 65536
SM90_SHARED_PER_CTA = 227 * 1024

gate_jobs.register_module(__file__, "wgmma", [["ptx_gate_wgmma_worker.py", part]
                                              for part in ("backward", "forward", "forward-scores", "probe")])


@pytest.fixture(scope="module")
def reports():
    rows = gate_jobs.rows("wgmma")
    assert len([r for r in rows if r["kind"] == "probe"]) == 6, rows
    # every (head_dim, causal) the tuning ships, fp16 plain and with each combination of
    # window / softcap / ALiBi (the variants tuning.wgmma_variant sends to this kernel), bf16
    # plain and with all three (the worker's BF16_VARIANTS says why); each once
    forward = [r for r in rows if r["kind"] == "forward"]
    # (and, where the softmax overlap runs, the window kernels without lse: the worker says why)
    # (and the staged bias / mask: bias and mask alone full and causal, causal bias + mask
    # (head_dim 64 only: at 128 their stages do not fit), all three light variants + bias
    # and + mask, causal)
    scores = {64: 7, 128: 6}
    assert len(forward) == sum(2 * (8 + 2 if d in tuning.WGMMA_VARIANT_HEAD_DIMS else 2)
                               + 4 * tuning.wgmma_overlap(d) + scores.get(d, 0) * (d in tuning.WGMMA_VARIANT_HEAD_DIMS)
                               + sum(tuning.wgmma_varlen(d, v) for v in (None, EVERYTHING)) for d in tuning.WGMMA_TILES), rows
    assert {r["key"] for r in forward if "-varlen" in r["key"]} and all(
        "-causal" in r["key"] for r in forward if "-varlen" in r["key"]), rows
    assert {r["variant"] for r in forward if "-fp16-" in r["key"]} == {
        "", "-win", "-cap", "-alibi", "-win-cap", "-win-alibi", "-cap-alibi", "-win-cap-alibi",
        "-bias_fp16_smem", "-mask_smem", "-bias_fp16_smem-mask_smem", "-win-cap-alibi-bias_fp16_smem",
        "-win-cap-alibi-mask_smem"}, rows
    assert {r["head_dim"] for r in forward if r["variant"] == "-bias_fp16_smem-mask_smem"} == {64}
    assert {r["variant"] for r in forward if "-bf16-" in r["key"]} == {"", "-win-cap-alibi"}, rows
    assert len({r["key"] for r in forward}) == len(forward), rows
    # every kernel (dkdv, dq, and the fused dkdvq where the tuning ships it) of every
    # wgmma backward plan: per head_dim fp16 full and causal, bf16 causal (the worker's
    # backward_specs says why), and the fused one with window and ALiBi where it takes them
    backward = [r for r in rows if r["kind"] == "backward"]
    fused = {d for d in tuning.WGMMA_BWD_TILES if tuning.WGMMA_BWD_DQ_ATOMICS.get(d, False)}
    # ... and with the staged bias / mask: bias and mask alone full and causal, causal
    # bias + mask (head_dim 64 only: at 128 their stages do not fit), window + ALiBi + bias
    # and window + softcap + mask
    staged = {64: 7, 128: 6}
    assert len(backward) == sum(3 * (2 + (d in fused)) + (10 + staged[d]) * (d in fused and d in tuning.WGMMA_VARIANT_HEAD_DIMS)
                                for d in tuning.WGMMA_BWD_TILES), rows
    assert {r["head_dim"] for r in backward if "-win-alibi" in r["key"]} == fused & set(tuning.WGMMA_VARIANT_HEAD_DIMS)
    assert {r["variant"] for r in backward if r["variant"]} == {
        "-win", "-alibi", "-cap", "-win-alibi", "-win-cap", "-bias_fp16_smem", "-mask_smem",
        "-bias_fp16_smem-mask_smem", "-win-alibi-bias_fp16_smem", "-win-cap-mask_smem"}
    assert {r["head_dim"] for r in backward if r["variant"] == "-bias_fp16_smem-mask_smem"} == {64}
    assert {r["head_dim"] for r in backward if r["part"] == "dkdvq"} == {
        d for d, fused in tuning.WGMMA_BWD_DQ_ATOMICS.items() if fused}, rows
    assert len({r["key"] for r in backward}) == len(backward), rows
    return rows


def test_every_kernel_uses_wgmma_and_is_not_serialized(reports):
    for r in reports:
        assert r["arch"] == "sm_90a", r
        assert r["wgmma"] > 0, r
        assert not r["serialized"], r


# The fused backward kernel at head_dim 128 runs at the 255-register cap; with a window,
# ALiBi or softcap compiled in, ptxas spills up to 40 bytes in some of them (session 9,
# bytes stored / loaded: causal ALiBi 36 / 40, causal softcap 32 / 32, window 12 / 12,
# causal window + ALiBi 8 / 12; the others, head_dim 64 and plain kernels none). The
# allowance is for those kernels alone, and is the largest measured figure rounded up.
VARIANT_D128_SPILL_BYTES = 48
# With a staged bias or mask (bytes stored / loaded). Backward (session 15): causal bias
# 52 / 52, causal mask 44 / 44, window + ALiBi + bias 36 / 36, window + softcap + mask 16 / 16
# (20 / 20 with session 16's exp2 on the FMA pipe); not causal, bias or mask alone, none
# (the bias / mask benchmark rows). Forward (session 16): window + softcap + ALiBi + bias
# 32 / 32, causal 56 / 56; the others none. Head_dim 64 none.
SCORES_D128_SPILL_BYTES = 56
# The forward with the softmax overlap (tuning.wgmma_overlap, head_dim 128) and a window,
# compiled without the lse store: 255 registers, 64 bytes stored / 76 loaded, 56 of stack
# (session 10; with lse none). On the H100 the spill reads were ~26 requests a warp over
# a whole CTA (Nsight Compute, window (1024, 0) at 16k), and the overlap still ran the
# window 20% faster than the serial loop that does not spill.
WINDOW_OVERLAP_SPILL_BYTES = 80


def test_no_spills_and_no_local_memory(reports):
    """None anywhere but the allowance above: the plain fused backward kernel at
    head_dim 128 (255 registers) included (its 48-96 bytes of spills went with the
    32-bit shared addressing, session 8)."""
    for r in reports:
        allowed = VARIANT_D128_SPILL_BYTES if r.get("variant") and r["head_dim"] == 128 else 0
        if allowed and ("-bias" in r["variant"] or "-mask" in r["variant"]):
            allowed = SCORES_D128_SPILL_BYTES
        if (r["kind"] == "forward" and "-win" in r["variant"] and "-lse" not in r["key"]
                and "ov" in r["key"].rsplit("-", 1)[-1]):
            allowed = WINDOW_OVERLAP_SPILL_BYTES
        assert r["spill_stores"] <= allowed and r["spill_loads"] <= allowed, r
        assert r["stack"] <= allowed, r


def test_forward_issues_every_wgmma_of_a_tile(reports):
    """head_dim / 16 wgmma for S = Q K^T and block_n / 16 for O += P V per key tile: the
    PTX holds at least one tile's worth (the compiler may unroll more, never fewer)."""
    for r in reports:
        if r["kind"] == "forward":
            assert r["wgmma"] >= r["head_dim"] // 16 + r["block_n"] // 16, r
            assert r["mma_sync"] == 0, r


def test_backward_issues_every_wgmma_of_a_tile(reports):
    """dK/dV: head_dim / 16 each for S^T and dP^T, block_m / 16 each for dV and dK; dQ:
    head_dim / 16 each for S and dP, block_n / 16 for dQ (at least; unrolling adds)."""
    for r in reports:
        if r["kind"] == "backward":
            steps = r["block_m"] if r["part"] == "dkdv" else r["block_n"] // 2
            assert r["wgmma"] >= 2 * (r["head_dim"] // 16) + 2 * steps // 16, r
            assert r["mma_sync"] == 0, r


def test_registers_and_shared_memory_fit(reports):
    for r in reports:
        assert r["registers"] <= 255, r
        assert r["registers"] * r["threads"] <= SM90_REGISTERS, r
        assert r["shared_bytes"] <= SM90_SHARED_PER_CTA, r
