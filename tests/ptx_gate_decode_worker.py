"""Compile the shipped split-KV decoding specializations (tuning.DECODE_GATE for the
portable kernel, tuning.DECODE_MMA_GATE for the tensor-core kernel) for a real GPU
target without a GPU, link them with nvJitLink (ptxas -v) and print one JSON line per
kernel with its resources. Run by tests/test_ptx_gate_decode.py in a
subprocess with the simulator off."""

import json
import os
import sys

os.environ["NUMBA_ENABLE_CUDASIM"] = "0"

from numba import cuda  # noqa: E402
from numba.cuda import types  # noqa: E402

from nbflash import tuning  # noqa: E402
from nbflash.kernels import decode, decode_combine, decode_mma, kv_append  # noqa: E402
from nbflash.spec import AppendSpec, CombineSpec, DecodeMmaSpec, DecodeSpec  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from ptx_gate_worker import ptxas_report, ptxas_resources  # noqa: E402

STORAGE = {"fp16": types.float16, "bf16": types.uint16, "fp32": types.float32, "fp64": types.float64}
ACC = {"fp16": types.float32, "bf16": types.float32, "fp32": types.float32, "fp64": types.float64}


def signature(spec):
    arr = lambda t, n: types.Array(t, n, "A")  # noqa: E731
    if isinstance(spec, DecodeMmaSpec):  # q and the caches as uint16 bits, out as stored
        results = (arr(types.float32, 5), arr(types.float32, 4)) if spec.split else \
            (arr(STORAGE[spec.dtype], 4), arr(types.float32, 3))
        u16 = arr(types.uint16, 4)
        return (u16, u16, u16, arr(types.int32, 2), arr(types.int32, 1), types.int64, *results, types.float32,
                types.int64, types.int64)
    cache_t = types.uint16 if spec.vectorized and spec.dtype in ("fp16", "bf16") else STORAGE[spec.dtype]
    if spec.split:
        results = (arr(ACC[spec.dtype], 5), arr(ACC[spec.dtype], 4))
    else:
        results = (arr(STORAGE[spec.dtype], 4), arr(types.float32, 3))
    return (arr(STORAGE[spec.dtype], 4), arr(cache_t, 4), arr(cache_t, 4), arr(types.int32, 2),
            arr(types.int32, 1), types.int64, *results, ACC[spec.dtype], types.int64, types.int64)


def specs():
    itemsize = {"fp16": 2, "bf16": 2, "fp32": 4}
    for dtype, head_dim, rows, block_size, causal, split, with_lse in tuning.DECODE_GATE:
        rows_cap, threads, unroll = tuning.decode_tiles(itemsize[dtype], head_dim, head_dim, rows, True, False)
        assert rows_cap == rows, (dtype, head_dim, rows)
        yield DecodeSpec(dtype, head_dim, head_dim, rows, causal, block_size, True, split, with_lse, threads, unroll)


def mma_specs():
    for dtype, head_dim, head_dim_v, block_size, causal, split, with_lse in tuning.DECODE_MMA_GATE:
        threads, stages = tuning.decode_mma_tiles(head_dim, head_dim_v, False)
        yield DecodeMmaSpec(dtype, head_dim, head_dim_v, causal, block_size, split, with_lse, threads, stages)


# Not gated for registers (not the fast path), only compiled: scalar-load decoding,
# the combine kernel and the append kernel.
SCALAR_DECODE = [DecodeSpec("fp16", 128, 128, 4, True, 16, False, True, False,
                            *tuning.decode_tiles(2, 128, 128, 4, False, False)[1:]),
                 DecodeSpec("fp64", 64, 64, 4, True, 0, False, False, True,
                            *tuning.decode_tiles(8, 64, 64, 4, False, False)[1:])]
COMBINES = [CombineSpec("fp16", 128, True, 128), CombineSpec("fp64", 64, False, 128)]
APPENDS = [AppendSpec(16, True, 64), AppendSpec(64, False, 64)]


def others():
    arr = lambda t, n: types.Array(t, n, "A")  # noqa: E731
    for spec in SCALAR_DECODE:
        yield spec, decode, signature(spec)
    for spec in COMBINES:
        acc = ACC[spec.dtype]
        yield spec, decode_combine, (arr(acc, 5), arr(acc, 4), arr(STORAGE[spec.dtype], 4), arr(types.float32, 3))
    for spec in APPENDS:
        bits = {16: types.uint16, 64: types.uint64}[spec.bits]
        yield spec, kv_append, (arr(bits, 4),) * 4 + (arr(types.int32, 2), arr(types.int32, 1))


def main():
    targets = {"sm_80": (8, 0), "sm_90a": (9, 0, "a")}  # the test runs sm_90a only (time)
    for arch in sys.argv[1:] or targets:
        jobs = [(spec, decode, signature(spec), True) for spec in specs()]
        jobs += [(spec, decode_mma, signature(spec), True) for spec in mma_specs()]
        jobs += [(spec, module, sig, False) for spec, module, sig in others()]
        for spec, module, sig, gated in jobs:
            kernel = module.build(spec)
            fastmath = getattr(kernel, "targetoptions", {}).get("fastmath", False)
            ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=targets[arch], fastmath=fastmath)
            log = ptxas_report(ptx, arch)
            print(json.dumps({
                "key": spec.key, "arch": arch, "threads": spec.threads, "gated": gated,
                "kind": "mma" if module is decode_mma else "simt",
                "head_dim": getattr(spec, "head_dim", 0), "head_dim_v": getattr(spec, "head_dim_v", 0),
                **ptxas_resources(log),
                "ld_v4": ptx.count("ld.global.nc.L1::no_allocate.v4.u32"),
                "shfl": ptx.count("shfl.sync.bfly"),
                "cp_async": ptx.count("cp.async.cg.shared.global"),
                "mma": ptx.count("mma.sync.aligned.m16n8k16"),
                "ldmatrix": ptx.count("ldmatrix.sync.aligned"),
                "shared_bytes": decode.static_shared_bytes(spec) if module is decode else 0,
                "dynamic_shared_bytes": decode_mma.shared_bytes(spec) if module is decode_mma else 0,
            }), flush=True)


if __name__ == "__main__":
    main()
