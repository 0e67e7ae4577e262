"""The no-GPU gate on the backward variants: representative variant specializations of
both backward families (tensor-core dK/dV, dQ and atomic-dQ kernels; the portable
dK/dV and dQ kernels) compile for sm_90a with no spills and a register count and
shared memory their CTA can launch with. (Local arrays that ptxas keeps in a stack
frame are reported in the rows; the dQ kernel with softcap and the everything-on dK/dV
kernel have one, a speed matter, not a correctness one.)"""

from __future__ import annotations

import gate_jobs

BATCHES = [["mma-d128-causal-cap-alibi", "simt-fp32-d128-everything"], ["mma-d128-everything", "mma-d64-window"],
           ["mma-d128-staged", "mma-d128-staged-light", "mma-d64-staged-light"]]
KERNELS = 2 + 2 + 3 + 2 + 2 + 2 + 2


gate_jobs.register_module(__file__, "backward_variants",
                          [["ptx_gate_backward_variants_worker.py", *batch] for batch in BATCHES])


def test_variant_kernels_compile_without_spills_for_sm_90a():
    rows = gate_jobs.rows("backward_variants")
    assert len(rows) == KERNELS, rows
    for r in rows:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert r["registers"] <= 255 and r["registers"] * r["threads"] <= 65536, r
        assert r["shared_bytes"] <= 227 * 1024, r
        if r["key"].startswith("bwd_mma"):
            assert r["mma"] > 0, r
