"""The no-GPU gate on the split-KV decoding kernels: every specialization in
tuning.DECODE_GATE (portable kernel) and tuning.DECODE_MMA_GATE (tensor-core kernel)
compiles for sm_90a without spills or a stack frame, with registers and shared memory
its CTA can launch with; the portable ones use 16-byte vector loads and shuffles, the
tensor-core ones cp.async, ldmatrix and mma, and at head dims up to 128 two of their
CTAs fit one SM (the residency tuning.DECODE_MMA_BUSY_CTAS_PER_SM assumes). The
scalar-load decode, combine and append kernels must compile (the worker fails if not)."""

from __future__ import annotations

import pytest

import gate_jobs
from nbflash import tuning

SM90_REGISTERS = 65536
SM90_SHARED_PER_SM = 228 * 1024  # of which 1 KB per CTA is reserved
SM90_SHARED_PER_CTA = 227 * 1024


gate_jobs.register_module(__file__, "decode", [["ptx_gate_decode_worker.py", "sm_90a"]])


@pytest.fixture(scope="module")
def reports():
    rows = gate_jobs.rows("decode")
    gated = [r for r in rows if r["gated"]]
    assert len([r for r in gated if r["kind"] == "simt"]) == len(tuning.DECODE_GATE), rows
    assert len([r for r in gated if r["kind"] == "mma"]) == len(tuning.DECODE_MMA_GATE), rows
    assert len(rows) > len(gated), "the scalar decode, combine and append kernels compile too"
    return gated


def test_portable_decode_kernels_use_vector_loads_and_shuffles(reports):
    for r in reports:
        if r["kind"] == "simt":
            assert r["ld_v4"] > 0, r
            assert r["shfl"] > 0, r


def test_tensor_core_decode_kernels_stage_through_shared_memory(reports):
    for r in reports:
        if r["kind"] == "mma":
            assert r["cp_async"] > 0 and r["ldmatrix"] > 0 and r["mma"] > 0, r
            assert r["ld_v4"] == 0, r  # every cache byte goes through cp.async


def test_decode_kernels_do_not_spill(reports):
    for r in reports:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert r["stack"] == 0, r


def test_decode_kernels_fit_their_cta(reports):
    for r in reports:
        assert r["registers"] * r["threads"] <= SM90_REGISTERS, r
        assert r["shared_bytes"] <= 48 * 1024, r  # static shared memory
        assert r["dynamic_shared_bytes"] <= SM90_SHARED_PER_CTA, r


def test_two_tensor_core_ctas_fit_an_sm_up_to_head_dim_128(reports):
    for r in reports:
        if r["kind"] == "mma" and max(r["head_dim"], r["head_dim_v"]) <= 128:
            per_thread = -(-r["registers"] // 8) * 8  # registers are allocated 8 at a time
            ctas = tuning.DECODE_MMA_BUSY_CTAS_PER_SM
            assert ctas * per_thread * r["threads"] <= SM90_REGISTERS, r
            assert ctas * (r["dynamic_shared_bytes"] + 1024) <= SM90_SHARED_PER_SM, r
