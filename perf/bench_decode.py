"""Decoding bandwidth: nbflash.attention_with_kvcache against the peers present.

Effective bandwidth = bytes of K and V read / time (the whole cache of every
sequence: cache_seqlens = capacity). fp16, heads_q 32, heads_kv 8, head_dim 128,
seqlen_q 1; cases batch 8 / cache 32768, batch 64 / 4096, batch 1 / 131072; the
contiguous cache and paged caches (block_size 16 and 256, blocks shuffled in the
pool). Peers on the same contiguous cache: torch SDPA's flash and cuDNN backends when
torch imports (enable_gqa, else kv heads repeated and those bytes counted, else the
reason it refused). Two yardsticks on the same K and V bytes: "read_only", a kernel
that only reads them (16-byte loads, grid-stride; TB/s of bytes read: the ceiling a
decode kernel can reach), and "memcpy", cudaMemcpyAsync device to device (TB/s of
bytes read + written). (The yardstick used to be CuPy's elementwise `dk[...] = kc`,
which read 0.82 TB/s at batch 1 / 128k against 2.9 at the other cases: a kernel's
speed, not the memory's.) GPU time: CUDA events around 10 calls queued behind a
spin kernel (so no host time enters), median of 5; the "nbflash_call" column is one
whole attention_with_kvcache call between events, host work and its synchronizing
cache_seqlens copy included (what a caller waits); "call_nosync" the same with
check_seqlens=False (no copy, no synchronization: the lengths are trusted and clamped
on the device), and "loop_nosync" whole check_seqlens=False calls queued behind a spin
kernel (a decode loop whose host keeps ahead of the GPU: every launch of the call,
nothing of the host). Random normal inputs, never zeros.

    python perf/bench_decode.py [--quick] [--out perf/results] [--sweep]

Writes <out>/<gpu-name>-decode.json and prints a table last. --sweep also times other
(threads, stages) tiles of the tensor-core decode kernel on the contiguous cache
(NBFLASH_DECODE_MMA_TILES).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import cupy  # noqa: E402

import nbflash  # noqa: E402
from nbflash import api_kvcache  # noqa: E402
from nbflash.api_kvcache import kvcache_plan  # noqa: E402

HEADS_Q, HEADS_KV, HEAD_DIM = 32, 8, 128
CASES = [(8, 32768), (64, 4096), (1, 131072)]
BLOCK_SIZES = [16, 256]
SWEEP = ["128,2", "128,4", "64,4", "64,6", "256,2"]  # threads,stages of decode_mma


def timed(fn, warmup, repeats):
    """Per-call milliseconds as a caller sees them: CUDA events around one call, which
    include the call's host work before its launches (for attention_with_kvcache with a
    device cache_seqlens: validation, the synchronizing length copy, planning)."""
    return nbflash.device.median_gpu_ms(fn, warmup, repeats)


def gpu_timed(go, warmup=3, repeats=5, calls=10, spin_ms=30.0):
    """Milliseconds of GPU time per call of ``go`` (launches only, no synchronization
    inside), queued behind a spin kernel (nbflash.device.queued_gpu_ms)."""
    return nbflash.device.queued_gpu_ms(go, warmup, repeats, calls, spin_ms)


def prepared(q, kc, vc, lengths, out, block_table=None, num_splits=0):
    """attention_with_kvcache's launches without its per-call validation and sync."""
    return api_kvcache._prepared(q, kc, vc, cache_seqlens=lengths, block_table=block_table, num_splits=num_splits,
                                 out=out)


def random_fp16(rng, shape):
    """Normal fp16 values, made in slices so the float32 temporary stays small."""
    out = cupy.empty(shape, cupy.float16)
    step = max(1, shape[0] // 8)
    for i in range(0, shape[0], step):
        out[i:i + step] = rng.standard_normal((min(step, shape[0] - i), *shape[1:]), dtype=cupy.float32)
    return out


_READ_ONLY = r"""
extern "C" __global__ void read_only(const uint4* __restrict__ a, const uint4* __restrict__ b,
                                     unsigned long long n, unsigned int* sink) {
    unsigned int x = 0;
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        uint4 u = __ldg(a + i);
        uint4 v = __ldg(b + i);
        x ^= u.x ^ u.y ^ u.z ^ u.w ^ v.x ^ v.y ^ v.z ^ v.w;
    }
    if (x == 0x9e3779b9u) sink[0] = x;  /* keeps the loads; (almost) never written */
}
"""


def yardsticks(kc, vc, warmup, repeats):
    """{name: (ms, bytes)}: read K and V once (read_only), copy them (memcpy)."""
    kernel = cupy.RawKernel(_READ_ONLY, "read_only")
    sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
    sink = cupy.zeros(1, cupy.uint32)
    n = kc.nbytes // 16
    read = lambda: kernel((sms * 8,), (256,), (kc, vc, cupy.uint64(n), sink))  # noqa: E731
    results = {"read_only": (gpu_timed(read, warmup, repeats), kc.nbytes + vc.nbytes)}
    dk, dv = cupy.empty_like(kc), cupy.empty_like(vc)
    stream = cupy.cuda.get_current_stream().ptr
    kind = cupy.cuda.runtime.memcpyDeviceToDevice

    def copy():
        cupy.cuda.runtime.memcpyAsync(dk.data.ptr, kc.data.ptr, kc.nbytes, kind, stream)
        cupy.cuda.runtime.memcpyAsync(dv.data.ptr, vc.data.ptr, vc.nbytes, kind, stream)

    results["memcpy"] = (gpu_timed(copy, warmup, repeats), 2 * (kc.nbytes + vc.nbytes))
    del dk, dv
    return results


def torch_peers(q, kc, vc, warmup, repeats):
    """{name: (ms, bytes read, note)} for SDPA flash and cuDNN on the same cache."""
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except Exception as exc:  # torch is optional
        return {"sdpa": (None, None, f"torch unavailable: {type(exc).__name__}")}
    tq = torch.from_dlpack(q).permute(0, 2, 1, 3)  # (B, Hq, 1, D) views of the CuPy buffers
    tk = torch.from_dlpack(kc).permute(0, 2, 1, 3)  # (B, Hkv, L, D)
    tv = torch.from_dlpack(vc).permute(0, 2, 1, 3)
    results = {}
    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        attempts = [("enable_gqa", lambda: (tk, tv, {"enable_gqa": True}))]
        attempts.append(("repeat_kv", lambda: (tk.repeat_interleave(HEADS_Q // HEADS_KV, dim=1),
                                               tv.repeat_interleave(HEADS_Q // HEADS_KV, dim=1), {})))
        reasons = []
        for how, make in attempts:
            try:
                k_, v_, extra = make()
                with sdpa_kernel(backend):
                    fn = lambda: torch.nn.functional.scaled_dot_product_attention(tq, k_, v_, **extra)  # noqa: E731
                    fn()
                    torch.cuda.synchronize()
                    ms = gpu_timed(fn, warmup, repeats)  # behind the spin kernel: same null stream
                nbytes = (k_.numel() + v_.numel()) * k_.element_size()
                results[name] = (ms, nbytes, how)
                break
            except Exception as exc:  # record why the backend refused
                reasons.append(f"{how}: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}")
                torch.cuda.empty_cache()
        else:
            results[name] = (None, None, "; ".join(reasons))
    return results


def paged_copy(rng, kc, vc, block_size):
    """The same cache as shuffled blocks of a pool, and its block table."""
    batch, seqlen = kc.shape[:2]
    per_seq = seqlen // block_size
    table = cupy.asarray(np.random.default_rng().permutation(batch * per_seq).reshape(batch, per_seq).astype(np.int32))
    flat = table.reshape(-1)
    pool_k = cupy.empty((batch * per_seq, block_size, HEADS_KV, HEAD_DIM), kc.dtype)
    pool_v = cupy.empty_like(pool_k)
    pool_k[flat] = kc.reshape(batch * per_seq, block_size, HEADS_KV, HEAD_DIM)
    pool_v[flat] = vc.reshape(batch * per_seq, block_size, HEADS_KV, HEAD_DIM)
    return pool_k, pool_v, table


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repeats (the cases are the same)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--sweep", action="store_true", help="also time other decode tiles (contiguous cache)")
    args = ap.parse_args()
    repeats = args.repeats or (10 if args.quick else 30)
    warmup = 3

    gpu = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    rng = cupy.random.default_rng()
    rows = []

    def record(case, layout, backend, ms, nbytes, key="", splits=None, note=""):
        tbs = nbytes / (ms * 1e-3) / 1e12 if ms else None
        rows.append({"gpu": gpu, "batch": case[0], "seqlen": case[1], "layout": layout, "backend": backend,
                     "ms": ms, "bytes": nbytes, "TB/s": tbs, "key": key, "num_splits": splits, "note": note})
        print(f"  {layout:>10} {backend:>12} {'' if ms is None else f'{ms:8.3f} ms {tbs:5.2f} TB/s'} {key} {note}",
              flush=True)

    for batch, seqlen in CASES:
        case = (batch, seqlen)
        print(f"batch {batch}, cache {seqlen}", flush=True)
        q = random_fp16(rng, (batch, 1, HEADS_Q, HEAD_DIM))
        kc = random_fp16(rng, (batch, seqlen, HEADS_KV, HEAD_DIM))
        vc = random_fp16(rng, (batch, seqlen, HEADS_KV, HEAD_DIM))
        lengths = cupy.full(batch, seqlen, cupy.int32)
        out = cupy.full((batch, 1, HEADS_Q, HEAD_DIM), cupy.nan, cupy.float16)
        nbytes = 2 * kc.nbytes

        spec, splits = kvcache_plan(q, kc, vc, cache_seqlens=lengths)
        # "nbflash": the kernels' GPU time; "nbflash_call": one API call as a caller
        # sees it (host validation, the cache_seqlens copy that synchronizes, launches)
        ms = gpu_timed(prepared(q, kc, vc, lengths, out))
        record(case, "contiguous", "nbflash", ms, nbytes, spec.key, splits)
        ms = timed(lambda: nbflash.attention_with_kvcache(q, kc, vc, cache_seqlens=lengths, out=out), warmup, repeats)
        record(case, "contiguous", "nbflash_call", ms, nbytes, spec.key, splits)
        nosync = lambda: nbflash.attention_with_kvcache(q, kc, vc, cache_seqlens=lengths, out=out,  # noqa: E731
                                                        check_seqlens=False)
        ms = timed(nosync, warmup, repeats)
        record(case, "contiguous", "call_nosync", ms, nbytes, spec.key, splits)
        ms = gpu_timed(nosync)
        record(case, "contiguous", "loop_nosync", ms, nbytes, spec.key, splits)
        if args.sweep:
            for tiles in SWEEP:
                os.environ["NBFLASH_DECODE_MMA_TILES"] = tiles
                s, splits = kvcache_plan(q, kc, vc, cache_seqlens=lengths)
                ms = gpu_timed(prepared(q, kc, vc, lengths, out))
                record(case, "contiguous", "nbflash", ms, nbytes, s.key, splits, f"sweep {tiles}")
            os.environ.pop("NBFLASH_DECODE_MMA_TILES")
        for block_size in BLOCK_SIZES:
            pk, pv, table = paged_copy(rng, kc, vc, block_size)
            s, splits = kvcache_plan(q, pk, pv, cache_seqlens=lengths, block_table=table)
            ms = gpu_timed(prepared(q, pk, pv, lengths, out, block_table=table))
            record(case, f"paged{block_size}", "nbflash", ms, nbytes, s.key, splits)
            del pk, pv, table
            cupy.get_default_memory_pool().free_all_blocks()
        for name, (ms, peer_bytes, note) in torch_peers(q, kc, vc, warmup, repeats).items():
            record(case, "contiguous", name, ms, peer_bytes or nbytes, note=note)
        for name, (ms, moved) in yardsticks(kc, vc, warmup, repeats).items():
            record(case, "contiguous", name, ms, moved, note="read + written bytes" if name == "memcpy" else "bytes read")
        del q, kc, vc
        cupy.get_default_memory_pool().free_all_blocks()

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, re.sub(r"[^A-Za-z0-9_.-]+", "-", gpu) + "-decode.json")
    with open(path, "w") as f:
        json.dump({"gpu": gpu, "device": nbflash.device.describe(), "heads_q": HEADS_Q, "heads_kv": HEADS_KV,
                   "head_dim": HEAD_DIM, "dtype": "fp16", "seqlen_q": 1, "rows": rows}, f, indent=1)

    print(f"\n{gpu}: decode, fp16, heads_q {HEADS_Q}, heads_kv {HEADS_KV}, head_dim {HEAD_DIM}; TB/s = K+V bytes / time")
    backends = ["nbflash", "nbflash_call", "call_nosync", "loop_nosync", "sdpa_flash", "sdpa_cudnn", "read_only",
                "memcpy"]
    print(f"{'batch':>5} {'cache':>7} {'layout':>10} " + " ".join(f"{b:>11}" for b in backends))
    for batch, seqlen in CASES:
        for layout in ["contiguous"] + [f"paged{b}" for b in BLOCK_SIZES]:
            cells = []
            for b in backends:
                hit = [r for r in rows if (r["batch"], r["seqlen"], r["layout"], r["backend"]) == (batch, seqlen, layout, b)
                       and not r["note"].startswith("sweep")]
                cells.append(f"{hit[0]['TB/s']:11.2f}" if hit and hit[0]["TB/s"] else f"{'-':>11}")
            print(f"{batch:>5} {seqlen:>7} {layout:>10} " + " ".join(cells))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
