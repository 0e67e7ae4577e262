"""Compile the portable backward kernels for a real GPU target without a GPU, link
them with nvJitLink (ptxas -v) and print one JSON line per kernel with its resources.
Usage: ptx_gate_backward_simt_worker.py ARCH [DTYPE:HEAD_DIM ...] (default: a sweep).
Run by tests/test_ptx_gate_backward_simt.py in a subprocess with the simulator off."""

import json
import os
import sys

os.environ["NUMBA_ENABLE_CUDASIM"] = "0"

from numba import cuda  # noqa: E402
from numba.cuda import types  # noqa: E402

from nbflash import tuning  # noqa: E402
from nbflash.kernels import backward_simt  # noqa: E402
from nbflash.spec import BackwardSpec  # noqa: E402
from ptx_gate_worker import ptxas_report, ptxas_resources  # noqa: E402

TARGETS = {"sm_80": (8, 0), "sm_90a": (9, 0, "a")}
STORAGE = {"fp16": types.float16, "bf16": types.uint16, "fp32": types.float32, "fp64": types.float64}
DEFAULT = ["fp16:64", "fp16:128", "bf16:128", "fp32:256", "fp64:256", "fp64:64"]


def main():
    arch = sys.argv[1]
    cases = sys.argv[2:] or DEFAULT
    for case in cases:
        dtype, head_dim = case.split(":")
        head_dim = int(head_dim)
        acc = types.float64 if dtype == "fp64" else types.float32
        bm, bn, threads = tuning.backward_simt_tiles(acc.bitwidth // 8, head_dim, head_dim, False)
        spec = BackwardSpec("simt", dtype, head_dim, head_dim, True, bm, bn, threads)
        kernels = backward_simt.build(spec)
        t4 = types.Array(STORAGE[dtype], 4, "A")
        a3 = types.Array(acc, 3, "A")
        lse = types.Array(acc, 3, "A")
        extra = (types.int32, types.int32, types.float32, types.Array(types.float32, 2, "A"),
                 types.Array(types.float32, 4, "A"), types.Array(types.uint8, 4, "A"),
                 types.uint32, types.float32, types.uint32, types.uint32, types.Array(types.float32, 4, "A"))
        sigs = {
            "preprocess": (t4, t4, a3),
            "dkdv": (t4, t4, t4, t4, lse, a3, t4, t4, t4, acc, types.int64, *extra),
            "dq": (t4, t4, t4, t4, lse, a3, t4, t4, t4, acc, types.int64, *extra),
        }
        for part, sig in sigs.items():
            ptx, _ = cuda.compile_ptx(getattr(kernels, part).py_func, sig, cc=TARGETS[arch])
            log = ptxas_report(ptx, arch)
            print(json.dumps({
                "key": spec.key, "part": part, "arch": arch, "threads": threads,
                **ptxas_resources(log),
                "shared_bytes": tuning.backward_simt_shared_bytes(bm, bn, head_dim, head_dim, acc.bitwidth // 8),
            }), flush=True)


if __name__ == "__main__":
    main()
