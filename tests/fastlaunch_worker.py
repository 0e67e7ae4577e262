"""Run with a no-op libcuda.so.1 (perf/stub_host_path.py's) first on LD_LIBRARY_PATH and
$NBFLASH_FASTLAUNCH_SO naming a build of src/nbflash/_fastlaunch.c: the C prepared
launch hands cuLaunchKernel the handle, configuration, stream and parameter block that
the Python launch would, retries once in the primary context, raises LaunchError
after that, and refuses malformed calls; prints "ok"."""

import ctypes
import importlib.util
import os
import sys
import threading

import numpy as np

spec = importlib.util.spec_from_file_location("nbflash._fastlaunch", os.environ["NBFLASH_FASTLAUNCH_SO"])
module = importlib.util.module_from_spec(spec)
sys.modules["nbflash._fastlaunch"] = module
spec.loader.exec_module(module)

from nbflash import launch  # noqa: E402  (after the extension is in place)

lib = ctypes.CDLL("libcuda.so.1")
lib.fake_last.restype = ctypes.c_ulonglong
lib.fake_calls.restype = ctypes.c_long
lib.fake_block.restype = ctypes.c_size_t
lib.fake_record_blocks(1)


def last_block():
    out = ctypes.create_string_buffer(4096)
    n = lib.fake_block(out)
    return out.raw[:n]


def expected(layout, args):
    buffer, _ = layout.new_buffer()
    layout.pack(buffer, args)
    return layout.block(buffer)


assert launch.fast_launch() is module and module.driver_available()
driver = launch._Driver()
assert driver.kind == "c" and driver.prepared is module.PreparedLaunch, driver.kind

f16, f32 = np.dtype(np.float16), np.dtype(np.float32)
a = launch.DeviceArg(0x7000, (2, 3, 4, 8), (192, 64, 16, 2), f16, 192, 0, None)
b = launch.DeviceArg(0x7100, (5, 8), (8, 1), f16, 40, 0, None)
lse = launch.DeviceArg(0x9000, (2, 4, 3), (48, 12, 4), f32, 24, 0, None)
args = [a, b, np.float32(0.5), lse, 7]
layout = launch.ParamLayout(launch.signature_of(args))
launcher = launch.Launcher(0x1234, layout, 0, "k", driver=driver)
go = launcher.bind(args).fixed((3, 4, 5), (128, 2, 1), 4096, varying=2)  # lse keeps its packed pointer
assert type(go) is module.PreparedLaunch and go.nslots == 2
assert go.config == ((3, 4, 5), (128, 2, 1), 4096)

moved = [launch.DeviceArg(0xA000, a.shape, a.strides, f16, 192, 0, None),
         launch.DeviceArg(0xFFFF_FFFF_FFFF_F000, b.shape, b.strides, f16, 40, 0, None), np.float32(0.5), lse, 7]
want = expected(layout, moved)
assert go.block(0xA000, 0xFFFF_FFFF_FFFF_F000) == want
before = lib.fake_calls()
assert go(0x7F00DEADBEEF, 0xA000, 0xFFFF_FFFF_FFFF_F000) is None
assert lib.fake_calls() == before + 1
got = [lib.fake_last(i) for i in range(11)]
assert got[:9] == [0x1234, 3, 4, 5, 128, 2, 1, 4096, 0x7F00DEADBEEF], got
assert got[9] == 0 and got[10] != 0, got  # kernelParams NULL, the block through extra
assert last_block() == want
go.repeat(3, 0x51, 0xA000, 0xFFFF_FFFF_FFFF_F000)
assert lib.fake_calls() == before + 4 and last_block() == want and lib.fake_last(8) == 0x51

# the packed block is never written: a call's pointers do not leak into the next
assert go.block(0xB000, 0xC000) != want
go(0, 0xB000, 0xC000)
assert last_block() == expected(layout, [launch.DeviceArg(0xB000, a.shape, a.strides, f16, 192, 0, None),
                                         launch.DeviceArg(0xC000, b.shape, b.strides, f16, 40, 0, None),
                                         np.float32(0.5), lse, 7])

# threads launching at once: each call copies the block, so none waits on or corrupts another
errors = []


def hammer(base):
    try:
        for i in range(2000):
            go(0, base + 16 * i, base + 16 * i + 8)
    except Exception as error:  # reported below
        errors.append(error)


lib.fake_record_blocks(0)  # the stand-in driver's record is not thread safe
before = lib.fake_calls()
threads = [threading.Thread(target=hammer, args=(0x1_0000_0000 * (t + 1),)) for t in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert not errors and lib.fake_calls() == before + 8000, (errors, lib.fake_calls() - before)
lib.fake_record_blocks(1)

# failures: CUresult 201 (no current context) retries once in the primary context
made_current = []
launch._make_context_current = made_current.append
failing = launch.Launcher(0xDEAD, layout, 3, "k", driver=driver)
go_fail = failing.bind(args).fixed((1, 1, 1), (32, 1, 1), 0, varying=2)
before = lib.fake_calls()
try:
    go_fail(0, 0xA000, 0xB000)
except launch.LaunchError as error:
    assert "CUresult 201" in str(error), error
else:
    raise AssertionError("a failing launch did not raise")
assert made_current == [3] and lib.fake_calls() == before + 2
# the retry (Python's Bound) wrote the call's pointers and kept the fixed one
assert last_block() == expected(layout, [launch.DeviceArg(0xA000, a.shape, a.strides, f16, 192, 0, None),
                                         launch.DeviceArg(0xB000, b.shape, b.strides, f16, 40, 0, None),
                                         np.float32(0.5), lse, 7])

# malformed calls are refused before the driver
before = lib.fake_calls()
for bad in ((0, 0xA000), (0, 0xA000, 0xB000, 0xC000), (0, 0xA000, "x"), (0, -1, 0xB000), (None, 1, 2),
            (0, 2**64, 0xB000)):
    try:
        go(*bad)
    except (TypeError, OverflowError):
        pass
    else:
        raise AssertionError(f"{bad} was launched")
assert lib.fake_calls() == before
# what has __index__ passes as the Python launch's memoryview store takes it
go(np.uint64(0x51), np.uint64(0xA000), np.int64(0xB000))
assert lib.fake_last(8) == 0x51 and go.block(np.uint64(0xA000), 0xB000) == go.block(0xA000, 0xB000)
for kwargs in ({"grid": (1, 1)}, {"grid": (0, 1, 1)}, {"slots": (10**6,)}, {"on_failure": 3},
               {"slots": (sys.maxsize,)}, {"slots": (2**61 - 1,)}, {"slots": (8,)}, {"slots": (-1,)},
               {"shared": -1}, {"shared": 2**32 + 5}, {"function": -1}, {"function": 2**64}):
    config = dict(function=1, grid=(1, 1, 1), block=(32, 1, 1), shared=0, block_bytes=bytes(64), slots=(0,),
                  on_failure=print)
    config.update(kwargs)
    try:
        module.PreparedLaunch(**config)
    except (TypeError, ValueError, OverflowError):
        pass
    else:
        raise AssertionError(f"PreparedLaunch accepted {kwargs}")
print("ok")
