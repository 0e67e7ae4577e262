"""Static SASS of the wgmma kernels (sm_90a), without a GPU: registers, spills and the
count of each opcode class for every wgmma backward kernel and the plain wgmma forward
(the shipped tiles, fp16). The main loops are unrolled straight-line code, so the static
count follows the per-iteration instruction count; Nsight Compute on the H100 (session 8)
found the d64 backward issuing ~1300 instructions a warp per query tile, mostly integer
index arithmetic (Numba's negative-index wraparound on signed indices, 64-bit
shape-and-stride address math). Compare before and after a change:

    PYTHONPATH=src python perf/sass_wgmma.py

Needs nvdisasm: $NVDISASM or /work/tools/nvidia/cu13/bin/nvdisasm."""

from __future__ import annotations

import os
import re
import sys

os.environ["NUMBA_ENABLE_CUDASIM"] = "0"
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.dirname(__file__))

from sass_variants import link, opcode_counts  # noqa: E402

GROUPS = {
    "int": ("IMAD", "ISETP", "LOP3", "LEA", "SEL", "IADD3", "SHF", "VIADD", "IABS", "VIMNMX", "PLOP3", "I2F", "F2I"),
    "uniform": ("UIADD3", "UIMAD", "ULEA", "USHF", "UMOV", "ULOP3", "UISETP", "USEL", "R2UR"),
    "fp": ("FFMA", "FMUL", "FADD", "MUFU", "F2FP", "FMNMX", "FSEL", "FSETP"),
    "mem": ("LDS", "STS", "LDG", "STG", "LDGSTS", "LDL", "STL"),
}


def sass_of(kernel, sig):
    from numba import cuda

    fastmath = kernel.targetoptions.get("fastmath", False)
    ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0, "a"), fastmath=fastmath,
                              launch_bounds=kernel.targetoptions.get("launch_bounds"))
    log, cubin = link(ptx)
    ops = opcode_counts(cubin)
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", log).group(1))
    return regs, spills, ops


def main():
    import ptx_gate_wgmma_worker as gate
    from ptx_gate_backward_worker import signature as backward_signature

    from nbflash.kernels import backward_wgmma, forward_wgmma

    only = sys.argv[1:]
    rows = []
    for spec in gate.backward_specs():
        if spec.dtype == "fp16":
            rows.append((spec.key, backward_wgmma.build(spec), backward_signature(spec.part)))
    fsig = None
    for spec in gate.forward_specs():
        if spec.dtype == "fp16" and not spec.variant.key and not spec.varlen:
            if fsig is None:
                from numba.cuda import types

                u16 = types.Array(types.uint16, 4, "A")
                seqlens = types.Array(types.int32, 1, "A")
                fsig = (u16, u16, u16, u16, types.Array(types.float32, 3, "A"), types.float32, types.int64,
                        seqlens, seqlens) + gate.variant_types()
            rows.append((spec.key, forward_wgmma.build(spec), fsig))
    print(f"| kernel | regs | spill B | total | {' | '.join(GROUPS)} | HGMMA |")
    print("|---|---|---|---|" + "---|" * (len(GROUPS) + 1))
    for key, kernel, sig in rows:
        if only and not any(o in key for o in only):
            continue
        regs, spills, ops = sass_of(kernel, sig)
        groups = [sum(ops.get(op, 0) for op in members) for members in GROUPS.values()]
        print(f"| {key} | {regs} | {spills} | {sum(ops.values())} | {' | '.join(map(str, groups))} | "
              f"{ops.get('HGMMA', 0)} |", flush=True)


if __name__ == "__main__":
    main()
