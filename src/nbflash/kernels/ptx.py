"""Intrinsics: one instruction (or bit trick) per function, each with its simulator twin.

On a GPU each is a Numba ``@intrinsic`` lowered to LLVM IR or inline PTX; under
Numba's CUDA simulator the twin is plain Python with the same results, so one kernel
source runs in both places. Warp-wide instructions (mma, ldmatrix, shuffles) are
emulated by exchanging every lane's registers through nbflash.simulator.Warp, so the
simulator checks the fragment layouts, not only the arithmetic.

Fragment layouts (PTX ISA 9.7.14.5.8, mma.m16n8k16 with .f16/.bf16 inputs), with
g = lane // 4 (groupID) and t = lane % 4 (threadID_in_group):
    A (16x16, row-major), four .b32 registers of two 16-bit values each:
        a0: row g,   cols 2t, 2t+1      a1: row g+8, cols 2t, 2t+1
        a2: row g,   cols 2t+8, 2t+9    a3: row g+8, cols 2t+8, 2t+9
    B (16x8, "col": element (k, n)), two .b32 registers:
        b0: rows k = 2t, 2t+1, col n = g        b1: rows k = 2t+8, 2t+9, col n = g
    C/D (16x8, f32), four registers:
        c0, c1: row g, cols 2t, 2t+1            c2, c3: row g+8, cols 2t, 2t+1
The lower 16 bits of a .b32 register hold the lower column (or row) index.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from .. import device

SIMULATED = device.SIMULATOR
"""True when these intrinsics are the simulator twins."""

# ex2_fma: 2**f for f in [-0.5, 0.5] as c0 + c1 f + ... + c4 f^4 (float32 values of a
# near-minimax fit of the relative error: at most 2.7e-6, under the 2e-5 that the lse's
# float32 accumulation is held to), the clamp under which 2**x is 0 exactly (the exponent
# of the scale 2**round(x) is then 0), and the addend whose float32 sum with x holds
# round(x) in its low mantissa bits (1.5 * 2**23).
EX2_FMA_POLY = (0.9999992847442627, 0.6931217908859253, 0.240247443318367, 0.05591785907745361,
                0.009570101276040077)
EX2_FMA_FLOOR = -127.0
_ROUND_MAGIC = 12582912.0


def _f32_hex(value: float) -> str:
    """A float32 constant as PTX writes it bit for bit (0fXXXXXXXX)."""
    return "0f%08X" % int(np.array(value, np.float32).view(np.uint32))


if SIMULATED:
    import threading

    from ..simulator import current_warp

    class _Address:
        """What an address is on the simulator: an array and an element index."""

        __slots__ = ("array", "index")

        def __init__(self, array, index):
            self.array = array
            self.index = tuple(int(i) for i in index)

        def words(self, count):
            """``count`` consecutive elements along the last axis, starting here."""
            *lead, last = self.index
            return [self.array[(*lead, last + i)] for i in range(count)]

        def _moved(self, byte):
            size = self.array.dtype.itemsize
            assert byte % size == 0, (byte, size)
            *lead, _ = self.index
            return _Address(self.array, (*lead, byte // size))

        def __add__(self, nbytes):
            """The address ``nbytes`` further along the last axis (shared words)."""
            return self._moved(self.index[-1] * self.array.dtype.itemsize + int(nbytes))

        __radd__ = __add__

        def __xor__(self, bits):
            """The byte offset along the last axis XOR ``bits``: the device's 32-bit
            shared address XOR bits, where the kernel's tiles start 1024-byte aligned
            (smem[base] on the device, smem[0] here: shared_align_words is 0) and
            bits < 1024 (a 128-byte swizzle's chunk bits)."""
            return self._moved((self.index[-1] * self.array.dtype.itemsize) ^ int(bits))

    def _lane():
        return threading.current_thread().thread_id % 32

    def _halves(word, dtype):
        bits = np.array([int(word) & 0xFFFF, (int(word) >> 16) & 0xFFFF], dtype=np.uint16)
        return bits.view(dtype).astype(np.float64)

    def f32_as_u32(x):
        """Bits of a float32 as uint32."""
        return int(np.float32(x).view(np.uint32))

    def u32_as_f32(x):
        """A uint32 reinterpreted as float32."""
        return np.uint32(int(x) & 0xFFFFFFFF).view(np.float32)

    def shared_address(array, index):
        return _Address(array, index)

    def global_address(array, index):
        return _Address(array, index)

    def ld_shared_u32(address):
        """The 32-bit word at a 4-byte-aligned shared address."""
        assert address.index[-1] * address.array.dtype.itemsize % 4 == 0, address.index
        return int(address.array[address.index])

    def ld_shared_v2_u32(address):
        """The two 32-bit words at an 8-byte-aligned shared address."""
        assert address.index[-1] * address.array.dtype.itemsize % 8 == 0, address.index
        return int(address.array[address.index]), int((address + 4).array[(address + 4).index])

    def st_shared_u32(address, value):
        """Store a 32-bit word at a shared address."""
        address.array[address.index] = int(value) & 0xFFFFFFFF

    def st_global_u32(address, value):
        """Store a 32-bit word at a 4-byte-aligned global address (over as many elements
        of the array's last axis as it covers)."""
        assert address.array.strides[-1] == address.array.dtype.itemsize, address.array.strides
        assert (address.array.ctypes.data + sum(i * st for i, st in zip(address.index, address.array.strides))) % 4 == 0
        parts = np.array([int(value) & 0xFFFFFFFF], dtype=np.uint32).view(address.array.dtype)
        *lead, last = address.index
        for i, part in enumerate(parts):
            address.array[(*lead, last + i)] = part


    def global_row_address(array, index, rows):
        """global_address(array, index) moved ``rows`` along axis 1."""
        index = tuple(int(i) for i in index)
        return _Address(array, (index[0], index[1] + int(rows), *index[2:]))

    def cp_async_16(dst, src, src_bytes):
        """Copy 16 bytes (zero-filled past src_bytes) right away; the twin is synchronous."""
        words = 16 // dst.array.dtype.itemsize
        src_words = 16 // src.array.dtype.itemsize
        raw = np.zeros(16, dtype=np.uint8)
        if src_bytes > 0:  # only the elements src_bytes covers: a row's last chunk may end early
            itemsize = src.array.dtype.itemsize
            count = min(src_words, (int(src_bytes) + itemsize - 1) // itemsize)
            raw[:count * itemsize] = np.array(src.words(count), dtype=src.array.dtype).view(np.uint8)
            raw[src_bytes:] = 0
        values = raw.view(dst.array.dtype)
        *lead, last = dst.index
        for i in range(words):
            dst.array[(*lead, last + i)] = values[i]

    def cp_async_commit():
        pass

    def cp_async_wait_group(n):
        pass

    def _ldmatrix(address, transpose):
        rows = current_warp().exchange(_lane(), address)
        lane = _lane()
        regs = []
        for m in range(4):
            mat = [np.array(rows[8 * m + r].words(4), dtype=np.uint32).view(np.uint16) for r in range(8)]
            if transpose:
                lo, hi = mat[2 * (lane % 4)][lane // 4], mat[2 * (lane % 4) + 1][lane // 4]
            else:
                lo, hi = mat[lane // 4][2 * (lane % 4)], mat[lane // 4][2 * (lane % 4) + 1]
            regs.append(int(lo) | (int(hi) << 16))
        return regs[0], regs[1], regs[2], regs[3]

    def ldmatrix_x4(address):
        """Four 8x8 b16 matrices; lanes 8m..8m+7 give the row addresses of matrix m."""
        return _ldmatrix(address, False)

    def ldmatrix_x4_trans(address):
        """As ldmatrix_x4, each matrix transposed."""
        return _ldmatrix(address, True)

    def _mma(dtype, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        regs = current_warp().exchange(_lane(), (a0, a1, a2, a3, b0, b1, c0, c1, c2, c3))
        A = np.zeros((16, 16))
        B = np.zeros((16, 8))
        C = np.zeros((16, 8))
        for lane, r in enumerate(regs):
            g, t = lane // 4, lane % 4
            A[g, 2 * t:2 * t + 2] = _halves(r[0], dtype)
            A[g + 8, 2 * t:2 * t + 2] = _halves(r[1], dtype)
            A[g, 2 * t + 8:2 * t + 10] = _halves(r[2], dtype)
            A[g + 8, 2 * t + 8:2 * t + 10] = _halves(r[3], dtype)
            B[2 * t:2 * t + 2, g] = _halves(r[4], dtype)
            B[2 * t + 8:2 * t + 10, g] = _halves(r[5], dtype)
            C[g, 2 * t:2 * t + 2] = r[6:8]
            C[g + 8, 2 * t:2 * t + 2] = r[8:10]
        D = (A @ B + C).astype(np.float32)
        g, t = _lane() // 4, _lane() % 4
        return D[g, 2 * t], D[g, 2 * t + 1], D[g + 8, 2 * t], D[g + 8, 2 * t + 1]

    def mma_f16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        """D = A B + C, m16n8k16, float16 inputs, float32 accumulators."""
        return _mma(np.float16, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)

    def mma_bf16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        """D = A B + C, m16n8k16, bfloat16 inputs, float32 accumulators."""
        return _mma(ml_dtypes.bfloat16, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)

    def _pack(lo, hi, dtype):
        bits = np.array([lo, hi], dtype=np.float32).astype(dtype).view(np.uint16)
        return int(bits[0]) | (int(bits[1]) << 16)

    def pack_f16x2(lo, hi):
        """Two float32 rounded to float16, lo in the low half."""
        return _pack(lo, hi, np.float16)

    def pack_bf16x2(lo, hi):
        """Two float32 rounded to bfloat16, lo in the low half."""
        return _pack(lo, hi, ml_dtypes.bfloat16)

    def ex2(x):
        """2**x in float32."""
        return np.float32(np.exp2(np.float32(x)))

    def ex2_fma(x):
        """2**x in float32 by ex2_fma's steps on the GPU (the same polynomial, rounding
        and exponent arithmetic, so the simulator sees its error too; a NaN stays NaN)."""
        x = np.float32(x)
        if np.isnan(x):
            return x
        x = max(x, np.float32(EX2_FMA_FLOOR))
        t = np.float32(x + np.float32(_ROUND_MAGIC))
        f = np.float32(x - np.float32(t - np.float32(_ROUND_MAGIC)))
        p = np.float32(EX2_FMA_POLY[-1])
        for c in EX2_FMA_POLY[-2::-1]:
            p = np.float32(np.float64(p) * np.float64(f) + np.float64(c))  # one rounding, as fma
        bits = ((int(np.array(t, np.float32).view(np.uint32)) << 23) + 0x3F800000) & 0xFFFFFFFF
        scale = np.array(bits, np.uint32).view(np.float32)[()]  # 2**round(x), 0 at the floor
        return np.float32(p * scale)

    def shfl_xor(value, lane_mask):
        """The value of lane (this lane ^ lane_mask), all 32 lanes taking part."""
        values = current_warp().exchange(_lane(), value)
        return values[_lane() ^ lane_mask]

    def warp_uniform(value):
        """``value``, which every lane of the warp holds alike (checked here)."""
        values = current_warp().exchange(_lane(), value)
        assert all(v == values[0] for v in values), values
        return values[0]

    _red_lock = threading.Lock()

    def red_add_f32(address, value):
        """*address += value in float32, atomically (lanes are Python threads here)."""
        with _red_lock:
            address.array[address.index] += np.float32(value)

    def ld_global_nc_v4(address):
        """16 bytes from global memory as four uint32 words (the lower address in
        word 0, little-endian as on the GPU)."""
        count = 16 // address.array.dtype.itemsize
        words = np.array(address.words(count), dtype=address.array.dtype).view(np.uint32)
        return int(words[0]), int(words[1]), int(words[2]), int(words[3])

    def syncwarp():
        """bar.warp.sync: the lanes of a warp meet here (and see each other's writes)."""
        current_warp().barrier.wait()

    def f16x2_to_f32(word):
        """The two float16 halves of a .b32 word widened to float32 (lo, hi)."""
        lo, hi = _halves(word, np.float16)
        return np.float32(lo), np.float32(hi)

    def rcp_approx(x):
        """1 / x in float32 (the GPU's approximation is within 1 ulp)."""
        return np.float32(np.float32(1) / np.float32(x))

    def vote_any(predicate):
        """True on every lane when the predicate holds on any lane (all 32 taking part)."""
        return any(current_warp().exchange(_lane(), bool(predicate)))

    def tanh_approx(x):
        """tanh(x) in float32 (the GPU's approximation: relative error up to 2**-11)."""
        return np.float32(np.tanh(np.float32(x)))

    def lg2_approx(x):
        """log2(x) in float32 (-inf for 0, as the GPU's)."""
        with np.errstate(divide="ignore"):
            return np.float32(np.log2(np.float32(x)))

else:
    from llvmlite import ir
    from numba import cuda
    from numba.cuda import cgutils, types
    from numba.cuda.extending import intrinsic

    _i32 = ir.IntType(32)
    _i64 = ir.IntType(64)
    _f32 = ir.FloatType()

    def _asm(builder, text, constraints, ret, args, side_effect=True):
        """Inline PTX. side_effect=False only for pure register arithmetic: the
        compiler may then reorder or merge it; memory instructions keep their order
        relative to barriers."""
        fnty = ir.FunctionType(ret, [a.type for a in args])
        return builder.call(ir.InlineAsm(fnty, text, constraints, side_effect=side_effect), args)

    def _tuple(context, builder, sig, result, n):
        return context.make_tuple(
            builder, sig.return_type, [builder.extract_value(result, i) for i in range(n)]
        )

    @intrinsic
    def f32_as_u32(typingctx, x):
        """Bits of a float32 as uint32 (LLVM bitcast; no instruction)."""
        if not isinstance(x, types.Float):
            return None

        def codegen(context, builder, sig, args):
            val = context.cast(builder, args[0], sig.args[0], types.float32)
            return builder.bitcast(val, _i32)

        return types.uint32(x), codegen

    @intrinsic
    def u32_as_f32(typingctx, x):
        """A uint32 reinterpreted as float32 (LLVM bitcast; no instruction)."""
        if not isinstance(x, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            val = context.cast(builder, args[0], sig.args[0], types.uint32)
            return builder.bitcast(val, _f32)

        return types.float32(x), codegen

    def _element_pointer(context, builder, aryty, ary, idxty, idx):
        array = context.make_array(aryty)(context, builder, ary)
        indices = [
            context.cast(builder, builder.extract_value(idx, i), idxty[i], types.intp)
            for i in range(aryty.ndim)
        ]
        return cgutils.get_item_pointer(context, builder, aryty, array, indices)

    @intrinsic
    def shared_address(typingctx, array, index):
        """32-bit shared-window address of array[index] (array in shared memory)."""
        if not isinstance(array, types.Array) or not isinstance(index, types.BaseTuple):
            return None

        def codegen(context, builder, sig, args):
            ptr = _element_pointer(context, builder, sig.args[0], args[0], sig.args[1], args[1])
            shared_ptr = builder.addrspacecast(ptr, ir.PointerType(ptr.type.pointee, 3))
            return builder.ptrtoint(shared_ptr, _i32)

        return types.uint32(array, index), codegen

    @intrinsic
    def global_address(typingctx, array, index):
        """64-bit global address of array[index] (a device array argument)."""
        if not isinstance(array, types.Array) or not isinstance(index, types.BaseTuple):
            return None

        def codegen(context, builder, sig, args):
            ptr = _element_pointer(context, builder, sig.args[0], args[0], sig.args[1], args[1])
            global_ptr = builder.addrspacecast(ptr, ir.PointerType(ptr.type.pointee, 1))
            return builder.ptrtoint(global_ptr, ir.IntType(64))

        return types.uint64(array, index), codegen

    @intrinsic
    def ld_shared_u32(typingctx, address):
        """ld.shared.u32 at a 4-byte-aligned 32-bit shared address (as ld_shared_v2_u32)."""
        if not isinstance(address, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            addr = context.cast(builder, args[0], sig.args[0], types.uint32)
            return _asm(builder, "ld.shared.u32 $0, [$1];", "=r,r", _i32, [addr])

        return types.uint32(address), codegen

    @intrinsic
    def ld_shared_v2_u32(typingctx, address):
        """ld.shared.v2.u32 at an 8-byte-aligned 32-bit shared address (a shared_address
        plus a byte offset, any integer type: truncated to 32 bits): two words. Shared
        accesses through these and st_shared_u32 instead of smem[word] keep the address
        arithmetic 32-bit with constant offsets folded into the instruction (an unsigned
        index into a Numba array costs a 64-bit shift and mask an access; a signed one
        adds the negative-index wraparound)."""
        if not isinstance(address, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            addr = context.cast(builder, args[0], sig.args[0], types.uint32)
            pair = _asm(builder, "ld.shared.v2.u32 {$0, $1}, [$2];", "=r,=r,r",
                        ir.LiteralStructType([_i32, _i32]), [addr])
            return _tuple(context, builder, sig, pair, 2)

        return types.UniTuple(types.uint32, 2)(address), codegen

    def _store_u32(space, address_type, constraint, doc):
        def typer(typingctx, address, value):
            if not isinstance(address, types.Integer) or not isinstance(value, types.Integer):
                return None

            def codegen(context, builder, sig, args):
                addr = context.cast(builder, args[0], sig.args[0], address_type)
                val = context.cast(builder, args[1], sig.args[1], types.uint32)
                _asm(builder, f"st.{space}.u32 [$0], $1;", f"{constraint},r", ir.VoidType(), [addr, val])
                return context.get_dummy_value()

            return types.void(address, value), codegen

        typer.__name__ = f"st_{space}_u32"
        typer.__doc__ = doc
        return intrinsic(typer)

    st_shared_u32 = _store_u32("shared", types.uint32, "r",
                               "st.shared.u32 of ``value`` (an integer, low 32 bits) at a 32-bit shared address.")
    st_global_u32 = _store_u32("global", types.uint64, "l",
                               "st.global.u32 of ``value`` (low 32 bits) at a 4-byte-aligned global address.")

    @intrinsic
    def global_row_address(typingctx, array, index, rows):
        """global_address(array, index) moved ``rows`` (>= 0) along axis 1 by the
        array's axis-1 byte stride (any sign or size: a 64-bit multiply): on top of an
        address that does not depend on rows, so a loop over rows computes the
        shape-and-stride arithmetic of ``index`` once instead of per row."""
        if (not isinstance(array, types.Array) or array.ndim < 2 or not isinstance(index, types.BaseTuple)
                or not isinstance(rows, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            ptr = _element_pointer(context, builder, sig.args[0], args[0], sig.args[1], args[1])
            base = builder.ptrtoint(builder.addrspacecast(ptr, ir.PointerType(ptr.type.pointee, 1)), _i64)
            stride = cgutils.unpack_tuple(builder, context.make_array(sig.args[0])(context, builder, args[0]).strides)[1]
            count = context.cast(builder, args[2], sig.args[2], types.uint32)
            offset = builder.mul(builder.zext(count, _i64), stride)
            return builder.add(base, offset)

        return types.uint64(array, index, rows), codegen

    @intrinsic
    def cp_async_16(typingctx, dst, src, src_bytes):
        """cp.async.cg.shared.global, 16 bytes; bytes past src_bytes are zero-filled
        (PTX ISA 9.7.9.25.3.1). Completes at cp_async_wait_group."""

        def codegen(context, builder, sig, args):
            nbytes = context.cast(builder, args[2], sig.args[2], types.uint32)
            _asm(builder, "cp.async.cg.shared.global [$0], [$1], 16, $2;", "r,l,r",
                 ir.VoidType(), [args[0], args[1], nbytes])
            return context.get_dummy_value()

        return types.void(types.uint32, types.uint64, src_bytes), codegen

    @intrinsic
    def cp_async_commit(typingctx):
        """cp.async.commit_group: close the group of copies issued so far."""

        def codegen(context, builder, sig, args):
            _asm(builder, "cp.async.commit_group;", "", ir.VoidType(), [])
            return context.get_dummy_value()

        return types.void(), codegen

    @intrinsic
    def cp_async_wait_group(typingctx, n):
        """cp.async.wait_group n: wait until at most n groups are in flight."""
        if not isinstance(n, types.IntegerLiteral):
            return None
        pending = n.literal_value

        def codegen(context, builder, sig, args):
            _asm(builder, f"cp.async.wait_group {pending};", "~{memory}", ir.VoidType(), [])
            return context.get_dummy_value()

        return types.void(n), codegen

    def _ldmatrix_intrinsic(trans):
        suffix = ".trans" if trans else ""

        def typer(typingctx, address):
            if not isinstance(address, types.Integer):
                return None

            def codegen(context, builder, sig, args):  # (any integer: truncated to 32 bits)
                ret = ir.LiteralStructType([_i32] * 4)
                addr = context.cast(builder, args[0], sig.args[0], types.uint32)
                res = _asm(builder,
                           f"ldmatrix.sync.aligned.m8n8.x4{suffix}.shared.b16 {{$0, $1, $2, $3}}, [$4];",
                           "=r,=r,=r,=r,r", ret, [addr])
                return _tuple(context, builder, sig, res, 4)

            return types.UniTuple(types.uint32, 4)(address), codegen

        typer.__name__ = "ldmatrix_x4" + ("_trans" if trans else "")
        return typer

    ldmatrix_x4 = intrinsic(_ldmatrix_intrinsic(False))
    ldmatrix_x4.__doc__ = """ldmatrix.m8n8.x4.b16 (PTX ISA 9.7.14.5.15): four 8x8 matrices;
    lanes 8m..8m+7 give the row addresses of matrix m; register m of lane l holds row
    l // 4, columns 2 (l % 4) and 2 (l % 4) + 1 of matrix m."""
    ldmatrix_x4_trans = intrinsic(_ldmatrix_intrinsic(True))
    ldmatrix_x4_trans.__doc__ = """As ldmatrix_x4 with .trans: register m of lane l holds
    rows 2 (l % 4) and 2 (l % 4) + 1, column l // 4 of matrix m."""

    def _mma_intrinsic(kind):
        text = (
            f"mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32 "
            "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};"
        )

        def typer(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
            sig = types.UniTuple(types.float32, 4)(*([types.uint32] * 6 + [types.float32] * 4))

            def codegen(context, builder, sig, args):
                ret = ir.LiteralStructType([_f32] * 4)
                res = _asm(builder, text, "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f", ret, list(args), False)
                return _tuple(context, builder, sig, res, 4)

            return sig, codegen

        typer.__name__ = f"mma_{kind}"
        return typer

    mma_f16 = intrinsic(_mma_intrinsic("f16"))
    mma_f16.__doc__ = "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32: D = A B + C."
    mma_bf16 = intrinsic(_mma_intrinsic("bf16"))
    mma_bf16.__doc__ = "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32: D = A B + C."

    def _pack_intrinsic(kind):
        def typer(typingctx, lo, hi):
            def codegen(context, builder, sig, args):
                lo_, hi_ = (context.cast(builder, a, t, types.float32) for a, t in zip(args, sig.args))
                # cvt.rn.{kind}x2.f32 d, a, b puts a in the upper half, b in the lower
                return _asm(builder, f"cvt.rn.{kind}x2.f32 $0, $1, $2;", "=r,f,f", _i32, [hi_, lo_], False)

            return types.uint32(lo, hi), codegen

        typer.__name__ = f"pack_{kind}x2"
        return typer

    pack_f16x2 = intrinsic(_pack_intrinsic("f16"))
    pack_f16x2.__doc__ = "cvt.rn.f16x2.f32: two float32 to float16, lo in the low half."
    pack_bf16x2 = intrinsic(_pack_intrinsic("bf16"))
    pack_bf16x2.__doc__ = "cvt.rn.bf16x2.f32: two float32 to bfloat16, lo in the low half."

    def _unary_f32(instruction, name, doc):
        """The intrinsic ``name``: float32 -> float32 by the one PTX instruction
        ``instruction $0, $1;``."""

        def typer(typingctx, x):
            def codegen(context, builder, sig, args):
                val = context.cast(builder, args[0], sig.args[0], types.float32)
                fnty = ir.FunctionType(_f32, [_f32])
                return builder.call(ir.InlineAsm(fnty, f"{instruction} $0, $1;", "=f,f"), [val])

            return types.float32(x), codegen

        typer.__name__ = name
        typer.__doc__ = doc
        return intrinsic(typer)

    ex2 = _unary_f32("ex2.approx.ftz.f32", "ex2", "ex2.approx.ftz.f32: 2**x (PTX ISA 9.7.3.21).")

    @intrinsic
    def ex2_fma(typingctx, x):
        """2**x in float32 on the FMA and integer pipes instead of the MUFU
        (FlashAttention-4's exp2 emulation): n = round(x) by adding 1.5 * 2**23, 2**(x - n)
        by EX2_FMA_POLY (four fma), times 2**n built in the exponent field (one shift-add).
        x is clamped to EX2_FMA_FLOOR first, where 2**n is 0, so -inf gives 0 (max.NaN:
        a NaN stays NaN, as MUFU.EX2's does); relative error 2.7e-6 down to 2**-126 (below
        that a denormal or 0)."""

        def codegen(context, builder, sig, args):
            val = context.cast(builder, args[0], sig.args[0], types.float32)
            c = [_f32_hex(v) for v in EX2_FMA_POLY]
            text = (
                "{ .reg .f32 x, t, f, p, s; .reg .b32 e;"
                f" max.NaN.f32 x, $1, {_f32_hex(EX2_FMA_FLOOR)};"
                f" add.rn.f32 t, x, {_f32_hex(_ROUND_MAGIC)};"
                f" sub.rn.f32 f, t, {_f32_hex(_ROUND_MAGIC)};"
                " sub.rn.f32 f, x, f;"
                f" fma.rn.f32 p, f, {c[4]}, {c[3]};"
                f" fma.rn.f32 p, p, f, {c[2]};"
                f" fma.rn.f32 p, p, f, {c[1]};"
                f" fma.rn.f32 p, p, f, {c[0]};"
                " mov.b32 e, t; shl.b32 e, e, 23; add.s32 e, e, 0x3F800000; mov.b32 s, e;"
                " mul.rn.f32 $0, p, s; }"
            )
            return _asm(builder, text, "=f,f", _f32, [val], False)

        return types.float32(x), codegen

    @intrinsic
    def red_add_f32(typingctx, address, value):
        """red.global.add.f32 [address], value (PTX ISA 9.7.13.6): atomic float32 add to
        a global address (from global_address), no result returned."""

        def codegen(context, builder, sig, args):
            val = context.cast(builder, args[1], sig.args[1], types.float32)
            _asm(builder, "red.global.add.f32 [$0], $1;", "l,f", ir.VoidType(), [args[0], val])
            return context.get_dummy_value()

        return types.void(types.uint64, value), codegen

    @cuda.jit(device=True, inline=True)
    def shfl_xor(value, lane_mask):
        """shfl.sync.bfly: the value of lane (this lane ^ lane_mask), all lanes taking part."""
        return cuda.shfl_xor_sync(0xFFFFFFFF, value, lane_mask)

    @cuda.jit(device=True, inline=True)
    def warp_uniform(value):
        """``value``, which every lane of the warp holds alike, broadcast from lane 0
        (shfl.sync.idx): ptxas then knows it is warp-uniform and keeps what derives from
        it (a warpgroup's wgmma descriptors) in uniform registers instead of building
        each descriptor per thread and moving it over with R2UR (CUTLASS's
        canonical_warp_group_idx does the same)."""
        return cuda.shfl_sync(0xFFFFFFFF, value, 0)

    @intrinsic
    def ld_global_nc_v4(typingctx, address):
        """ld.global.nc.L1::no_allocate.v4.u32 (PTX ISA 9.7.9.8, 9.7.9.9): 16 bytes
        through the read-only path without keeping them in L1 (streamed once); the
        address must be 16-byte aligned and the memory unwritten by this kernel."""

        def codegen(context, builder, sig, args):
            ret = ir.LiteralStructType([_i32] * 4)
            res = _asm(builder, "ld.global.nc.L1::no_allocate.v4.u32 {$0, $1, $2, $3}, [$4];",
                       "=r,=r,=r,=r,l", ret, [args[0]])
            return _tuple(context, builder, sig, res, 4)

        return types.UniTuple(types.uint32, 4)(types.uint64), codegen

    @intrinsic
    def f16x2_to_f32(typingctx, word):
        """cvt.f32.f16 twice: the float16 halves of a .b32 word as float32 (lo, hi)."""

        def codegen(context, builder, sig, args):
            val = context.cast(builder, args[0], sig.args[0], types.uint32)
            ret = ir.LiteralStructType([_f32] * 2)
            text = "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.f32.f16 $0, lo; cvt.f32.f16 $1, hi; }"
            res = _asm(builder, text, "=f,=f,r", ret, [val], False)
            return _tuple(context, builder, sig, res, 2)

        return types.UniTuple(types.float32, 2)(word), codegen

    rcp_approx = _unary_f32(
        "rcp.approx.ftz.f32", "rcp_approx",
        "rcp.approx.ftz.f32 (PTX ISA 9.7.3.14): 1 / x in one MUFU operation, within 1 ulp; "
        "1 / inf = 0 and 1 / 0 = inf.")

    tanh_approx = _unary_f32(
        "tanh.approx.f32", "tanh_approx",
        "tanh.approx.f32 (PTX ISA 9.7.3.22, sm_75+): tanh(x) in one MUFU operation, maximum relative "
        "error 2**-11 over the whole range; tanh(+-inf) = +-1.")

    lg2_approx = _unary_f32(
        "lg2.approx.ftz.f32", "lg2_approx",
        "lg2.approx.ftz.f32 (PTX ISA 9.7.3.20): log2(x) in one MUFU operation, maximum absolute "
        "error 2**-22 for x in [0.5, 2], relative 2**-22 elsewhere; lg2(0) = -inf.")

if not SIMULATED:

    @cuda.jit(device=True, inline=True)
    def vote_any(predicate):
        """vote.sync.any.pred (PTX ISA 9.7.13.7): True on every lane when the predicate
        holds on any lane, all 32 lanes taking part; a warp-uniform branch condition."""
        return cuda.any_sync(0xFFFFFFFF, predicate)

    @cuda.jit(device=True, inline=True)
    def syncwarp():
        """bar.warp.sync 0xffffffff (PTX ISA 9.7.13.2): the lanes of a warp meet here,
        and shared-memory writes before it are visible to every lane after it."""
        cuda.syncwarp(0xFFFFFFFF)
