"""Compile every shipped tensor-core backward kernel for a real GPU without a GPU,
assemble it with nvJitLink (ptxas -v) for sm_80 and sm_90a and print one JSON line per
(kernel, arch) with its resources. Run by tests/test_ptx_gate_backward.py in
subprocesses with the simulator off, one per dtype (the two run in parallel).

Each kernel is compiled to PTX once, for sm_80 (compute_80 PTX is what ptxas also
assembles for sm_90a): the Numba front end is most of the time, and the backward has
48 specializations. Usage: ptx_gate_backward_worker.py [fp16|bf16 ...] [dense|varlen]
(both dtypes, and both the dense and the varlen kernels, by default)."""

import json
import os
import sys

os.environ["NUMBA_ENABLE_CUDASIM"] = "0"

from numba import cuda  # noqa: E402
from numba.cuda import types  # noqa: E402

from nbflash import tuning  # noqa: E402
from nbflash.kernels import backward_delta, backward_mma  # noqa: E402
from nbflash.spec import DeltaSpec  # noqa: E402
from ptx_gate_worker import ptxas_report, ptxas_resources  # noqa: E402

def parts(plan):
    """The kernels a shipped plan launches (dq_convert has no tensor-core work)."""
    return ("dkdv", "dq", "dkdvq") if plan.dq_atomics else ("dkdv", "dq")
ARCHS = ("sm_80", "sm_90a")


def variant_types(bias_dtype=types.float32):
    """Types of the ten nbflash.variants.KERNEL_ARGS values (bias of the spec's dtype)."""
    return (types.int32, types.int32, types.float32, types.Array(types.float32, 2, "A"),
            types.Array(bias_dtype, 4, "A"), types.Array(types.uint8, 4, "A"),
            types.uint32, types.float32, types.uint32, types.uint32)


def signature(part, bias_dtype=types.float32):
    u16 = types.Array(types.uint16, 4, "A")
    f32_3 = types.Array(types.float32, 3, "A")
    f32_4 = types.Array(types.float32, 4, "A")
    seqlens = (types.Array(types.int32, 1, "A"),) * 2  # cu_seqlens_q, cu_seqlens_k (read with spec.varlen)
    inputs = (u16, u16, u16, u16, f32_3, f32_3)
    if part == "dq":
        return (*inputs, u16, types.float32, types.int64, *variant_types(bias_dtype), *seqlens)
    return (*inputs, u16, u16, f32_4, types.float32, types.int64, *variant_types(bias_dtype), f32_4, *seqlens)


def shipped_specs(dtypes, varlens=(False, True)):
    """Every kernel of every shipped plan, dense and varlen (attention_varlen_backward)."""
    for head_dim in sorted(tuning.MMA_BWD_TILES):
        for dtype in dtypes:
            for causal in (False, True):
                for varlen in varlens:
                    plan = backward_mma.choose_spec(dtype, head_dim, causal, simulator=False, wgmma=False)
                    for part in parts(plan):
                        yield plan.__class__(**{**plan.__dict__, "part": part, "varlen": varlen})


def delta_kernels(dtypes):
    """The tensor-core backward's delta = rowsum(dO * O) kernel (kernels/backward_delta.py)
    at every head_dim a tensor-core backward ships, one row per (kernel, arch), kind "delta"."""
    u16 = types.Array(types.uint16, 4, "A")
    sig = (u16, u16, types.Array(types.float32, 3, "A"))
    for head_dim in sorted(set(tuning.MMA_BWD_TILES) | set(tuning.WGMMA_BWD_TILES)):
        for dtype in dtypes:
            spec = DeltaSpec(dtype, head_dim, tuning.DELTA_THREADS)
            ptx, _ = cuda.compile_ptx(backward_delta.build(spec).py_func, sig, cc=(8, 0))
            for arch in ARCHS:
                print(json.dumps({"key": spec.key, "kind": "delta", "arch": arch, "threads": spec.threads,
                                  **ptxas_resources(ptxas_report(ptx, arch)),
                                  "ld_nc_v4": ptx.count("ld.global.nc.L1::no_allocate.v4.u32")}), flush=True)


def main():
    args = sys.argv[1:]
    dtypes = [a for a in args if a in ("fp16", "bf16")] or ("fp16", "bf16")
    varlens = (False,) if "dense" in args else (True,) if "varlen" in args else (False, True)
    if False in varlens:
        delta_kernels(dtypes)
    for spec in shipped_specs(dtypes, varlens):
        threads = spec.dq_threads if spec.part == "dq" else spec.threads
        ptx, _ = cuda.compile_ptx(backward_mma.build(spec).py_func, signature(spec.part), cc=(8, 0))
        for arch in ARCHS:
            log = ptxas_report(ptx, arch)
            print(json.dumps({
                "key": spec.key, "part": spec.part, "varlen": spec.varlen, "arch": arch, "threads": threads,
                **ptxas_resources(log),
                "mma": ptx.count("mma.sync.aligned.m16n8k16"),
                "ldmatrix": ptx.count("ldmatrix.sync.aligned"),
                "cp_async": ptx.count("cp.async.cg.shared.global"),
                "atomics": ptx.count("red.global.add.f32"),
                "shared_bytes": backward_mma.shared_bytes(spec),
            }), flush=True)


if __name__ == "__main__":
    main()
