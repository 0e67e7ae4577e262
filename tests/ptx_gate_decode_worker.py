"""Compile the shipped split-KV decoding specializations (tuning.DECODE_GATE) for a
real GPU target without a GPU, link them with nvJitLink (ptxas -v) and print one JSON
line per kernel with its resources. Run by tests/test_ptx_gate_decode.py in a
subprocess with the simulator off."""

import json
import os
import re
import sys

os.environ["NUMBA_ENABLE_CUDASIM"] = "0"

from numba import cuda  # noqa: E402
from numba.cuda import types  # noqa: E402

from nbflash import tuning  # noqa: E402
from nbflash.kernels import decode  # noqa: E402
from nbflash.spec import DecodeSpec  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from ptx_gate_worker import ptxas_report  # noqa: E402

STORAGE = {"fp16": types.float16, "bf16": types.uint16, "fp32": types.float32}


def signature(spec: DecodeSpec):
    arr = lambda t, n: types.Array(t, n, "A")  # noqa: E731
    cache_t = types.uint16 if spec.vectorized and spec.dtype in ("fp16", "bf16") else STORAGE[spec.dtype]
    if spec.split:
        results = (arr(types.float32, 5), arr(types.float32, 4))
    else:
        results = (arr(STORAGE[spec.dtype], 4), arr(types.float32, 3))
    return (arr(STORAGE[spec.dtype], 4), arr(cache_t, 4), arr(cache_t, 4), arr(types.int32, 2),
            arr(types.int32, 1), types.int64, *results, types.float32, types.int64, types.int64)


def specs():
    itemsize = {"fp16": 2, "bf16": 2, "fp32": 4}
    for dtype, head_dim, rows, block_size, causal, split, with_lse in tuning.DECODE_GATE:
        rows_cap, threads, unroll = tuning.decode_tiles(itemsize[dtype], head_dim, head_dim, rows, True, False)
        assert rows_cap == rows, (dtype, head_dim, rows)
        yield DecodeSpec(dtype, head_dim, head_dim, rows, causal, block_size, True, split, with_lse, threads, unroll)


def main():
    targets = {"sm_80": (8, 0), "sm_90a": (9, 0, "a")}  # the test runs sm_90a only (time)
    for arch in sys.argv[1:] or targets:
        for spec in specs():
            ptx, _ = cuda.compile_ptx(decode.build(spec).py_func, signature(spec), cc=targets[arch])
            log = ptxas_report(ptx, arch)
            grab = lambda pattern: int(re.search(pattern, log).group(1))  # noqa: E731
            print(json.dumps({
                "key": spec.key, "arch": arch, "threads": spec.threads,
                "registers": grab(r"Used (\d+) registers"),
                "stack": grab(r"(\d+) bytes stack frame"),
                "spill_stores": grab(r"(\d+) bytes spill stores"),
                "spill_loads": grab(r"(\d+) bytes spill loads"),
                "ld_v4": ptx.count("ld.global.nc.L1::no_allocate.v4.u32"),
                "shfl": ptx.count("shfl.sync.bfly"),
                "shared_bytes": decode.static_shared_bytes(spec),
            }), flush=True)


if __name__ == "__main__":
    main()
