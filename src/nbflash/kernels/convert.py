"""Element conversions between storage dtypes and accumulator dtypes.

bfloat16 travels as uint16 bits; it widens to float32 exactly (shift by 16) and
narrows with round-to-nearest-even, written with integer arithmetic so it runs on
any GPU and under the simulator.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from .ptx import f32_as_u32, u32_as_f32


@cuda.jit(device=True, inline=True)
def bf16_bits_to_f32(bits):
    return u32_as_f32(np.uint32(bits) << np.uint32(16))


@cuda.jit(device=True, inline=True)
def f32_to_bf16_bits(x):
    if math.isnan(x):
        return np.uint16(0x7FC0)
    bits = f32_as_u32(x)
    rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return np.uint16((bits + rounding) >> np.uint32(16))
