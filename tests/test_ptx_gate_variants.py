"""The no-GPU gate on the tensor-core forward kernel with attention variants (issue 7):
representative specializations (each tile family with its heaviest variants, on the
tiles api.choose_forward_spec picks for an H100) compile for sm_90a without spills
and without a stack frame. The plain specializations are gated by test_ptx_gate.py."""

from __future__ import annotations

import pytest

import gate_jobs

gate_jobs.register_module(__file__, "forward_variants", [["ptx_gate_variants_worker.py", f"{part}/2"] for part in (0, 1)])


@pytest.fixture(scope="module")
def reports():
    rows = gate_jobs.rows("forward_variants")
    assert rows and sorted(r["index"] for r in rows) == list(range(rows[0]["of"])), rows
    return rows


def test_variant_specializations_compile_without_spills(reports):
    for r in reports:
        assert r["mma"] > 0, r
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert r["stack"] == 0, r


def test_variant_specializations_fit_their_tiles(reports):
    for r in reports:
        assert r["registers"] <= 255 and r["registers"] * r["threads"] <= 65536, r
        assert r["shared_bytes"] <= 227 * 1024, r
