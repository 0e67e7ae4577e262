"""The no-GPU gate on the tensor-core kernels: every shipped specialization, dense and
varlen, compiles
for sm_80 and sm_90a with tensor-core instructions in its PTX, no spills, no stack
frame (fragments stay in registers) and a register count its CTA can launch with."""

from __future__ import annotations

import pytest

import gate_jobs
from nbflash import tuning

SHARED_PER_SM = {"sm_80": 164 * 1024, "sm_90a": 227 * 1024}


DTYPES = ("fp16", "bf16")


gate_jobs.register_module(__file__, "forward", [["ptx_gate_worker.py", dtype] for dtype in DTYPES])


@pytest.fixture(scope="module")
def reports():
    rows = gate_jobs.rows("forward")
    # every (arch, head_dim, causal, varlen) the tuning ships in fp16, each once, and in
    # bf16 the causal varlen one of each head_dim (the worker's BF16_FLAGS says why)
    assert len(rows) == 2 * len(tuning.MMA_TILES) * (4 + 1), rows
    assert {r["key"].split("-")[1] for r in rows} == set(DTYPES), rows
    assert len({(r["arch"], r["key"]) for r in rows}) == len(rows), rows
    return rows


def test_every_specialization_uses_tensor_cores(reports):
    for r in reports:
        assert r["mma"] > 0, r
        assert r["ldmatrix"] > 0, r
        assert r["cp_async"] > 0, r


def test_no_spills_and_no_local_memory(reports):
    for r in reports:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert r["stack"] == 0, r


def test_registers_and_shared_memory_fit_the_tile_config(reports):
    for r in reports:
        assert r["registers"] <= 255, r
        assert r["registers"] * r["threads"] <= 65536, r
        assert r["shared_bytes"] <= SHARED_PER_SM[r["arch"]], r
