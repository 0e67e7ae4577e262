"""Check nbflash's parameter packing against Numba's own, without a GPU: for a set of
argument lists, pack them with nbflash.launch.ParamLayout and with numba-cuda's
dispatcher (_Kernel._prepare_args on real DeviceNDArrays over fake device memory),
and compile a kernel for the same types to read the parameter sizes its PTX entry
declares. Prints one JSON line per case. Run by tests/test_launch.py in a subprocess
with the simulator off."""

import ctypes
import json
import os
import re
import struct
import sys

os.environ["NUMBA_ENABLE_CUDASIM"] = "0"

import numpy as np  # noqa: E402
from numba import cuda  # noqa: E402
from numba.cuda.cudadrv.devicearray import DeviceNDArray  # noqa: E402
from numba.cuda.dispatcher import _Kernel  # noqa: E402

from nbflash import launch  # noqa: E402

PTX_BYTES = {"u64": 8, "b64": 8, "s64": 8, "f64": 8, "u32": 4, "b32": 4, "s32": 4, "f32": 4,
             "u16": 2, "b16": 2, "s16": 2, "f16": 2, "u8": 1, "b8": 1, "s8": 1}


class FakeMemory:
    """Stands in for device memory: Numba only reads the pointer."""

    def __init__(self, ptr):
        self.device_ctypes_pointer = ctypes.c_void_p(ptr)


def device_array(shape, strides, dtype, ptr):
    arr = DeviceNDArray(shape, strides, np.dtype(dtype), gpu_data=FakeMemory(ptr))
    arr.nbflash_desc = (ptr, shape, strides)  # what a CuPy array would report
    return arr


def nbflash_arg(arr):
    ptr, shape, strides = arr.nbflash_desc
    return launch.DeviceArg(ptr, shape, strides, arr.dtype, int(np.prod(shape)), 0, arr)


def numba_slots(types_, values):
    """Numba's kernel arguments as 8-byte slots, converted the way cuda.core converts
    them (Python int -> intptr_t, bool -> bool, ctypes values as their bytes)."""
    class Self:
        extensions = []

    kernelargs = []
    for ty, val in zip(types_, values):
        _Kernel._prepare_args(Self(), ty, val, 0, [], kernelargs)
    slots = []
    for a in kernelargs:
        if isinstance(a, bool):
            raw = struct.pack("<?", a)
        elif isinstance(a, int):
            raw = struct.pack("<q", a) if a < 2**63 else struct.pack("<Q", a)
        else:
            raw = bytes(a)
        slots.append(raw.ljust(8, b"\0"))
    return b"".join(slots)


def cases():
    yield "fp16 4-D strided + scalars", [
        device_array((2, 5, 3, 8), (480, 48, 16, 2), np.float16, 0x7F0000001000),  # bhsd-like view
        device_array((2, 5, 3, 8), (240, 48, 16, 2), np.uint16, 0x7F0000002000),  # C
        np.float32(0.125), 3,
    ]
    yield "fp32 2-D F and 1-D, float64 and int64 scalars", [
        device_array((4, 6), (4, 16), np.float32, 0x7F0000003000),  # F
        device_array((7,), (8,), np.float32, 0x7F0000004000),  # strided 1-D
        1.5, np.float64(-2.25), np.int64(-7),
    ]
    yield "fp64 3-D, broadcast and size-1 dims", [
        device_array((3, 1, 5), (40, 0, 8), np.float64, 0x7F0000005000),
        device_array((3, 4, 5), (0, 40, 8), np.float64, 0x7F0000006000),  # broadcast: A
        device_array((3, 1, 5), (40, 123456, 8), np.float64, 0x7F0000007000),  # size-1 dim, odd stride: C
        np.int32(-5), np.uint32(7), True, np.float16(0.333),
    ]
    yield "forward kernel arguments", [
        device_array((1, 128, 8, 64), (131072, 1024, 128, 2), np.uint16, 0x7F0000010000),
        device_array((1, 128, 8, 64), (131072, 1024, 128, 2), np.uint16, 0x7F0000020000),
        device_array((1, 128, 8, 64), (131072, 128, 16384, 2), np.uint16, 0x7F0000030000),
        device_array((1, 128, 8, 64), (131072, 1024, 128, 2), np.uint16, 0x7F0000040000),
        device_array((1, 1, 1), (4, 4, 4), np.float32, 0x7F0000050000),
        np.float32(0.125), 1,
    ]


def main():
    for name, values in cases():
        args = [nbflash_arg(v) if isinstance(v, DeviceNDArray) else v for v in values]
        sig = launch.signature_of(args)
        ours = launch.numba_types(sig)
        params = ", ".join(f"a{i}" for i in range(len(values)))
        namespace = {}
        exec(f"def kernel({params}):\n    pass\n", namespace)
        dispatcher = cuda.jit(namespace["kernel"])
        numba_types = tuple(dispatcher.typeof_pyval(v) for v in values)  # Numba's own argument typing
        layout = launch.ParamLayout(sig)
        buffer, _ = layout.new_buffer()
        layout.pack(buffer, args)
        block = layout.block(buffer)
        # each parameter's bytes: ours at its offset in the block, Numba's in its 8-byte slot
        packed = b"".join(block[o:o + n] for o, n in zip(layout.param_offsets, layout.param_sizes))
        slots = numba_slots(numba_types, values)
        expected = b"".join(slots[8 * i:8 * i + n] for i, n in enumerate(layout.param_sizes))

        ptx, _ = cuda.compile_ptx(namespace["kernel"], ours, cc=(8, 0))
        entry = ptx[ptx.index(".entry"):]
        entry = entry[: entry.index(")")]
        declared = [PTX_BYTES[t] for t in re.findall(r"\.param\s+\.(\w+)", entry)]
        print(json.dumps({
            "case": name,
            "types_match": [str(t) for t in ours] == [str(t) for t in numba_types],
            "ours": [str(t) for t in ours], "numba": [str(t) for t in numba_types],
            "bytes_match": packed == expected,
            "packed": packed.hex(), "numba_packed": expected.hex(),
            "param_sizes": list(layout.param_sizes), "ptx_param_sizes": declared,
            "data_slots_hold_pointers": [
                struct.unpack_from("<Q", block, 8 * i)[0] for i in layout.data_slots
            ] == [v.device_ctypes_pointer.value for v in values if isinstance(v, DeviceNDArray)],
            # natural alignment, as the PTX entry's parameter space lays them out
            "offsets_aligned": all(o % n == 0 for o, n in zip(layout.param_offsets, layout.param_sizes))
            and all(a + n <= b for a, n, b in zip(layout.param_offsets, layout.param_sizes,
                                                   layout.param_offsets[1:] + (layout.size,))),
        }), flush=True)


if __name__ == "__main__":
    sys.exit(main())
