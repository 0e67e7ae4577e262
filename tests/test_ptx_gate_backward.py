"""The no-GPU gate on the tensor-core backward: every shipped specialization (each
head_dim, dtype, causal flag and kernel of the plan, dense and varlen) compiles for
sm_80 and sm_90a with tensor-core instructions in its PTX, no spills, no stack frame
(fragments stay in registers) and a register count its CTA can launch with."""

from __future__ import annotations

import pytest

import gate_jobs
from nbflash import tuning

SHARED_PER_SM = {"sm_80": 164 * 1024, "sm_90a": 227 * 1024}
DTYPES = ("fp16", "bf16")


# bf16 dense only: ptxas gives bf16 the registers of fp16 (tests/ptx_gate_worker.py's BF16_FLAGS)
WORKERS = [("fp16", "dense"), ("fp16", "varlen"), ("bf16", "dense")]
gate_jobs.register_module(__file__, "backward", [["ptx_gate_backward_worker.py", dtype, kind]
                                                  for dtype, kind in WORKERS])


@pytest.fixture(scope="module")
def reports():
    rows = [r for r in gate_jobs.rows("backward") if r.get("kind") != "delta"]
    parts = sum(3 if tuning.mma_bwd_dq_atomics(d, False) else 2 for d in tuning.MMA_BWD_TILES)
    assert len(rows) == parts * len(WORKERS) * 2 * 2, rows  # x causal x arch
    assert {r["key"].split("-")[1] for r in rows} == set(DTYPES), rows
    return rows


def test_every_specialization_uses_tensor_cores(reports):
    for r in reports:
        assert r["mma"] > 0 and r["ldmatrix"] > 0 and r["cp_async"] > 0, r
        assert (r["atomics"] > 0) == (r["part"] == "dkdvq"), r  # only the atomic-dQ kernel


def test_no_spills_and_no_local_memory(reports):
    for r in reports:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert r["stack"] == 0, r


def test_registers_and_shared_memory_fit_the_tile_config(reports):
    for r in reports:
        assert r["registers"] <= 255, r
        assert r["registers"] * r["threads"] <= 65536, r
        assert r["shared_bytes"] <= SHARED_PER_SM[r["arch"]], r


def test_every_dense_kernel_has_a_varlen_twin(reports):
    """attention_varlen_backward runs the same plans as the dense backward with
    spec.varlen: the same kernels, tiles and threads (fp16; bf16 varlen is not gated)."""
    dense = {(r["key"], r["arch"]): r for r in reports if not r["varlen"] and "-fp16-" in r["key"]}
    varlen = {(r["key"].replace("-varlen", ""), r["arch"]): r for r in reports if r["varlen"]}
    assert dense.keys() == varlen.keys()
    for key, r in varlen.items():
        assert (r["part"], r["threads"], r["shared_bytes"]) == (dense[key]["part"], dense[key]["threads"],
                                                                dense[key]["shared_bytes"]), r


def test_delta_kernel_compiles_without_spills_at_every_head_dim():
    """kernels/backward_delta.py, which every tensor-core backward runs first: each head_dim
    and dtype, both archs, 16-byte read-only loads, no spills, no stack frame."""
    rows = [r for r in gate_jobs.rows("backward") if r.get("kind") == "delta"]
    head_dims = set(tuning.MMA_BWD_TILES) | set(tuning.WGMMA_BWD_TILES)
    assert len(rows) == len(head_dims) * len(DTYPES) * 2, rows
    for r in rows:
        assert r["ld_nc_v4"] == 2, r  # one 16-byte load of dO and one of O per lane
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["stack"] == 0, r
        assert r["registers"] * r["threads"] <= 65536, r
