"""The no-GPU gate on the portable backward kernels: a few specializations that span
the dtypes and the tile table (the largest accumulator counts per thread) compile for
sm_90a with no spills and no stack frame (the accumulators stay in registers), a
register count their CTA can launch with, and static shared memory under 48 KB.
tests/ptx_gate_backward_simt_worker.py with no case list sweeps more."""

from __future__ import annotations

import gate_jobs

CASES = ["bf16:64", "fp32:256", "fp64:256"]


gate_jobs.register_module(__file__, "backward_simt", [["ptx_gate_backward_simt_worker.py", "sm_90a", *CASES]])


def test_backward_kernels_compile_without_spills_for_sm_90a():
    rows = gate_jobs.rows("backward_simt")
    assert len(rows) == 3 * len(CASES), rows
    for r in rows:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert r["stack"] == 0, r
        assert r["registers"] <= 255 and r["registers"] * r["threads"] <= 65536, r
        assert r["shared_bytes"] <= 48 * 1024, r
