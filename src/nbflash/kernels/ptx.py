"""Intrinsics: one instruction (or bit trick) per function, each with its simulator twin.

On a GPU each is a Numba ``@intrinsic`` lowered to LLVM IR or inline PTX; under
Numba's CUDA simulator the twin is plain Python with the same results, so one kernel
source runs in both places.
"""

from __future__ import annotations

import numpy as np

from .. import device

if device.SIMULATOR:

    def f32_as_u32(x):
        """Bits of a float32 as uint32."""
        return int(np.float32(x).view(np.uint32))

    def u32_as_f32(x):
        """A uint32 reinterpreted as float32."""
        return np.uint32(int(x) & 0xFFFFFFFF).view(np.float32)

else:
    from llvmlite import ir
    from numba.cuda import types
    from numba.cuda.extending import intrinsic

    @intrinsic
    def f32_as_u32(typingctx, x):
        """Bits of a float32 as uint32 (LLVM bitcast; no instruction)."""
        if not isinstance(x, types.Float):
            return None

        def codegen(context, builder, sig, args):
            val = context.cast(builder, args[0], sig.args[0], types.float32)
            return builder.bitcast(val, ir.IntType(32))

        return types.uint32(x), codegen

    @intrinsic
    def u32_as_f32(typingctx, x):
        """A uint32 reinterpreted as float32 (LLVM bitcast; no instruction)."""
        if not isinstance(x, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            val = context.cast(builder, args[0], sig.args[0], types.uint32)
            return builder.bitcast(val, ir.FloatType())

        return types.float32(x), codegen
