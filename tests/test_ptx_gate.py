"""The no-GPU gate on the tensor-core kernels: every shipped specialization, dense and
varlen, compiles
for sm_80 and sm_90a with tensor-core instructions in its PTX, no spills, no stack
frame (fragments stay in registers) and a register count its CTA can launch with."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from nbflash import tuning

SHARED_PER_SM = {"sm_80": 164 * 1024, "sm_90a": 227 * 1024}


@pytest.fixture(scope="module", params=["sm_80", "sm_90a"])
def reports(request):
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    worker = os.path.join(os.path.dirname(__file__), "ptx_gate_worker.py")
    done = subprocess.run([sys.executable, worker, request.param], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 8 * len(tuning.MMA_TILES), done.stdout  # dtypes x causal x varlen
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
