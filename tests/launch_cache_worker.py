"""What the disk cache is made of, checked without a GPU, in a fresh process (run by
tests/test_launch.py with the simulator off, twice, under different hash seeds):
prints one JSON line with the disk-cache key of a fixed specialization and whether the
cubin numba-cuda's own linker returns (for sm_90, linked with nvJitLink) comes out of
launch.cubin_bytes as an ELF image and round-trips through the disk cache."""

import json
import os
import sys

os.environ["NUMBA_ENABLE_CUDASIM"] = "0"

import numpy as np  # noqa: E402
from numba import cuda  # noqa: E402
from numba.cuda.cudadrv import driver  # noqa: E402

from nbflash import launch  # noqa: E402
from nbflash.spec import ForwardSpec  # noqa: E402


def main():
    spec = ForwardSpec("simt", "fp32", 8, 8, True, False, 16, 16, 64)
    arg = launch.DeviceArg(0x1000, (1, 4, 2, 8), (256, 64, 32, 4), np.dtype(np.float32), 64, 0, None)
    sig = launch.signature_of([arg, arg, np.float32(0.5), 2])
    key = launch._disk_key(spec.key, sig, (9, 0))

    def kernel(a, b, s, n):
        i = cuda.grid(1)
        if i < n:
            b[0, 0, 0, i] = a[0, 0, 0, i] * s

    ptx, _ = cuda.compile_ptx(kernel, launch.numba_types(sig), cc=(9, 0))
    linker = driver._Linker(cc=(9, 0))
    linker.add_ptx(ptx.encode())
    raw = linker.complete()  # what CUDACodeLibrary.get_cubin hands out

    class Library:  # the part of CUDACodeLibrary that launch._numba_compile reads
        _entry_name = "kernel"

        def get_cubin(self, cc=None):
            return raw

    cubin = launch.library_cubin(Library())  # the very call _numba_compile makes
    assert cubin is not None, "numba-cuda's cubin has no bytes to store"
    stored = launch.disk_write(key, "kernel", (8, 8), cubin)
    back = launch.disk_read(key, (8, 8))
    print(json.dumps({
        "key": key, "raw_type": type(raw).__name__, "elf": cubin[:4] == b"\x7fELF",
        "stored": stored, "read_back": back is not None and back[1] == cubin,
    }))


if __name__ == "__main__":
    sys.exit(main())
