"""Compile representative backward variant specializations (both families) for sm_90a
without a GPU, assemble them with nvJitLink (ptxas -v) and print one JSON line per
kernel with its resources. Run by tests/test_ptx_gate_backward_variants.py in
subprocesses with the simulator off. Usage: ptx_gate_backward_variants_worker.py CASE ...
with CASE one of CASES' names."""

import json
import os
import sys
from dataclasses import replace


os.environ["NUMBA_ENABLE_CUDASIM"] = "0"

from numba import cuda  # noqa: E402
from numba.cuda import types  # noqa: E402

from nbflash import tuning  # noqa: E402
from nbflash.kernels import backward_mma, backward_simt  # noqa: E402
from nbflash.spec import BackwardSpec, Variant  # noqa: E402
from ptx_gate_backward_worker import signature, variant_types  # noqa: E402
from ptx_gate_worker import ptxas_report, ptxas_resources  # noqa: E402

EVERYTHING = Variant(window=True, softcap=True, alibi=True, bias="fp32", mask=True, dropout=True)
# name: (family, dtype, head_dim, causal, variant, dbias, parts)
CASES = {
    "mma-d128-causal-cap-alibi": ("mma", "fp16", 128, True, Variant(softcap=True, alibi=True), False, ("dkdv", "dq")),
    "mma-d64-window": ("mma", "bf16", 64, True, Variant(window=True), False, ("dkdv", "dq")),
    "mma-d128-everything": ("mma", "fp16", 128, True, EVERYTHING, True, ("dkdv", "dq", "dkdvq")),
    "simt-fp32-d128-everything": ("simt", "fp32", 128, True, EVERYTHING, True, ("dkdv", "dq")),
    # bias and mask tiles staged through shared memory (kernels/bias_tile.py)
    "mma-d128-staged": ("mma", "fp16", 128, False, Variant(bias="fp16", bias_staged=True, mask=True, mask_staged=True),
                        False, ("dkdv", "dq")),  # the parts a GPU runs (tuning.MMA_BWD_DQ_ATOMICS)
    "mma-d128-staged-light": ("mma", "bf16", 128, True, Variant(window=True, softcap=True, alibi=True, bias="fp32",
                                                                bias_staged=True, mask=True, mask_staged=True),
                              False, ("dkdv", "dq")),
    "mma-d64-staged-light": ("mma", "fp16", 64, False, Variant(softcap=True, alibi=True, bias="fp16", bias_staged=True,
                                                               mask=True, mask_staged=True), False, ("dkdv", "dq")),
}
ARCH = "sm_90a"


def report(key, part, threads, ptx, shared_bytes):
    log = ptxas_report(ptx, ARCH)
    print(json.dumps({
        "key": key, "part": part, "arch": ARCH, "threads": threads,
        **ptxas_resources(log),
        "mma": ptx.count("mma.sync.aligned.m16n8k16"),
        "shared_bytes": shared_bytes,
    }), flush=True)


def mma_case(dtype, head_dim, causal, variant, dbias, parts):
    plan = backward_mma.choose_spec(dtype, head_dim, causal, False, variant, dbias, wgmma=False)  # the mma.sync family
    for part in parts:
        spec = replace(plan, part=part)
        threads = spec.dq_threads if part == "dq" else spec.threads
        bias = {"fp16": types.float16, "bf16": types.uint16}.get(variant.bias, types.float32)  # kernel views
        ptx, _ = cuda.compile_ptx(backward_mma.build(spec).py_func, signature(part, bias), cc=(9, 0, "a"))
        report(spec.key, part, threads, ptx, backward_mma.shared_bytes(spec))


def simt_case(dtype, head_dim, causal, variant, dbias, parts):
    acc = types.float64 if dtype == "fp64" else types.float32
    storage = {"fp16": types.float16, "bf16": types.uint16, "fp32": types.float32, "fp64": types.float64}[dtype]
    bm, bn, threads = tuning.backward_simt_variant_tiles(acc.bitwidth // 8, head_dim, head_dim, False, variant.softcap)
    spec = BackwardSpec("simt", dtype, head_dim, head_dim, causal, bm, bn, threads, variant=variant, dbias=dbias)
    kernels = backward_simt.build(spec)
    t4 = types.Array(storage, 4, "A")
    a3 = types.Array(acc, 3, "A")
    extra = list(variant_types())
    extra[2] = extra[7] = acc  # softcap and keep_scale in accumulation precision
    sig = (t4, t4, t4, t4, a3, a3, t4, t4, t4, acc, types.int64, *extra, types.Array(acc, 4, "A"))
    shared = tuning.backward_simt_shared_bytes(bm, bn, head_dim, head_dim, acc.bitwidth // 8)
    shared += (bm * bn * acc.bitwidth // 8) if variant.softcap else 0
    for part in parts:
        ptx, _ = cuda.compile_ptx(getattr(kernels, part).py_func, sig, cc=(9, 0, "a"))
        report(spec.key, part, threads, ptx, shared)


def main():
    for name in sys.argv[1:]:
        family, *case = CASES[name]
        (mma_case if family == "mma" else simt_case)(*case)


if __name__ == "__main__":
    main()
