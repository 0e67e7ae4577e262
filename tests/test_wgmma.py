"""The Hopper wgmma intrinsics (kernels/ptx_wgmma.py) through the check kernel of
kernels/wgmma_probe.py: tiles staged by cp.async into the 128-byte-swizzled layout,
S = A B^T by wgmma (A from shared memory or registers, B K-major) and O = P V (P the
S fragment repacked as A registers, V MN-major), against NumPy. On the simulator the
twins decode the descriptors bit by bit from the PTX ISA's canonical layouts, so these
tests check the layout function, the descriptor encoding and the fragment maps
against each other; on an H100 (gpu tier) against the hardware."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from helpers import new_rng, to_device, to_host
from nbflash import launch
from nbflash.kernels import wgmma_probe

NP_DTYPE = {"fp16": np.float16, "bf16": ml_dtypes.bfloat16}


def run_check(dtype, n, kd, dv, a_in_registers, rng):
    a, b, v = (rng.uniform(-1, 1, shape).astype(NP_DTYPE[dtype]) for shape in ((64, kd), (n, kd), (n, dv)))
    s_out = np.full((64, n), np.nan, np.float32)
    o_out = np.full((64, dv), np.nan, np.float32)
    args = [to_device(x) for x in (a.view(np.uint16), b.view(np.uint16), v.view(np.uint16), s_out, o_out)]
    kernel = wgmma_probe.build_check(dtype, n, kd, dv, a_in_registers)
    launch.launch(kernel, 1, 128, [launch.numba_view(x) for x in args],
                  wgmma_probe.check_shared_bytes(n, kd, dv))
    s_got, o_got = to_host(args[3]), to_host(args[4])
    s_ref, o_ref = wgmma_probe.check_reference(a, b, v, s_got, a.dtype)
    p = np.asarray(s_got, np.float32).astype(a.dtype).astype(np.float64)
    s_bound = accumulation_bound(np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64)).T, kd)
    o_bound = accumulation_bound(np.abs(p) @ np.abs(v.astype(np.float64)), n)
    return s_got, (s_ref, s_bound), o_got, (o_ref, o_bound)


def accumulation_bound(abs_sums, terms):
    """|error| allowed for float32 accumulation of ``terms`` exact products whose
    absolute values sum to ``abs_sums``: terms * 2**-23 of that sum (the classic
    n * eps bound; the tensor cores align each k-group's products to the largest
    before adding, which stays inside it), plus the float32 rounding of the result."""
    return terms * 2.0**-23 * abs_sums + 2.0**-126


def assert_matches(got, expected, what, seed):
    ref, bound = expected
    bad = ~(np.abs(got.astype(np.float64) - ref) <= bound)  # NaN (unwritten) fails too
    if bad.any():
        rows, cols = np.nonzero(bad)
        raise AssertionError(f"{what} (seed {seed}): {bad.sum()} of {bad.size} wrong, first at "
                             f"{list(zip(rows[:8].tolist(), cols[:8].tolist()))}, "
                             f"max error {np.nanmax(np.abs(got - ref))}")


@pytest.mark.parametrize("dtype, n, kd, dv, a_in_registers", [
    ("fp16", 64, 128, 128, False),  # K-major A and B over two 64-column panels; V's LBO across two panels
    ("bf16", 128, 64, 64, True),  # A from registers, a 128-key B tile
], ids=["ss-fp16-n64-kd128-dv128", "rs-bf16-n128-kd64-dv64"])
def test_wgmma_layouts_and_fragments_match_numpy(dtype, n, kd, dv, a_in_registers):
    rng, seed = new_rng()
    s_got, s_ref, o_got, o_ref = run_check(dtype, n, kd, dv, a_in_registers, rng)
    assert_matches(s_got, s_ref, "S = A B^T", seed)
    assert_matches(o_got, o_ref, "O = P V", seed)


@pytest.mark.gpu
@pytest.mark.parametrize("a_in_registers", [False, True], ids=["ss", "rs"])
@pytest.mark.parametrize("n", [64, 128])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_wgmma_on_the_device(dtype, n, a_in_registers):
    rng, seed = new_rng()
    for kd, dv in ((64, 64), (128, 128), (64, 128)):
        s_got, s_ref, o_got, o_ref = run_check(dtype, n, kd, dv, a_in_registers, rng)
        assert_matches(s_got, s_ref, f"S = A B^T (kd {kd})", seed)
        assert_matches(o_got, o_ref, f"O = P V (dv {dv})", seed)
