"""Small kernels that exercise the wgmma intrinsics (kernels/ptx_wgmma.py): the layout
and fragment check the simulator tests and the device probe (perf/probe_wgmma.py) run,
and the throughput loops the probe times. Not part of the attention API.

The check kernel is a miniature attention step without the softmax, one warpgroup:
    S = A B^T    (64 x N; A 64 x KD and B N x KD staged K-major, k over KD; A either
                  from shared memory (ss) or from registers read straight from global
                  memory in the A-fragment layout (rs))
    O = P V      (64 x DV; P = S rounded to 16 bits, the S accumulator fragment repacked
                  as A registers as the forward kernel does, V N x DV staged MN-major)
so it checks the tile layout (cp.async into element_word's positions), the K-major and
MN-major descriptors across 64-column panels, the accumulator and A-register fragment
maps and scale_d.
"""

from __future__ import annotations

import numpy as np
from numba import cuda
from numba.cuda import float32, uint32

from . import ptx, ptx_wgmma as wg

K_MAJOR_LBO = 16  # unused by the hardware for swizzled K-major operands ("assumed 1")


def check_shared_bytes(n: int, kd: int, dv: int) -> int:
    """Dynamic shared memory of the check kernel, with the 1024-byte alignment slack."""
    return wg.tile_bytes(64, kd) + wg.tile_bytes(n, kd) + wg.tile_bytes(n, dv) + wg.TILE_ALIGN


def make_copy_tile(rows: int, cols: int, threads: int):
    """copy_tile(src, smem, base, tid): cp.async rows x cols 16-bit elements of a 2-D
    uint16 array into the swizzled tile at word ``base`` (16-byte chunks)."""
    chunks = cols // 8
    total = rows * chunks
    assert total % threads == 0 or total < threads

    @cuda.jit(device=True, inline=True)
    def copy_tile(src, smem, base, tid):
        for i in range((total + threads - 1) // threads):
            e = tid + i * threads
            if e < total:
                r = e // chunks
                c = e % chunks
                ptx.cp_async_16(ptx.shared_address(smem, (base + wg.chunk_word(r, c, rows),)),
                                ptx.global_address(src, (r, c * 8)), 16)

    return copy_tile


def build_check(dtype: str, n: int, kd: int, dv: int, a_in_registers: bool):
    """The check kernel (module docstring): launch with one block of 128 threads and
    check_shared_bytes(n, kd, dv) bytes of dynamic shared memory. Arguments: a (64, kd),
    b (n, kd), v (n, dv) uint16 bits of ``dtype``; s_out (64, n), o_out (64, dv) float32."""
    assert kd % 64 == 0 and dv % 64 == 0 and n % 16 == 0
    pack = ptx.pack_f16x2 if dtype == "fp16" else ptx.pack_bf16x2
    mma_s = wg.wgmma_rs(dtype, n, False) if a_in_registers else wg.wgmma_ss(dtype, n, False)
    mma_o = wg.wgmma_rs(dtype, dv, True)
    A_WORDS = wg.tile_bytes(64, kd) // 4
    B_WORDS = wg.tile_bytes(n, kd) // 4
    A_PANEL, B_PANEL, V_PANEL = wg.panel_bytes(64), wg.panel_bytes(n), wg.panel_bytes(n)
    S_REGS, O_REGS, P_REGS = n // 2, dv // 2, n // 4
    K_STEPS, PV_STEPS = kd // 16, n // 16
    A_REGS = a_in_registers
    A_FRAG_REGS = 4 * K_STEPS if a_in_registers else 1
    copy_a = make_copy_tile(64, kd, 128)
    copy_b = make_copy_tile(n, kd, 128)
    copy_v = make_copy_tile(n, dv, 128)

    def wgmma_check(a, b, v, s_out, o_out):
        tid = cuda.threadIdx.x
        lane = tid % 32
        w = tid // 32
        g = lane // 4
        t = lane % 4
        smem = cuda.shared.array(0, uint32)
        base = wg.shared_align_words(smem)
        copy_a(a, smem, base, tid)
        copy_b(b, smem, base + A_WORDS, tid)
        copy_v(v, smem, base + A_WORDS + B_WORDS, tid)
        ptx.cp_async_commit()
        ptx.cp_async_wait_group(0)
        wg.fence_proxy_async()  # cp.async wrote through the generic proxy; wgmma reads through the async one
        cuda.syncthreads()

        desc_a = wg.smem_desc(ptx.shared_address(smem, (base,)), K_MAJOR_LBO)
        desc_b = wg.smem_desc(ptx.shared_address(smem, (base + A_WORDS,)), K_MAJOR_LBO)
        desc_v = wg.smem_desc(ptx.shared_address(smem, (base + A_WORDS + B_WORDS,)), V_PANEL)

        s = cuda.local.array(S_REGS, float32)
        for i in range(S_REGS):
            s[i] = float32(1e30)  # garbage: scale_d = 0 on the first k-step must ignore it
        # A's register fragments, every k-step's, written before the fence: a register
        # written between wgmma_fence and a wgmma that reads it (while earlier wgmma of
        # the chain may still be reading registers the compiler reuses) is a race (PTX
        # ISA, wgmma.fence)
        a_frag = cuda.local.array(A_FRAG_REGS, uint32)
        if A_REGS:
            for kk in range(K_STEPS):
                row = 16 * w + g
                col = kk * 16 + 2 * t
                a_frag[4 * kk] = uint32(a[row, col]) | (uint32(a[row, col + 1]) << 16)
                a_frag[4 * kk + 1] = uint32(a[row + 8, col]) | (uint32(a[row + 8, col + 1]) << 16)
                a_frag[4 * kk + 2] = uint32(a[row, col + 8]) | (uint32(a[row, col + 9]) << 16)
                a_frag[4 * kk + 3] = uint32(a[row + 8, col + 8]) | (uint32(a[row + 8, col + 9]) << 16)
        wg.wgmma_fence()
        for kk in range(K_STEPS):
            step = (kk // 4) * B_PANEL + (kk % 4) * 32  # 16 columns: 32 bytes in a panel
            scale_d = 1 if kk > 0 else 0
            if A_REGS:
                mma_s(s, a_frag[4 * kk], a_frag[4 * kk + 1], a_frag[4 * kk + 2], a_frag[4 * kk + 3],
                      wg.desc_add(desc_b, step), scale_d)
            else:
                a_step = (kk // 4) * A_PANEL + (kk % 4) * 32
                mma_s(s, wg.desc_add(desc_a, a_step), wg.desc_add(desc_b, step), scale_d)
        wg.wgmma_commit()
        wg.wgmma_wait(0)
        wg.fence_operands(s, S_REGS)

        for j in range(S_REGS // 4):
            for half in range(2):
                for e in range(2):
                    s_out[16 * w + g + 8 * half, 8 * j + 2 * t + e] = s[4 * j + 2 * half + e]
        p = cuda.local.array(P_REGS, uint32)  # P = S in 16 bits: two columns a word
        for i in range(P_REGS):
            p[i] = pack(s[2 * i], s[2 * i + 1])

        o = cuda.local.array(O_REGS, float32)
        for i in range(O_REGS):
            o[i] = 0
        wg.wgmma_fence()
        for kk in range(PV_STEPS):
            j = 4 * kk  # words of 8-column blocks 2kk and 2kk + 1: (row g, row g + 8) each
            # 16 keys = two groups of 8 rows (2 SBO) further into V
            mma_o(o, p[j], p[j + 1], p[j + 2], p[j + 3], wg.desc_add(desc_v, kk * 2 * wg.SBO_BYTES), 1)
        wg.wgmma_commit()
        wg.wgmma_wait(0)
        wg.fence_operands(o, O_REGS)

        for j in range(O_REGS // 4):
            for half in range(2):
                for e in range(2):
                    o_out[16 * w + g + 8 * half, 8 * j + 2 * t + e] = o[4 * j + 2 * half + e]

    return cuda.jit(wgmma_check)


def check_reference(a, b, v, s_got, dtype):
    """(S, O) references in float64 from the 16-bit inputs (as their dtype): S = A B^T
    and O = P V with P = the kernel's own S rounded to the 16-bit dtype (so O's check
    is independent of S's errors)."""
    a64, b64, v64 = (x.astype(np.float64) for x in (a, b, v))
    s_ref = a64 @ b64.T
    p = np.asarray(s_got, dtype=np.float32).astype(a.dtype).astype(np.float64)
    return s_ref, p @ v64


# ---- throughput loops (perf/probe_wgmma.py) -----------------------------------------


def loop_shared_bytes(n: int, k_steps: int) -> int:
    return wg.tile_bytes(64, 64 * max(1, k_steps // 4)) + wg.tile_bytes(n, 64 * max(1, k_steps // 4)) \
        + wg.TILE_ALIGN


def build_wgmma_loop(dtype: str, n: int, k_steps: int, a_in_registers: bool):
    """Every warpgroup of the CTA runs ``reps`` times a chain of k_steps m64n{n}k16
    wgmma over shared-memory tiles (contents irrelevant: zeros), commit, wait; then
    writes its accumulator to out (threads,) float32 per CTA so nothing is dead.
    Arguments: out (grid * threads,) float32, reps int32."""
    kd = 64 * max(1, k_steps // 4)
    mma = wg.wgmma_rs(dtype, n, False) if a_in_registers else wg.wgmma_ss(dtype, n, False)
    A_WORDS = wg.tile_bytes(64, kd) // 4
    REGS = n // 2
    A_REGS = a_in_registers
    PANEL_A, PANEL_B = wg.panel_bytes(64), wg.panel_bytes(n)

    def wgmma_loop(out, reps):
        tid = cuda.threadIdx.x
        smem = cuda.shared.array(0, uint32)
        base = wg.shared_align_words(smem)
        desc_a = wg.smem_desc(ptx.shared_address(smem, (base,)), K_MAJOR_LBO)
        desc_b = wg.smem_desc(ptx.shared_address(smem, (base + A_WORDS,)), K_MAJOR_LBO)
        acc = cuda.local.array(REGS, float32)
        for i in range(REGS):
            acc[i] = 0
        a0 = uint32(tid)
        for r in range(reps):
            wg.wgmma_fence()
            for kk in range(k_steps):
                if A_REGS:
                    mma(acc, a0, a0, a0, a0, wg.desc_add(desc_b, (kk // 4) * PANEL_B + (kk % 4) * 32), 1)
                else:
                    mma(acc, wg.desc_add(desc_a, (kk // 4) * PANEL_A + (kk % 4) * 32),
                        wg.desc_add(desc_b, (kk // 4) * PANEL_B + (kk % 4) * 32), 1)
            wg.wgmma_commit()
            wg.wgmma_wait(0)
        wg.fence_operands(acc, REGS)
        total = float32(0)
        for i in range(REGS):
            total += acc[i]
        out[cuda.blockIdx.x * cuda.blockDim.x + tid] = total

    return cuda.jit(wgmma_loop)


def build_mma_loop(dtype: str, chains: int):
    """Every warp runs ``reps`` times ``chains`` independent mma.sync m16n8k16 (register
    operands, no memory traffic): the sm_80 path's tensor-core ceiling. Arguments as
    build_wgmma_loop's."""
    mma = ptx.mma_f16 if dtype == "fp16" else ptx.mma_bf16
    ACC_REGS = 4 * chains  # a closure constant: local.array needs a compile-time size

    def mma_loop(out, reps):
        tid = cuda.threadIdx.x
        acc = cuda.local.array(ACC_REGS, float32)
        for i in range(ACC_REGS):
            acc[i] = 0
        a = uint32(tid)
        for r in range(reps):
            for c in range(chains):
                j = 4 * c
                acc[j], acc[j + 1], acc[j + 2], acc[j + 3] = mma(
                    a, a, a, a, a, a, acc[j], acc[j + 1], acc[j + 2], acc[j + 3])
        total = float32(0)
        for i in range(4 * chains):
            total += acc[i]
        out[cuda.blockIdx.x * cuda.blockDim.x + tid] = total

    return cuda.jit(mma_loop)
