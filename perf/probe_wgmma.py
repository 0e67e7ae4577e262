"""Probe: does Numba-emitted wgmma work on this GPU, and how fast is it?

(1) Correctness: the check kernel of nbflash/kernels/wgmma_probe.py (S = A B^T by wgmma
    with A from shared memory or registers, then O = P V with V MN-major) for fp16 and
    bf16, N 64 and 128, KD and DV 64 and 128, against NumPy on random data. A failure
    prints where the wrong elements are (rows mod 8, 8-column chunks, whole rows or
    columns): a wrong swizzle or descriptor shows as a pattern there.
(2) Throughput: every SM runs warpgroups looping m64n128k16 wgmma chains over shared-
    memory tiles (ss, and A from registers: rs), beside warps looping independent
    mma.sync m16n8k16 on registers (ptx.py), TFLOP/s of each.
(3) The SASS opcode histogram of the loop kernels (HGMMA count), when nvdisasm is found.
Needs an sm_90 GPU (wgmma exists on sm_90a only). Under a minute; table last.

    python perf/probe_wgmma.py
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import cupy  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

import nbflash  # noqa: E402
from nbflash import launch  # noqa: E402
from nbflash.kernels import wgmma_probe  # noqa: E402

NP_DTYPE = {"fp16": np.float16, "bf16": ml_dtypes.bfloat16}


def describe_mismatch(bad):
    """Where the wrong elements are, in terms a layout bug shows up in."""
    rows, cols = np.nonzero(bad)
    by_row8 = np.bincount(rows % 8, minlength=8)
    by_chunk = np.bincount(cols // 8, minlength=bad.shape[1] // 8)
    by_warp = np.bincount(rows // 16, minlength=4)
    lines = [f"      {bad.sum()} of {bad.size} wrong; first (row, col): {list(zip(rows[:6].tolist(), cols[:6].tolist()))}",
             f"      by row % 8: {by_row8.tolist()}  by 16-row warp slice: {by_warp.tolist()}",
             f"      by 8-column chunk: {by_chunk.tolist()}",
             f"      whole rows wrong: {int((bad.all(axis=1)).sum())}, whole columns wrong: {int((bad.all(axis=0)).sum())}"]
    return "\n".join(lines)


def check(dtype, n, kd, dv, a_regs, rng):
    a, b, v = (rng.uniform(-1, 1, shape).astype(NP_DTYPE[dtype]) for shape in ((64, kd), (n, kd), (n, dv)))
    dev = [cupy.asarray(x.view(np.uint16)) for x in (a, b, v)]
    s_out = cupy.full((64, n), np.nan, np.float32)
    o_out = cupy.full((64, dv), np.nan, np.float32)
    kernel = wgmma_probe.build_check(dtype, n, kd, dv, a_regs)
    launch.launch(kernel, 1, 128, [launch.numba_view(x) for x in (*dev, s_out, o_out)],
                  wgmma_probe.check_shared_bytes(n, kd, dv))
    s_got, o_got = s_out.get(), o_out.get()
    s_ref, o_ref = wgmma_probe.check_reference(a, b, v, s_got, a.dtype)
    out = []
    for what, got, ref in (("S", s_got, s_ref), ("O", o_got, o_ref)):
        bad = ~np.isclose(got, ref, rtol=1e-5, atol=1e-4)
        err = float(np.nanmax(np.abs(got - ref))) if np.isfinite(got).any() else float("nan")
        out.append((what, not bad.any(), err, describe_mismatch(bad) if bad.any() else ""))
    return out


def loop_tflops(kernel, threads, shared, flop_per_thread_rep, reps, blocks):
    out = cupy.zeros(blocks * threads, np.float32)
    args = [launch.numba_view(out), np.int32(reps)]
    fn = lambda: launch.launch(kernel, blocks, threads, args, shared)  # noqa: E731
    ms = nbflash.device.median_gpu_ms(fn, 2, 5)
    return blocks * threads * flop_per_thread_rep * reps / (ms * 1e-3) / 1e12, ms


def sass_histogram(kernel, sig):
    """SASS opcodes of kernel for sig (compiled for this GPU), or None without nvdisasm."""
    tool = shutil.which("nvdisasm") or next((p for p in ("/usr/local/cuda/bin/nvdisasm",) if os.path.exists(p)), None)
    if tool is None:
        return None
    compiled = kernel.compile(sig)
    cubin = launch.library_cubin(compiled._codelibrary)
    if cubin is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([tool, f.name], capture_output=True, text=True).stdout
    ops = collections.Counter(m.group(1).split(".")[0] for m in
                              re.finditer(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", sass))
    return ops


def main():
    print(nbflash.device.describe(), flush=True)
    if nbflash.device.compute_capability() != (9, 0):
        print("wgmma needs an sm_90 GPU; nothing to probe")
        return
    rng = np.random.default_rng()
    failures = 0
    print("correctness (check kernel; S = A B^T, O = P V):")
    for dtype in ("fp16", "bf16"):
        for n in (64, 128):
            for a_regs in (False, True):
                # one Numba compile each (~3 s): every N, mode and dtype, KD and DV 64 and 128 both
                # crossing 64-column panels somewhere
                pairs = ((64, 128),) if not a_regs else ((128, 64),)
                if dtype == "fp16" and n == 128:
                    pairs += ((128, 128),)
                for kd, dv in pairs:
                    results = check(dtype, n, kd, dv, a_regs, rng)
                    tag = f"{dtype} n{n} kd{kd} dv{dv} {'rs' if a_regs else 'ss'}"
                    line = "  ".join(f"{what} {'pass' if ok else 'FAIL'} max err {err:.2e}" for what, ok, err, _ in results)
                    print(f"  {tag:24} {line}", flush=True)
                    for what, ok, _, detail in results:
                        if not ok:
                            failures += 1
                            print(f"    {what}:\n{detail}")

    sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
    blocks = 2 * sms
    rows = []
    for dtype in ("fp16", "bf16"):
        for a_regs in (False, True):
            kernel = wgmma_probe.build_wgmma_loop(dtype, 128, 4, a_regs)
            flop = 2 * 64 * 128 * 16 * 4 / 128  # per thread per rep: 4 wgmma of the warpgroup's 128 threads
            tf, ms = loop_tflops(kernel, 256, wgmma_probe.loop_shared_bytes(128, 4), flop, 20000, blocks)
            rows.append((f"wgmma m64n128k16 {'rs' if a_regs else 'ss'} {dtype}", tf, ms))
            print(f"  {rows[-1][0]}: {tf:.0f} TFLOP/s", flush=True)
        kernel = wgmma_probe.build_mma_loop(dtype, 16)
        flop = 2 * 16 * 8 * 16 * 16 / 32  # per thread per rep: 16 mma of the warp's 32 threads
        tf, ms = loop_tflops(kernel, 256, 0, flop, 40000, blocks)
        rows.append((f"mma.sync m16n8k16 x16 {dtype}", tf, ms))
        print(f"  {rows[-1][0]}: {tf:.0f} TFLOP/s", flush=True)

    from numba.cuda import types

    out_t = types.Array(types.float32, 1, "C")
    for name, kernel in (("wgmma loop ss", wgmma_probe.build_wgmma_loop("fp16", 128, 4, False)),
                         ("mma.sync loop", wgmma_probe.build_mma_loop("fp16", 16))):
        try:
            ops = sass_histogram(kernel, (out_t, types.int32))
        except Exception as error:  # optional diagnostics
            ops = None
            print(f"  SASS of {name}: unavailable ({error})")
        if ops is not None:
            print(f"  SASS of {name}: HGMMA {ops.get('HGMMA', 0)}, HMMA {ops.get('HMMA', 0)}, "
                  f"top: {ops.most_common(8)}")

    print(f"\ncorrectness: {'all pass' if not failures else f'{failures} FAILED'}")
    print(f"{'loop':32} {'TFLOP/s':>8} {'ms':>8}   ({blocks} CTAs of 256 threads)")
    for name, tf, ms in rows:
        print(f"{name:32} {tf:8.0f} {ms:8.2f}")


if __name__ == "__main__":
    main()
