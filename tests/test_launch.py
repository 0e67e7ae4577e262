"""The launcher: parameter packing identical to Numba's, the disk cache of compiled
kernels, stream handles, compile-once under threads, and (GPU tier) the fast launch
path giving what Numba's launch gives."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import nbflash
from helpers import assert_close, assert_lse_close, draw_shape, new_rng, random_array, to_device, to_host
from nbflash import launch


# --- Parameter packing against Numba's own (no GPU needed) ---------------------


@pytest.fixture(scope="module")
def abi_rows():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    src = os.path.join(os.path.dirname(__file__), "..", "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    worker = os.path.join(os.path.dirname(__file__), "launch_abi_worker.py")
    done = subprocess.run([sys.executable, worker], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(rows) >= 4, done.stdout
    return rows


def test_signature_types_are_numbas_argument_types(abi_rows):
    for r in abi_rows:
        assert r["types_match"], (r["case"], r["ours"], r["numba"])


def test_packed_parameters_are_byte_identical_to_numbas(abi_rows):
    for r in abi_rows:
        assert r["bytes_match"], (r["case"], r["packed"], r["numba_packed"])
        assert r["data_slots_hold_pointers"], r["case"]
        assert r["offsets_aligned"], r["case"]


def test_parameter_sizes_are_the_ones_the_ptx_entry_declares(abi_rows):
    for r in abi_rows:
        assert r["param_sizes"] == r["ptx_param_sizes"], r["case"]


def test_layout_letter_follows_numbas_contiguity_rules():
    # C- and F-contiguous, size-1 axes with any stride, broadcast (zero stride), empty
    assert launch.array_layout((2, 3, 4), (24, 8, 2), 2) == "C"
    assert launch.array_layout((2, 3, 4), (2, 4, 12), 2) == "F"
    assert launch.array_layout((2, 1, 4), (8, 999, 2), 2) == "C"
    assert launch.array_layout((2, 3, 4), (48, 8, 2), 2) == "A"
    assert launch.array_layout((2, 1, 4), (8, 0, 2), 2) == "A"
    assert launch.array_layout((2, 0, 4), (0, 8, 2), 2) == "C"
    assert launch.array_layout((5,), (2,), 2) == "C"
    assert launch.array_layout((5,), (4,), 2) == "A"


def test_unsupported_arguments_leave_the_fast_path():
    arg = launch.DeviceArg(0x1000, (4,), (4,), np.dtype(np.float32), 4, 0, None)
    assert launch.signature_of([arg, np.float32(1), 3]) is not None
    assert launch.signature_of([arg, 1j]) is None
    assert launch.signature_of([arg, [1, 2]]) is None
    assert launch.signature_text(launch.signature_of([arg, np.float32(1), 3, True])) == "f4[1C],float32,int64,boolean"


def test_device_arg_exposes_a_stream_free_cuda_array_interface():
    arg = launch.DeviceArg(0x1000, (2, 3), (12, 4), np.dtype(np.float32), 6, 0, None)
    iface = arg.__cuda_array_interface__
    assert iface["data"] == (0x1000, False) and iface["shape"] == (2, 3) and iface["strides"] == (12, 4)
    assert "stream" not in iface  # Numba would synchronize on a stream it is given


class RecordingDriver:
    """Stands in for libcuda's cuLaunchKernel as launch._Driver calls it (plain ints,
    returning the CUresult, as the ctypes driver does): reads the parameter block
    through the ``extra`` array the way the driver does (buffer pointer, pointer to its
    size, end), and answers with the queued result codes."""

    kind = "recording"

    def __init__(self, size, results=()):
        self.size = size
        self.results = list(results)
        self.calls = []

    def launch_kernel(self, handle, gx, gy, gz, bx, by, bz, shared, stream, extra):
        import ctypes

        for arg in (handle, gx, gy, gz, bx, by, bz, shared, stream, extra):
            assert type(arg) is int  # what CuPy's launchKernel takes as C integers
        words = ctypes.cast(extra, ctypes.POINTER(ctypes.c_uint64))
        assert (words[0], words[2], words[4]) == (1, 2, 0)  # BUFFER_POINTER, BUFFER_SIZE, END
        size = ctypes.c_size_t.from_address(words[3]).value
        assert size == self.size
        values = ctypes.string_at(words[1], size)
        self.calls.append(((handle, (gx, gy, gz), (bx, by, bz), shared, stream), values))
        return self.results.pop(0) if self.results else 0


class FakeDriverError(Exception):
    def __init__(self, status):
        super().__init__(f"CUresult {status}")
        self.status = status


class RaisingRecordingDriver(RecordingDriver):
    """The same, shaped like CuPy's launchKernel: ``raw`` takes an 11th argument
    (extra) and raises ``error`` (with ``.status``) instead of returning a code."""

    kind = "recording-raising"
    error = FakeDriverError

    def raw(self, handle, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        assert params == 0  # kernelParams NULL: the block goes through extra
        rc = RecordingDriver.launch_kernel(self, handle, gx, gy, gz, bx, by, bz, shared, stream, extra)
        if rc:
            raise FakeDriverError(rc)

    def launch_kernel(self, *args):
        try:
            self.raw(*args[:-1], 0, args[-1])
        except FakeDriverError as error:
            return error.status
        return 0


DRIVERS = [RecordingDriver, RaisingRecordingDriver]


def expected_params(layout, args):
    buffer, _ = layout.new_buffer()
    layout.pack(buffer, args)
    return layout.block(buffer)


@pytest.mark.parametrize("driver", DRIVERS, ids=lambda d: d.kind)
def test_launcher_hands_the_driver_every_parameter_and_bound_swaps_only_pointers(driver, monkeypatch):
    f16, f32 = np.dtype(np.float16), np.dtype(np.float32)
    a = launch.DeviceArg(0x7000, (2, 3, 4, 8), (192, 64, 16, 2), f16, 192, 0, None)
    lse = launch.DeviceArg(0x9000, (2, 4, 3), (48, 12, 4), f32, 24, 0, None)
    args = [a, lse, np.float32(0.5), 2]
    layout = launch.ParamLayout(launch.signature_of(args))
    fake = driver(layout.size)
    monkeypatch.setattr(launch, "_driver", fake)
    launcher = launch.Launcher(0xBEEF, layout, 0, "kernel")
    launcher((3, 4, 2), (128, 1, 1), 1024, 0x51, args)
    (config, values), = fake.calls
    assert config == (0xBEEF, (3, 4, 2), (128, 1, 1), 1024, 0x51)
    assert values == expected_params(layout, args)

    bound = launcher.bind(args)
    bound((1, 1, 1), (128, 1, 1), 0, 0, (0xA000, 0xB000))
    moved = [launch.DeviceArg(0xA000, a.shape, a.strides, f16, 192, 0, None),
             launch.DeviceArg(0xB000, lse.shape, lse.strides, f32, 24, 0, None), np.float32(0.5), 2]
    assert fake.calls[-1][1] == expected_params(layout, moved)

    go = bound.fixed((5, 6, 7), 128, 2048)  # the plans' one-frame launch
    go(0x77, 0xC000, 0xD000)
    moved = [launch.DeviceArg(0xC000, a.shape, a.strides, f16, 192, 0, None),
             launch.DeviceArg(0xD000, lse.shape, lse.strides, f32, 24, 0, None), np.float32(0.5), 2]
    assert fake.calls[-1] == ((0xBEEF, (5, 6, 7), (128, 1, 1), 2048, 0x77), expected_params(layout, moved))

    go = launcher.bind(args).fixed((5, 6, 7), 128, 2048, varying=1)  # lse keeps its packed pointer
    go(0x78, 0xE000)
    moved = [launch.DeviceArg(0xE000, a.shape, a.strides, f16, 192, 0, None), lse, np.float32(0.5), 2]
    assert fake.calls[-1] == ((0xBEEF, (5, 6, 7), (128, 1, 1), 2048, 0x78), expected_params(layout, moved))


@pytest.mark.parametrize("driver", DRIVERS, ids=lambda d: d.kind)
def test_launcher_retries_once_in_the_primary_context_then_raises(driver, monkeypatch):
    arg = launch.DeviceArg(0x7000, (4,), (4,), np.dtype(np.float32), 4, 0, None)
    layout = launch.ParamLayout(launch.signature_of([arg]))
    fake = driver(layout.size, results=[201, 0])
    monkeypatch.setattr(launch, "_driver", fake)
    made_current = []
    monkeypatch.setattr(launch, "_make_context_current", made_current.append)
    launcher = launch.Launcher(1, layout, 0, "kernel")
    launcher((1, 1, 1), (32, 1, 1), 0, 0, [arg])
    assert made_current == [0] and len(fake.calls) == 2
    fake.results = [201, 201]
    with pytest.raises(launch.LaunchError, match="CUresult 201"):
        launcher((1, 1, 1), (32, 1, 1), 0, 0, [arg])
    fake.results = [1]
    with pytest.raises(launch.LaunchError, match="CUresult 1"):
        launcher.bind([arg])((1, 1, 1), (32, 1, 1), 0, 0, (0x8000,))
    bound = launcher.bind([arg])
    go = bound.fixed((1, 1, 1), (32, 1, 1), 0)
    fake.results, made_current[:] = [201, 0], []
    go(0, 0x8000)
    assert made_current == [0] and fake.calls[-1][0][4] == 0
    fake.results = [1]
    with pytest.raises(launch.LaunchError, match="CUresult 1"):
        go(0, 0x8000)
    assert not bound._lock.locked(), "a failed launch kept the parameter block's lock"
    go = launcher.bind([arg]).fixed((1, 1, 1), (32, 1, 1), 0, varying=0)  # the retry keeps the packed pointer
    fake.results, made_current[:] = [201, 0], []
    go(0)
    assert made_current == [0] and fake.calls[-1][1] == fake.calls[-2][1] == expected_params(layout, [arg])


def test_a_failing_fast_path_falls_back_to_numbas_launch_and_says_so_once(monkeypatch, caplog):
    arg = launch.DeviceArg(0x7000, (4,), (4,), np.dtype(np.float32), 4, 0, None)

    def kernel():
        pass

    def broken(*a):
        raise RuntimeError("no driver")

    monkeypatch.setattr(launch, "_get_driver", broken)
    monkeypatch.setattr(launch, "_launchers", {})
    monkeypatch.setattr(launch, "_warned", set())
    monkeypatch.setattr(launch.device, "SIMULATOR", False)
    with caplog.at_level("WARNING", logger="nbflash"):
        assert launch.launcher_for(kernel, [arg]) is None
        assert launch.launcher_for(kernel, [arg]) is None
    assert sum("fast launch unavailable" in r.message for r in caplog.records) == 1


def test_a_launcher_is_never_reused_for_a_new_kernel_at_a_freed_kernels_id(monkeypatch):
    """Launchers are keyed by id(kernel): a kernel that got one stays alive, so a kernel
    made later (perf/probe_wgmma builds one per call) can never take its id and launch
    its code."""
    arg = launch.DeviceArg(0x7000, (4,), (4,), np.dtype(np.float32), 4, 0, None)
    prepared = []  # one launcher (a fresh token) per kernel; no reference to the kernel kept here
    monkeypatch.setattr(launch, "_prepare", lambda *a: prepared.append(object()) or prepared[-1])
    monkeypatch.setattr(launch, "_launchers", {})
    monkeypatch.setattr(launch, "_held_kernels", {})
    monkeypatch.setattr(launch.device, "SIMULATOR", False)

    def new_kernel():
        def kernel():
            pass
        return kernel

    for i in range(200):  # freed objects' ids come back quickly in CPython
        kernel = new_kernel()
        assert launch.launcher_for(kernel, [arg]) is prepared[-1], f"kernel {i} got an older kernel's launcher"
        del kernel
    assert len(prepared) == 200


# --- Streams -------------------------------------------------------------------


def test_stream_handles_from_every_kind_of_stream():
    class CupyLike:
        ptr = 0xABC

    class Protocol:
        def __cuda_stream__(self):
            return (0, 0xDEF)

    class NumbaLike:
        class handle:
            value = 0x123

    assert launch.stream_handle(7) == 7
    assert launch.stream_handle(CupyLike()) == 0xABC
    assert launch.stream_handle(Protocol()) == 0xDEF
    assert launch.stream_handle(NumbaLike()) == 0x123
    with pytest.raises(TypeError, match="stream: expected"):
        launch.stream_handle("default")


def test_attention_refuses_a_bad_stream_before_anything_runs():
    rng, _ = new_rng()
    q, k, v = (to_device(random_array(rng, (1, 3, 2, 4), np.float32)) for _ in range(3))
    out = to_device(np.full((1, 3, 2, 4), np.nan, np.float32))
    with pytest.raises(TypeError, match="stream: expected"):
        nbflash.attention(q, k, v, out=out, stream="default")
    assert np.isnan(to_host(out)).all()


# --- Disk cache ------------------------------------------------------------------


@pytest.fixture
def cache_in(tmp_path, monkeypatch):
    monkeypatch.setenv("NBFLASH_CACHE_DIR", str(tmp_path / "kernels"))
    return tmp_path / "kernels"


def test_disk_cache_writes_and_reads_back(cache_in):
    cubin = os.urandom(300)
    assert launch.disk_write("key-a", "_Z6kernel", (8, 8, 4), cubin)
    assert launch.disk_read("key-a", (8, 8, 4)) == ("_Z6kernel", cubin)
    assert launch.disk_read("key-b", (8, 8, 4)) is None  # another specialization
    assert launch.disk_read("key-a", (8, 8, 8)) is None  # another parameter layout
    assert [p.suffix for p in cache_in.iterdir()] == [".cubin"]  # no temporary left behind


def test_disk_cache_ignores_corrupt_and_truncated_files(cache_in):
    cubin = os.urandom(300)
    assert launch.disk_write("key-a", "_Z6kernel", (8,), cubin)
    (path,) = cache_in.iterdir()
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # one flipped byte
    assert launch.disk_read("key-a", (8,)) is None
    path.write_bytes(data[: len(data) // 2])  # truncated
    assert launch.disk_read("key-a", (8,)) is None
    path.write_bytes(b"garbage")
    assert launch.disk_read("key-a", (8,)) is None
    assert launch.disk_write("key-a", "_Z6kernel", (8,), cubin)  # rewritten over it
    assert launch.disk_read("key-a", (8,)) == ("_Z6kernel", cubin)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes to read-only directories")
def test_disk_cache_in_a_read_only_directory_is_silently_skipped(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        monkeypatch.setenv("NBFLASH_CACHE_DIR", str(ro / "kernels"))
        assert launch.disk_write("key-a", "_Z6kernel", (8,), b"cubin") is False
        assert launch.disk_read("key-a", (8,)) is None
        monkeypatch.setenv("NBFLASH_CACHE_DIR", str(ro))
        assert launch.disk_write("key-a", "_Z6kernel", (8,), b"cubin") is False
    finally:
        ro.chmod(stat.S_IRWXU)


def test_disk_cache_that_refuses_every_write_is_silently_skipped(cache_in, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    assert launch.disk_write("key-a", "_Z6kernel", (8,), b"cubin") is False
    monkeypatch.setattr(os, "makedirs", refuse)
    assert launch.disk_write("key-a", "_Z6kernel", (8,), b"cubin") is False
    assert launch.disk_read("key-a", (8,)) is None


def test_disk_cache_path_that_is_a_file_or_turned_off_is_silently_skipped(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("NBFLASH_CACHE_DIR", str(blocker))
    assert launch.disk_write("key-a", "_Z6kernel", (8,), b"cubin") is False
    assert launch.disk_read("key-a", (8,)) is None
    monkeypatch.setenv("NBFLASH_CACHE_DIR", "")
    assert launch.cache_dir() is None
    assert launch.disk_write("key-a", "_Z6kernel", (8,), b"cubin") is False


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("NBFLASH_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert launch.cache_dir() == os.path.join(str(tmp_path), "nbflash")


def test_disk_key_names_versions_source_arch_spec_and_signature():
    arg = launch.DeviceArg(0x1000, (4,), (4,), np.dtype(np.float32), 4, 0, None)
    sig = launch.signature_of([arg, np.float32(1)])
    key = launch._disk_key("fwd_simt-fp32-d8", sig, (9, 0))
    assert f"nbflash {nbflash.__version__}" in key and "numba-cuda " in key
    assert "sm_90" in key and "fwd_simt-fp32-d8" in key and "f4[1C],float32" in key
    assert launch._source_digest() in key
    assert launch._disk_key("fwd_simt-fp32-d8", sig, (8, 0)) != key


def _cache_worker(seed, cache):
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0", PYTHONHASHSEED=str(seed), NBFLASH_CACHE_DIR=str(cache))
    src = os.path.join(os.path.dirname(__file__), "..", "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    worker = os.path.join(os.path.dirname(__file__), "launch_cache_worker.py")
    done = subprocess.run([sys.executable, worker], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_disk_cache_key_is_the_same_in_every_process_and_numbas_cubin_is_stored(tmp_path):
    # Two fresh processes with different str-hash seeds: the key a process writes under
    # must be the key the next one reads under. And the cubin numba-cuda's linker
    # returns (a cuda.core ObjectCode since 0.2x, not bytes) must reach the disk: it
    # once failed to hash inside disk_write, was dropped silently, and every new
    # process compiled again.
    first, second = _cache_worker(1, tmp_path), _cache_worker(2, tmp_path)
    assert first["key"] == second["key"]
    for row in (first, second):
        assert row["elf"] and row["stored"] and row["read_back"], row


def test_cubin_bytes_takes_bytes_and_cuda_core_object_code_and_refuses_the_rest(tmp_path):
    class ObjectCodeLike:  # cuda.core.ObjectCode's interface: .code is bytes or a path
        def __init__(self, code):
            self.code = code

    elf = b"\x7fELF" + os.urandom(64)
    assert launch.cubin_bytes(elf) == elf and launch.cubin_bytes(bytearray(elf)) == elf
    assert launch.cubin_bytes(ObjectCodeLike(elf)) == elf
    path = tmp_path / "k.cubin"
    path.write_bytes(elf)
    assert launch.cubin_bytes(ObjectCodeLike(str(path))) == elf
    with pytest.raises(TypeError, match="has no bytes"):
        launch.cubin_bytes(object())
    with pytest.raises(TypeError, match="cubin: expected bytes"):
        launch.disk_write("key-a", "_Z6kernel", (8,), ObjectCodeLike(elf))  # never a silent miss


# --- Threads -----------------------------------------------------------------


def test_two_threads_on_one_new_signature_compile_once_and_both_are_right(monkeypatch):
    from nbflash.kernels import forward_simt

    rng, seed = new_rng()
    head_dim = 5  # a signature no other test compiles first in this process
    calls = []
    real_build = forward_simt.build

    def slow_build(spec):
        calls.append(spec.key)
        time.sleep(0.2)  # widen the window in which a second thread could also build
        return real_build(spec)

    monkeypatch.setattr(forward_simt, "build", slow_build)
    dtype = np.dtype(np.float32)
    shape = (1, 3, 2, head_dim)
    inputs = [[random_array(rng, shape, dtype) for _ in range(3)] for _ in range(2)]
    spec = nbflash.forward_spec(*(to_device(a) for a in inputs[0]), causal=True)
    monkeypatch.setattr(launch, "_kernels", {k: v for k, v in launch._kernels.items() if k != spec.key})

    results = [None, None]
    errors = []
    start = threading.Barrier(2)

    def worker(i):
        try:
            start.wait()
            results[i] = to_host(nbflash.attention(*(to_device(a) for a in inputs[i]), causal=True))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert calls == [spec.key], f"built {len(calls)} times"
    for i in range(2):
        ref = nbflash.reference.attention(*inputs[i], causal=True)
        assert_close(results[i], ref, dtype, seed=seed)


# --- GPU tier ----------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float16, "bf16", np.float32, np.float64], ids=str)
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_fast_launch_gives_what_numbas_launch_gives(dtype, layout, monkeypatch):
    import cupy
    import ml_dtypes

    dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bf16" else np.dtype(dtype)
    rng, seed = new_rng()
    shape = draw_shape(rng, large=True, head_dim=int(rng.choice([32, 64, 96, 128, 40])))
    q, k, v = (to_device(random_array(rng, s, dtype)) for s in shape.qkv_shapes(layout))
    causal = bool(rng.integers(2))
    fast, fast_lse = nbflash.attention(q, k, v, causal=causal, layout=layout, return_lse=True)
    fast, fast_lse = nbflash.attention(q, k, v, causal=causal, layout=layout, return_lse=True)  # memoized
    sig_count = sum(1 for v_ in launch._launchers.values() if v_ is not launch._NUMBA)
    assert sig_count > 0, "the fast launcher was never made"
    with monkeypatch.context() as m:
        m.setattr(launch, "launcher_for", lambda *a, **k: None)  # Numba's launch only
        plan_module = nbflash.plans
        m.setattr(plan_module, "memoized_attention", lambda *a, **k: None)
        m.setattr(plan_module, "remember", lambda *a, **k: None)
        slow, slow_lse = nbflash.attention(q, k, v, causal=causal, layout=layout, return_lse=True)
    cupy.cuda.get_current_stream().synchronize()
    assert np.array_equal(to_host(fast).view(np.uint8), to_host(slow).view(np.uint8)), f"seed {seed}"
    assert np.array_equal(to_host(fast_lse), to_host(slow_lse)), f"seed {seed}"


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_shipped_tensor_core_kernels_keep_the_fast_launch(head_dim):
    """A fast launch that fails falls back to Numba's launch (about 1 ms of host time
    per call): the shipped tensor-core kernels, which ask for more than 48 KB of shared
    memory, must never take that fallback."""
    import cupy

    rng, seed = new_rng()
    for causal in (False, True):
        q, k, v = (to_device(random_array(rng, (1, 200, 2, head_dim), np.float16)) for _ in range(3))
        nbflash.attention(q, k, v, causal=causal)
        spec = nbflash.forward_spec(q, k, v, causal=causal)
        kernel = launch.compiled(spec)
        entries = [made for key, made in launch._launchers.items() if key[0] == id(kernel)]
        assert entries, f"{spec.key}: no launcher was made (seed {seed})"
        assert all(made is not launch._NUMBA for made in entries), f"{spec.key} fell back to Numba's launch"
    cupy.cuda.get_current_stream().synchronize()


@pytest.mark.gpu
def test_gpu_threads_on_streams_compile_once_and_are_right():
    import cupy

    rng, seed = new_rng()
    dtype = np.dtype(np.float16)
    # head_dim 72 with head_dim_v 24, causal, with lse: a signature no other test makes
    shapes = ((2, 200, 4, 72), (2, 230, 2, 72), (2, 230, 2, 24))
    inputs = [[random_array(rng, s, dtype) for s in shapes] for _ in range(4)]
    results, errors = [None] * 4, []
    start = threading.Barrier(4)
    before = dict(launch.compile_seconds)

    def worker(i):
        try:
            stream = cupy.cuda.Stream(non_blocking=True)
            with stream:
                dev = [cupy.asarray(a) for a in inputs[i]]
            stream.synchronize()
            start.wait()
            for _ in range(20):
                out, lse = nbflash.attention(*dev, causal=True, return_lse=True, stream=stream)
            stream.synchronize()
            results[i] = (to_host(out), to_host(lse))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    new = [k for k in launch.compile_seconds if k not in before]
    assert len(new) == 1, new
    for i in range(4):
        ref, ref_lse = nbflash.reference.attention(*inputs[i], causal=True, return_lse=True)
        assert_close(results[i][0], ref, dtype, seed=seed)
        assert_lse_close(results[i][1], ref_lse, seed=seed)


@pytest.mark.gpu
def test_warm_disk_cache_loads_without_compiling(tmp_path):
    code = (
        "import time, cupy, numpy as np, nbflash\n"
        "from nbflash import launch\n"
        "q = cupy.random.standard_normal((1, 64, 2, 64)).astype(cupy.float16)\n"
        "t = time.perf_counter(); out = nbflash.attention(q, q, q, causal=True); cupy.cuda.Device().synchronize()\n"
        "print(time.perf_counter() - t, sorted(launch.compile_seconds))\n"
    )
    env = dict(os.environ, NBFLASH_CACHE_DIR=str(tmp_path))
    src = os.path.join(os.path.dirname(__file__), "..", "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    cold, warm = (r.stdout.strip().split(" ", 1) for r in runs)
    assert "[disk]" not in cold[1] and "[disk]" in warm[1], (cold, warm)
    assert float(warm[0]) < 1.0, warm


def _build_fake_libcuda(folder):
    """perf/stub_host_path.py's no-op libcuda.so.1, built into ``folder``."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "perf"))
    try:
        import stub_host_path
    finally:
        sys.path.pop(0)
    (folder / "fake.c").write_text(stub_host_path.FAKE_LIBCUDA)
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(folder / "libcuda.so.1"), str(folder / "fake.c"),
                    "-ldl"], check=True)


def test_both_driver_kinds_reach_libcuda_with_the_arguments_given(tmp_path):
    # CuPy's Cython launchKernel and the ctypes fallback, against a no-op libcuda.so.1
    # built here (the C compiler is part of the dev and CI images; a GPU box may lack one)
    import os
    import shutil

    if shutil.which("cc") is None:
        pytest.skip("no C compiler to build the stand-in libcuda")
    import subprocess
    import sys

    _build_fake_libcuda(tmp_path)
    here = os.path.dirname(__file__)
    env = dict(os.environ, LD_LIBRARY_PATH=str(tmp_path), NUMBA_ENABLE_CUDASIM="1",
               PYTHONPATH=os.path.join(here, "..", "src"))
    done = subprocess.run([sys.executable, os.path.join(here, "launch_driver_worker.py")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def _build_fake_libcuda_and_fastlaunch(tmp_path):
    """(folder holding a no-op libcuda.so.1, path of a fresh build of _fastlaunch.c)."""
    import sysconfig

    _build_fake_libcuda(tmp_path)
    source = os.path.join(os.path.dirname(__file__), "..", "src", "nbflash", "_fastlaunch.c")
    built = tmp_path / ("_fastlaunch" + sysconfig.get_config_var("EXT_SUFFIX"))
    subprocess.run(["cc", "-O2", "-Wall", "-Werror", "-Wno-cast-function-type", "-shared", "-fPIC",
                    "-I" + sysconfig.get_paths()["include"], "-o", str(built), source], check=True)
    return tmp_path, built


def test_the_c_prepared_launch_hands_the_driver_what_the_python_launch_would(tmp_path):
    # tests/fastlaunch_worker.py against a no-op libcuda.so.1: the block, configuration,
    # stream, retries and refusals of nbflash._fastlaunch.PreparedLaunch
    import shutil

    if shutil.which("cc") is None:
        pytest.skip("no C compiler to build the extension and the stand-in libcuda")
    folder, built = _build_fake_libcuda_and_fastlaunch(tmp_path)
    here = os.path.dirname(__file__)
    env = dict(os.environ, LD_LIBRARY_PATH=str(folder), NUMBA_ENABLE_CUDASIM="1", NBFLASH_FASTLAUNCH_SO=str(built),
               PYTHONPATH=os.path.join(here, "..", "src"))
    env.pop("NBFLASH_LAUNCH_DRIVER", None)
    done = subprocess.run([sys.executable, os.path.join(here, "fastlaunch_worker.py")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_without_libcuda_the_c_launch_stays_off_and_says_why_when_asked_for(monkeypatch):
    # CI has the extension built (a compiler is there) but no libcuda: the default is
    # CuPy's binding, and asking for "c" is a clear error
    import importlib.util

    if os.environ.get("CI") and not os.path.exists(os.path.join(os.path.dirname(nbflash.__file__), "..", "..",
                                                                "setup.py")):
        assert importlib.util.find_spec("nbflash._fastlaunch") is not None, "pip did not build nbflash._fastlaunch"
    try:
        from nbflash import _fastlaunch
    except ImportError:
        pytest.skip("nbflash._fastlaunch is not built in this install")
    if _fastlaunch.driver_available():
        pytest.skip("libcuda.so.1 opens here")
    assert launch.fast_launch() is None
    monkeypatch.delenv("NBFLASH_LAUNCH_DRIVER", raising=False)
    assert launch._Driver().kind in ("cupy", "ctypes") and launch._Driver().prepared is None
    with pytest.raises(ValueError, match="NBFLASH_LAUNCH_DRIVER=c"):
        launch._Driver("c")
    with pytest.raises(ValueError, match="expected 'c', 'cupy' or 'ctypes'"):
        launch._Driver("fortran")
    go = _fastlaunch.PreparedLaunch(1, (1, 1, 1), (32, 1, 1), 0, bytes(16), (1,), print)
    with pytest.raises(OSError, match="libcuda"):
        go(0, 0x1000)
    assert go.block(0x1000) == bytes(8) + (0x1000).to_bytes(8, "little")


def test_the_self_check_says_which_host_path_remembered_calls_take(monkeypatch):
    import types

    assert "simulator" in launch.describe_host_path() or not nbflash.SIMULATOR
    monkeypatch.setattr(launch.device, "SIMULATOR", False)
    monkeypatch.setattr(launch, "_driver", types.SimpleNamespace(prepared=object(), kind="c"))
    try:
        from nbflash import _fastlaunch  # noqa: F401
    except ImportError:
        assert "not built" in launch.describe_host_path()
        return
    monkeypatch.setattr(nbflash.plans, "_hot_run", _fastlaunch.run)
    assert launch.describe_host_path().startswith("C key and lookup, C PreparedLaunch")
    monkeypatch.setattr(nbflash.plans, "_hot_run", None)
    monkeypatch.setattr(launch, "_driver", types.SimpleNamespace(prepared=None, kind="cupy"))
    assert launch.describe_host_path().startswith("Python key and lookup, cupy launchKernel")
