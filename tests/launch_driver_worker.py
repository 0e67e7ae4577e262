"""Run with a no-op libcuda.so.1 (perf/stub_host_path.py's) first on LD_LIBRARY_PATH:
each launch._Driver kind hands cuLaunchKernel exactly the handle, launch
configuration, stream and ``extra`` array it is given (kernelParams NULL), and reports failures as the
CUresult; prints "ok"."""

import ctypes

import numpy as np

from nbflash import launch

lib = ctypes.CDLL("libcuda.so.1")
lib.fake_last.restype = ctypes.c_ulonglong
lib.fake_calls.restype = ctypes.c_long
arg = launch.DeviceArg(0x7000, (4,), (4,), np.dtype(np.float32), 4, 0, None)
layout = launch.ParamLayout(launch.signature_of([arg, 3]))
for kind in ("cupy", "ctypes"):
    driver = launch._Driver(kind)
    assert driver.kind == kind, driver.kind
    launcher = launch.Launcher(0x1234, layout, 0, "k", driver=driver)
    for go, params in (
        (lambda: launcher((3, 4, 5), (128, 2, 1), 4096, 0x7F00DEADBEEF, [arg, 3]), launcher._extra_addr),
        (lambda b=launcher.bind([arg, 3]): b.fixed((3, 4, 5), (128, 2, 1), 4096)(0x7F00DEADBEEF, 0x8000),
         None),
    ):
        before = lib.fake_calls()
        go()
        assert lib.fake_calls() == before + 1
        got = [lib.fake_last(i) for i in range(11)]
        assert got[:9] == [0x1234, 3, 4, 5, 128, 2, 1, 4096, 0x7F00DEADBEEF], (kind, got)
        assert got[9] == 0 and got[10] != 0 and (params is None or got[10] == params), (kind, got)  # extra
    assert driver.launch_kernel(0xDEAD, 1, 1, 1, 1, 1, 1, 0, 0, 0) == 201  # the fake fails this handle
    assert driver.launch_kernel(0x1234, 1, 1, 1, 1, 1, 1, 0, 0, 0) == 0
print("ok")
