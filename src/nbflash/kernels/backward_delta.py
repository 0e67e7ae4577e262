"""The tensor-core backward's preprocess: delta[b, h, i] = sum_c dO[b, i, h, c] * O[b, i, h, c].

Contract (spec.DeltaSpec):
  kernel(do, out, delta)   grid (cdiv(seqlen_q * heads_q, spec.rows_per_cta()), batch)
  do, out: (B, Nq, Hq, Dv) uint16 views of float16 / bfloat16 data whose rows start on
  16 bytes (the tensor-core backward's own requirement); delta: (B, Hq, Nq) float32,
  every element written.

A row of Dv elements is read by Dv / 8 consecutive lanes (rounded up to a power of two), each with one 16-byte load of
dO and one of O through the read-only path; the lanes' partial sums meet by butterfly
shuffles. Rows are numbered (query, head) within a batch, so consecutive lanes read
consecutive bytes of a bshd tensor. The portable preprocess (kernels/backward_simt.py)
gives each thread a whole row: its lanes read Dv * 2 bytes apart, which left it at about
70 GB/s on an H100, 8-12% of the backward's time.
"""

from __future__ import annotations

from numba import cuda, float32, uint32

from ..spec import DeltaSpec
from . import ptx
from .convert import bf16_bits_to_f32

VECTOR = 8  # 16-bit elements per 16-byte load


def _word_dot(dtype: str):
    """dot(a, b): the sum of the products of the two 16-bit halves of words a and b, in float32."""
    if dtype == "fp16":

        @cuda.jit(device=True, inline=True)
        def dot_f16(a, b):
            a0, a1 = ptx.f16x2_to_f32(a)
            b0, b1 = ptx.f16x2_to_f32(b)
            return a0 * b0 + a1 * b1

        return dot_f16
    if dtype == "bf16":

        @cuda.jit(device=True, inline=True)
        def dot_bf16(a, b):
            lo = bf16_bits_to_f32(a & uint32(0xFFFF)) * bf16_bits_to_f32(b & uint32(0xFFFF))
            return lo + ptx.u32_as_f32(a & uint32(0xFFFF0000)) * ptx.u32_as_f32(b & uint32(0xFFFF0000))

        return dot_bf16
    raise ValueError(f"spec.dtype: expected fp16 or bf16; got {dtype!r}")


def build(spec: DeltaSpec):
    if spec.head_dim_v % VECTOR or not VECTOR <= spec.head_dim_v <= 32 * VECTOR:
        raise ValueError(f"spec.head_dim_v: expected a multiple of {VECTOR} up to {32 * VECTOR}; "
                         f"got {spec.head_dim_v}")
    if spec.threads % 32:
        raise ValueError(f"spec.threads: expected a multiple of 32; got {spec.threads}")
    lanes = spec.lanes_per_row()
    dot = _word_dot(spec.dtype)
    rows = spec.rows_per_cta()

    @cuda.jit
    def backward_delta(do, out, delta):
        t = cuda.threadIdx.x
        b = cuda.blockIdx.y
        heads = do.shape[2]
        row = cuda.blockIdx.x * rows + t // lanes
        i = row // heads
        h = row - i * heads
        column = (t % lanes) * VECTOR
        acc = float32(0)
        if i < do.shape[1] and column < do.shape[3]:
            g0, g1, g2, g3 = ptx.ld_global_nc_v4(ptx.global_address(do, (b, i, h, column)))
            o0, o1, o2, o3 = ptx.ld_global_nc_v4(ptx.global_address(out, (b, i, h, column)))
            acc = dot(g0, o0) + dot(g1, o1) + dot(g2, o2) + dot(g3, o3)
        step = lanes // 2
        while step > 0:  # every lane of the warp takes part
            acc += ptx.shfl_xor(acc, step)
            step //= 2
        if i < do.shape[1] and t % lanes == 0:
            delta[b, h, i] = acc

    return backward_delta
