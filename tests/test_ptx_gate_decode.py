"""The no-GPU gate on the split-KV decoding kernel: every specialization in
tuning.DECODE_GATE compiles for sm_90a with 16-byte vector loads and warp shuffles
in its PTX, no spills, no stack frame, and registers its CTA can launch with. The
scalar-load decode, combine and append kernels must compile (the worker fails if not)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from nbflash import tuning


@pytest.fixture(scope="module")
def reports():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    worker = os.path.join(os.path.dirname(__file__), "ptx_gate_decode_worker.py")
    done = subprocess.run([sys.executable, worker, "sm_90a"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    gated = [r for r in rows if r["gated"]]
    assert len(gated) == len(tuning.DECODE_GATE), done.stdout
    assert len(rows) > len(gated), "the scalar decode, combine and append kernels compile too"
    return gated


def test_decode_kernels_use_vector_loads_and_shuffles(reports):
    for r in reports:
        assert r["ld_v4"] > 0, r
        assert r["shfl"] > 0, r


def test_decode_kernels_do_not_spill(reports):
    for r in reports:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert r["stack"] == 0, r


def test_decode_kernels_fit_their_cta(reports):
    for r in reports:
        assert r["registers"] * r["threads"] <= 65536, r
        assert r["shared_bytes"] <= 48 * 1024, r  # static shared memory
