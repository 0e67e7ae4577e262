"""Compile every shipped tensor-core specialization (dense and varlen) for a real GPU target without a
GPU, link it with nvJitLink (ptxas -v) and print one JSON line per kernel with its
resources. Run by tests/test_ptx_gate.py in subprocesses with the simulator off, one
per dtype (the two run in parallel). Usage: ptx_gate_worker.py [fp16|bf16 ...]."""

import json
import os
import re
import sys

os.environ["NUMBA_ENABLE_CUDASIM"] = "0"

from cuda.bindings import nvjitlink  # noqa: E402
from numba import cuda  # noqa: E402
from numba.cuda import types  # noqa: E402

from nbflash import tuning  # noqa: E402
from nbflash.kernels import forward_mma  # noqa: E402
from nbflash.spec import ForwardSpec  # noqa: E402


def ptxas_report(ptx: str, arch: str) -> str:
    handle = nvjitlink.create(2, [f"-arch={arch}", "-Xptxas=-v"])
    data = ptx.encode()
    nvjitlink.add_data(handle, nvjitlink.InputType.PTX, data, len(data), "kernel.ptx")
    nvjitlink.complete(handle)
    log = bytearray(nvjitlink.get_info_log_size(handle))
    nvjitlink.get_info_log(handle, log)
    nvjitlink.destroy(handle)
    return log.decode()


FLAGS = ((False, False), (True, False), (False, True), (True, True))  # (causal, varlen)
BF16_FLAGS = ((True, True),)
"""bf16 differs from fp16 only in the mma's type and the P pack: ptxas gave all 132
(kernel, arch) pairs of the gates the same registers in both dtypes (Nov 2026), so bf16
is gated with the most flags on (causal varlen) for each head_dim, fp16 with every
combination, to keep CI short."""


def ptxas_resources(log: str) -> dict:
    """Registers, stack frame and spill bytes from ptxas's -v report of one kernel."""
    grab = lambda pattern: int(re.search(pattern, log).group(1))  # noqa: E731
    return {"registers": grab(r"Used (\d+) registers"), "stack": grab(r"(\d+) bytes stack frame"),
            "spill_stores": grab(r"(\d+) bytes spill stores"), "spill_loads": grab(r"(\d+) bytes spill loads")}


def shipped_specs(dtypes):
    """{spec: [archs that ship it]}: sm_80 and sm_90a share most tiles, and a spec's
    compute_80 PTX is what ptxas assembles for either (Numba's front end is most of
    the gate's time, so each spec is compiled to PTX once). bf16 with BF16_FLAGS only."""
    targets = {"sm_80": (8, 0), "sm_90a": (9, 0, "a")}
    found = {}
    for arch, cc in targets.items():
        for head_dim in sorted(tuning.MMA_TILES):
            for dtype in dtypes:
                for causal, varlen in (BF16_FLAGS if dtype == "bf16" else FLAGS):
                    bm, bn, threads, stages, q_regs = tuning.mma_tiles(head_dim, False, cc, causal)
                    spec = ForwardSpec("mma", dtype, head_dim, head_dim, causal, True, bm, bn, threads, stages, q_regs,
                                       varlen=varlen)
                    found.setdefault(spec, []).append(arch)
    return found


def variant_types(bias=types.float32):
    """The types of the variant arguments (nbflash.variants.KERNEL_ARGS) appended to
    every forward kernel's; arrays with any strides (user views broadcast)."""
    return (types.int32, types.int32, types.float32, types.Array(types.float32, 2, "A"),
            types.Array(bias, 4, "A"), types.Array(types.uint8, 4, "A"),
            types.uint32, types.float32, types.uint32, types.uint32)


def main():
    u16 = types.Array(types.uint16, 4, "A")
    seqlens = types.Array(types.int32, 1, "A")  # cu_seqlens_q, cu_seqlens_k (read by varlen kernels)
    sig = (u16, u16, u16, u16, types.Array(types.float32, 3, "A"), types.float32, types.int64, seqlens, seqlens)
    sig += variant_types()
    for spec, archs in shipped_specs(sys.argv[1:] or ("fp16", "bf16")).items():
        kernel = forward_mma.build(spec)
        fastmath = kernel.targetoptions.get("fastmath", False)
        ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(8, 0), fastmath=fastmath)
        for arch in archs:
            log = ptxas_report(ptx, arch)
            print(json.dumps({
                "key": spec.key, "arch": arch, "threads": spec.threads,
                **ptxas_resources(log),
                "mma": ptx.count("mma.sync.aligned.m16n8k16"),
                "ldmatrix": ptx.count("ldmatrix.sync.aligned"),
                "cp_async": ptx.count("cp.async.cg.shared.global"),
                "shared_bytes": forward_mma.shared_bytes(spec),
            }), flush=True)


if __name__ == "__main__":
    main()
