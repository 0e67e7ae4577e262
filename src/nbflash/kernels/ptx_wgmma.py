"""Hopper (sm_90a) warpgroup MMA intrinsics: wgmma.mma_async and its fences, the
shared-memory matrix descriptor, and the one shared-memory tile layout they use, each
with a simulator twin (PTX ISA 9.7.15, "Asynchronous Warpgroup Level Matrix Multiply-
Accumulate"). ptx.py keeps the sm_80 catalogue; this module builds on its helpers.

A warpgroup is 4 consecutive warps (threads 128w .. 128w + 127 of a CTA); every wgmma
instruction is executed by all 128 of them together.

The tile layout (chosen once, for every operand): 128-byte swizzle, 16-bit elements.
A tile of ``rows`` rows and ``cols`` columns (cols a multiple of 64) is stored as
cols / 64 panels of rows x 64 elements; in a panel, row r takes 128 bytes at r * 128
and its 16-byte chunk c (elements 8c .. 8c + 7) sits at chunk position c ^ (r % 8).
The XOR is what the hardware applies to the address bits [4:6] ^= [7:9] in 128-byte
swizzle mode, so each panel must start on a 1024-byte boundary (base offset 0):
    byte(r, col) = (col // 64) * rows * 128 + r * 128 + ((col % 64 // 8) ^ (r % 8)) * 16 + (col % 8) * 2
Why this layout: it is the one CUTLASS and FlashAttention-3 use for K-major 16-bit tiles
with 64-element rows; the same (row, col) map is a valid operand both ways, K-major
(Q and K: row = M or N index, col = k) and MN-major (V as the B of P V: row = key = k,
col = head-dim = n), so one copy routine fills Q, K and V; the 8 chunks of a row land on
8 different bank groups, so 16-byte cp.async writes of a row (and 8 rows of one chunk
column) are conflict-free, which the no-swizzle interleaved layout is not (there the 8
chunks of a row are LBO apart and share a bank group).

Descriptors (PTX ISA 9.7.15.5.1.2.2, 64 bits): bits 0-13 start address >> 4, 16-29
leading-dimension byte offset (LBO) >> 4, 32-45 stride-dimension byte offset (SBO) >> 4,
49-51 base offset (0: panels are 1024-aligned), 62-63 swizzle mode (1 = 128 bytes).
For this layout: SBO = 1024 (8 rows of 128 bytes: the next 8 M/N rows of a K-major
operand, the next 8 k-rows of an MN-major one); LBO is unused for K-major ("assumed 1")
and is the panel stride (rows * 128 bytes) for MN-major (the next 64 N columns). A
k-step of 16 columns inside a panel advances the start address by 32 bytes; the next
panel by the panel size.

Fragments (per thread, g = lane // 4, t = lane % 4, w = warp within the warpgroup):
    D (m64nN, f32): N / 2 floats; d[4j + 0], d[4j + 1] at row 16w + g, cols 8j + 2t, +1;
        d[4j + 2], d[4j + 3] at row 16w + g + 8, same cols (j < N / 8). The same as N / 8
        mma.m16n8 C fragments side by side, warp w holding rows 16w .. 16w + 15.
    A from registers (m64k16, 16-bit): four .b32, mma.m16n8k16's A fragment of rows
        16w .. 16w + 15 (ptx.py's docstring).
The accumulator operand is a float32 local array (its first N / 2 elements) updated in
place, as the sm_80 kernels keep fragments: wgmma reads and writes it asynchronously,
so nothing may touch it between the wgmma and the wgmma_wait that retires it, and
fence_operands must follow the wait (it stops the compiler from moving uses of the
results above the wait; the hardware orders itself).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
from numba import cuda
from numba.cuda import uint32, uint64

from . import ptx

SIMULATED = ptx.SIMULATED

SWIZZLE_BYTES = 128
PANEL_COLS = 64  # 16-bit elements per 128-byte row
SBO_BYTES = 1024
TILE_ALIGN = 1024  # the 128-byte swizzle pattern repeats every 8 rows of 128 bytes
_SWIZZLE_128B = 1
DESC_HIGH = (SBO_BYTES >> 4) << 32 | _SWIZZLE_128B << 62
"""Descriptor bits above the addresses: SBO and the 128-byte swizzle mode."""


def panel_bytes(rows: int) -> int:
    """Bytes of one 64-column panel of a tile with ``rows`` rows (the MN-major LBO)."""
    return rows * SWIZZLE_BYTES


def tile_bytes(rows: int, cols: int) -> int:
    assert cols % PANEL_COLS == 0, cols
    return rows * cols * 2


@cuda.jit(device=True, inline=True)
def chunk_word(row, chunk, rows):
    """32-bit word index, from the tile start, of 16-byte chunk ``chunk`` (columns 8 chunk
    .. 8 chunk + 7) of row ``row`` in a tile of ``rows`` rows (the layout above)."""
    return ((chunk // 8) * rows + row) * 32 + (((chunk % 8) ^ (row % 8)) * 4)


@cuda.jit(device=True, inline=True)
def element_word(row, col, rows):
    """(word index, half) of 16-bit element (row, col): half 0 is the word's low 16 bits."""
    return chunk_word(row, col // 8, rows) + (col % 8) // 2, col % 2


if SIMULATED:
    import threading

    from ..simulator import current_warpgroup

    def _lane128():
        return threading.current_thread().thread_id % 128

    class _Desc(int):
        """A descriptor on the simulator: its 64 bits, and the shared array the start
        address points into (shared addresses are byte offsets into that array; the
        array itself stands at a 1024-byte boundary)."""

        array = None

        def __new__(cls, value, array):
            d = super().__new__(cls, int(value) & 0xFFFFFFFFFFFFFFFF)
            d.array = array
            return d

    def shared_align_words(smem):
        """Words to skip from smem[0] to the first 1024-byte boundary (0 here)."""
        return 0

    def smem_desc(address, lbo_bytes):
        """The descriptor of a tile at ``address`` (ptx.shared_address of its first word),
        128-byte swizzle, SBO 1024 and the given LBO (bytes)."""
        byte = address.index[-1] * address.array.dtype.itemsize
        return _Desc(((byte & 0x3FFFF) >> 4) | ((lbo_bytes >> 4) << 16) | DESC_HIGH, address.array)

    def desc_add(desc, nbytes):
        """The descriptor of the matrix ``nbytes`` further on (a multiple of 16)."""
        return _Desc(int(desc) + (int(nbytes) >> 4), desc.array)

    def decode_desc(desc):
        """(start, lbo, sbo, swizzle bytes) of a descriptor, bytes."""
        v = int(desc)
        mode = (v >> 62) & 3
        swizzle = {0: 0, 1: 128, 2: 64, 3: 32}[mode]
        assert (v >> 49) & 7 == 0, "base offset other than 0 is not emulated"
        return (v & 0x3FFF) << 4, ((v >> 16) & 0x3FFF) << 4, ((v >> 32) & 0x3FFF) << 4, swizzle

    _offsets_cache: dict = {}

    def operand_offsets(desc, rows, k_major):
        """Byte addresses of a (rows x 16) K-major or (16 x rows) MN-major operand, as an
        array indexed [mn, k], from the PTX ISA's canonical layouts (9.7.15.5.1.2.1.3):
            K-major:  ((8, m), (T, 2)) : ((swz / 16 T or 1T, SBO), (1, T or LBO))
            MN-major: ((T, swz / 16, m), (8, k)) : ((1, T, LBO), (swz / 16 T, SBO)),
                      no swizzle: ((T, 1, m), (8, k)) : ((1, T, SBO), (1T, LBO))
        (T = 8 elements = 16 bytes), then the swizzle XOR of address bits [4:..] with
        [7:..]. Written from the ISA independently of element_word, so the tests check
        one against the other."""
        start, lbo, sbo, swizzle = decode_desc(desc)
        key = (start, lbo, sbo, swizzle, rows, k_major)
        found = _offsets_cache.get(key)
        if found is not None:
            return found
        mn = np.arange(rows)[:, None]
        k = np.arange(16)[None, :]
        if k_major:
            if swizzle:
                off = (mn % 8) * swizzle + (mn // 8) * sbo + (k // 8) * 16 + (k % 8) * 2
            else:
                off = (mn % 8) * 16 + (mn // 8) * sbo + (k // 8) * lbo + (k % 8) * 2
        else:
            if swizzle:
                per = swizzle // 16  # 16-byte chunks per swizzled row
                off = ((mn % 8) * 2 + ((mn // 8) % per) * 16 + (mn // (8 * per)) * lbo
                       + (k % 8) * swizzle + (k // 8) * sbo)
            else:
                off = (mn % 8) * 2 + (mn // 8) * sbo + (k % 8) * 16 + (k // 8) * lbo
        addr = start + off
        if swizzle:
            mask = swizzle // 16 - 1
            addr = addr ^ (((addr >> 7) & mask) << 4)
        _offsets_cache[key] = addr
        return addr

    def _read_operand(desc, rows, k_major, dtype):
        """The operand as float64, indexed [mn, k]."""
        addr = operand_offsets(desc, rows, k_major)
        raw = np.ascontiguousarray(desc.array).view(np.uint16)
        assert (addr % 2 == 0).all() and addr.max() < raw.size * 2, "descriptor points outside the shared array"
        return raw[addr // 2].view(dtype).astype(np.float64)

    def _a_from_registers(a0, a1, a2, a3, dtype):
        regs = current_warpgroup().exchange(_lane128(), (a0, a1, a2, a3))
        A = np.zeros((64, 16))
        for lane, r in enumerate(regs):
            w, g, t = lane // 32, lane % 32 // 4, lane % 4
            row = 16 * w + g
            A[row, 2 * t:2 * t + 2] = ptx._halves(r[0], dtype)
            A[row + 8, 2 * t:2 * t + 2] = ptx._halves(r[1], dtype)
            A[row, 2 * t + 8:2 * t + 10] = ptx._halves(r[2], dtype)
            A[row + 8, 2 * t + 8:2 * t + 10] = ptx._halves(r[3], dtype)
        return A

    def _accumulate(acc, n, A, B, scale_d):
        """acc (this thread's D fragment) = A B (+ acc when scale_d)."""
        lane = _lane128()
        w, g, t = lane // 32, lane % 32 // 4, lane % 4
        rows = np.array([16 * w + g, 16 * w + g + 8])
        D = A[rows] @ B  # (2, n)
        for j in range(n // 8):
            for half in range(2):
                for e in range(2):
                    i = 4 * j + 2 * half + e
                    c = np.float64(acc[i]) if scale_d else 0.0
                    acc[i] = np.float32(D[half, 8 * j + 2 * t + e] + c)

    def _b_operand(desc_b, n, trans_b, dtype):
        B = _read_operand(desc_b, n, not trans_b, dtype)  # [n, k]
        return B.T

    def wgmma_ss(dtype: str, n: int, trans_b: bool, trans_a: bool = False):
        """wgmma.mma_async m64n{n}k16, A and B from shared memory: ``fn(acc, desc_a,
        desc_b, scale_d)``, acc += A B (acc = A B when scale_d is 0); A K-major
        (element (m, k) at row m, column k) or, with trans_a, MN-major (at row k,
        column m); B K-major (element (k, n) at row n, column k of its tile) or, with
        trans_b, MN-major (element (k, n) at row k, column n)."""
        np_dtype = _NP[dtype]

        def fn(acc, desc_a, desc_b, scale_d):
            A = _read_operand(desc_a, 64, not trans_a, np_dtype)
            B = _b_operand(desc_b, n, trans_b, np_dtype)
            current_warpgroup().barrier.wait()  # every thread has read before anyone moves on
            _accumulate(acc, n, A, B, scale_d)

        return fn

    def wgmma_rs(dtype: str, n: int, trans_b: bool):
        """As wgmma_ss with A from registers: ``fn(acc, a0, a1, a2, a3, desc_b, scale_d)``."""
        np_dtype = _NP[dtype]

        def fn(acc, a0, a1, a2, a3, desc_b, scale_d):
            A = _a_from_registers(a0, a1, a2, a3, np_dtype)
            B = _b_operand(desc_b, n, trans_b, np_dtype)
            _accumulate(acc, n, A, B, scale_d)

        return fn

    _NP = {"fp16": np.float16, "bf16": ml_dtypes.bfloat16}

    def wgmma_fence():
        """wgmma.fence: the twin's wgmma is synchronous; nothing to order."""

    def wgmma_commit():
        pass

    def wgmma_wait(n):
        pass

    def fence_proxy_async():
        pass

    def fence_operands(acc, count):
        pass

    def bulk_reduce_add_f32(dst, src, nbytes):
        """The twin of cp.reduce.async.bulk ... .add.f32: dst (a global_address of a
        float32 array) and on, nbytes / 4 elements in row-major order, += the float32
        words at src (a shared_address into the uint32 shared array); synchronous here."""
        n = int(nbytes) // 4
        start = src.index[-1]
        values = np.ascontiguousarray(src.array[start:start + n]).view(np.float32)
        flat = dst.array.reshape(-1)  # a view: the accumulator is contiguous
        at = int(np.ravel_multi_index(dst.index, dst.array.shape))
        with ptx._red_lock:
            flat[at:at + n] += values

    def bulk_commit():
        pass

    def bulk_wait_read(n):
        pass

    def bulk_wait(n):
        pass

else:
    from llvmlite import ir
    from numba.cuda import types
    from numba.cuda.extending import intrinsic

    _i32 = ir.IntType(32)
    _f32 = ir.FloatType()
    _asm = ptx._asm

    @cuda.jit(device=True, inline=True)
    def shared_align_words(smem):
        """Words to skip from smem[0] to the first 1024-byte boundary of the shared window."""
        return ((uint32(TILE_ALIGN) - (ptx.shared_address(smem, (0,)) & uint32(TILE_ALIGN - 1)))
                & uint32(TILE_ALIGN - 1)) >> uint32(2)

    @cuda.jit(device=True, inline=True)
    def smem_desc(address, lbo_bytes):
        """The descriptor of a tile at shared address ``address``: 128-byte swizzle,
        SBO 1024, LBO ``lbo_bytes`` (the module docstring has the bit layout)."""
        return (uint64((address & uint32(0x3FFFF)) >> uint32(4))
                | (uint64(lbo_bytes >> 4) << uint64(16)) | uint64(DESC_HIGH))

    @cuda.jit(device=True, inline=True)
    def desc_add(desc, nbytes):
        """The descriptor of the matrix ``nbytes`` (a multiple of 16) further on: the
        start address is the low field and never carries out of it (< 256 KB)."""
        return desc + uint64(nbytes >> 4)

    def _simple(name, text, doc):
        def typer(typingctx):
            def codegen(context, builder, sig, args):
                _asm(builder, text, "~{memory}", ir.VoidType(), [])
                return context.get_dummy_value()

            return types.void(), codegen

        typer.__name__ = name
        fn = intrinsic(typer)
        fn.__doc__ = doc
        return fn

    wgmma_fence = _simple("wgmma_fence", "wgmma.fence.sync.aligned;",
                          "wgmma.fence.sync.aligned (9.7.15.5.2): orders register and shared-memory "
                          "accesses before it with the wgmma.mma_async after it; required before the "
                          "first wgmma and whenever its accumulator or A registers were written since.")
    wgmma_commit = _simple("wgmma_commit", "wgmma.commit_group.sync.aligned;",
                           "wgmma.commit_group.sync.aligned: close the group of wgmma issued so far.")
    fence_proxy_async = _simple(
        "fence_proxy_async", "fence.proxy.async.shared::cta;",
        "fence.proxy.async.shared::cta: makes this thread's generic-proxy shared-memory writes "
        "(st.shared, and non-bulk cp.async, which is generic: only cp.async.bulk runs in the async "
        "proxy, PTX ISA 9.7.9.25.2) visible to async-proxy reads (wgmma's operand fetches). Each "
        "writing thread fences after its copies complete, then a barrier, then the wgmma.")

    bulk_commit = _simple("bulk_commit", "cp.async.bulk.commit_group;",
                          "cp.async.bulk.commit_group (PTX ISA 9.7.9.25.6.1): close the bulk-async "
                          "group of the cp.reduce.async.bulk issued so far by this thread.")

    @intrinsic
    def bulk_reduce_add_f32(typingctx, dst, src, nbytes):
        """cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [dst], [src], nbytes
        (PTX ISA 9.7.9.25.4.3): the bulk copy engine adds nbytes / 4 float32 from shared
        memory (src, a 32-bit shared address) into global memory (dst, 64-bit), each
        element atomically; both 16-byte aligned, nbytes a multiple of 16. Issued by one
        thread; the source may be overwritten after bulk_wait_read."""

        def codegen(context, builder, sig, args):
            size = context.cast(builder, args[2], sig.args[2], types.uint32)
            _asm(builder, "cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [$0], [$1], $2;",
                 "l,r,r,~{memory}", ir.VoidType(), [args[0], args[1], size])
            return context.get_dummy_value()

        return types.void(types.uint64, types.uint32, nbytes), codegen

    def _bulk_wait(name, read):
        def typer(typingctx, n):
            if not isinstance(n, types.IntegerLiteral):
                return None
            text = f"cp.async.bulk.wait_group{'.read' if read else ''} {n.literal_value};"

            def codegen(context, builder, sig, args):
                _asm(builder, text, "~{memory}", ir.VoidType(), [])
                return context.get_dummy_value()

            return types.void(n), codegen

        typer.__name__ = name
        return intrinsic(typer)

    bulk_wait_read = _bulk_wait("bulk_wait_read", True)
    bulk_wait_read.__doc__ = ("cp.async.bulk.wait_group.read n: at most n of this thread's bulk groups still "
                              "read their shared-memory source (n a compile-time constant).")
    bulk_wait = _bulk_wait("bulk_wait", False)
    bulk_wait.__doc__ = "cp.async.bulk.wait_group n: at most n of this thread's bulk groups are incomplete."

    @intrinsic
    def wgmma_wait(typingctx, n):
        """wgmma.wait_group.sync.aligned n: wait until at most n committed groups are in
        flight (n a compile-time constant)."""
        if not isinstance(n, types.IntegerLiteral):
            return None
        pending = n.literal_value

        def codegen(context, builder, sig, args):
            _asm(builder, f"wgmma.wait_group.sync.aligned {pending};", "~{memory}", ir.VoidType(), [])
            return context.get_dummy_value()

        return types.void(n), codegen

    def _acc_pointer(context, builder, aryty, ary, i):
        data = context.make_array(aryty)(context, builder, ary).data
        return builder.gep(data, [ir.Constant(ir.IntType(64), i)], inbounds=True)

    @intrinsic
    def fence_operands(typingctx, acc, count):
        """Pass acc[0 .. count) through an empty volatile asm: after wgmma_wait, so the
        compiler cannot move uses of wgmma results above the wait (CUTLASS's
        warpgroup_fence_operand)."""
        if not isinstance(count, types.IntegerLiteral) or not isinstance(acc, types.Array):
            return None
        n = count.literal_value

        def codegen(context, builder, sig, args):
            for i in range(n):
                ptr = _acc_pointer(context, builder, sig.args[0], args[0], i)
                val = _asm(builder, "", "=f,0", _f32, [builder.load(ptr)])
                builder.store(val, ptr)
            return context.get_dummy_value()

        return types.void(acc, count), codegen

    _KIND = {"fp16": "f16", "bf16": "bf16"}
    _made: dict = {}

    def _wgmma_text(kind, n, trans_b, a_in_registers, fresh, trans_a=False):
        """(PTX, constraints) of one wgmma; ``fresh`` (scale_d a literal 0): D = A B,
        the accumulator's old values are not operands (so not kept alive for it)."""
        regs = n // 2
        d = ", ".join(f"${i}" for i in range(regs))
        first = regs if fresh else 2 * regs  # operands: outputs, [tied inputs], then the rest
        if a_in_registers:
            a = "{" + ", ".join(f"${first + i}" for i in range(4)) + "}"
            nxt = first + 4
            tail = f"1, 1, {int(trans_b)}"  # imm-scale-a, imm-scale-b, imm-trans-b
            a_cons = ["r"] * 4
        else:
            a = f"${first}"
            nxt = first + 1
            tail = f"1, 1, {int(trans_a)}, {int(trans_b)}"  # imm-scale-a, -b, imm-trans-a, imm-trans-b
            a_cons = ["l"]
        text = (f"{{ .reg .pred p; setp.ne.b32 p, ${nxt + 1}, 0; "
                f"wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{kind}.{kind} "
                f"{{{d}}}, {a}, ${nxt}, p, {tail}; }}")
        tied = [] if fresh else [str(i) for i in range(regs)]
        return text, ",".join(["=f"] * regs + tied + a_cons + ["l", "r"])

    def _wgmma(dtype, n, trans_b, a_in_registers, trans_a=False):
        assert not (trans_a and a_in_registers), "an A from registers has one layout"
        key = (dtype, n, trans_b, a_in_registers, trans_a)
        if key in _made:
            return _made[key]
        assert n % 8 == 0 and 8 <= n <= 256, n
        regs = n // 2
        ret = ir.LiteralStructType([_f32] * regs)

        def make_codegen(fresh):
            text, constraints = _wgmma_text(_KIND[dtype], n, trans_b, a_in_registers, fresh, trans_a)

            def codegen(context, builder, sig, args):
                ptrs = [_acc_pointer(context, builder, sig.args[0], args[0], i) for i in range(regs)]
                old = [] if fresh else [builder.load(p) for p in ptrs]
                scale_d = context.cast(builder, args[-1], sig.args[-1], types.int32)
                res = _asm(builder, text, constraints, ret, old + list(args[1:-1]) + [scale_d])
                for i, p in enumerate(ptrs):
                    builder.store(builder.extract_value(res, i), p)
                return context.get_dummy_value()

            return codegen

        accumulate, fresh = make_codegen(False), make_codegen(True)

        def typing(acc, scale_d):
            if not isinstance(acc, types.Array) or not isinstance(scale_d, types.Integer):
                return None
            a_types = [types.uint32] * 4 if a_in_registers else [types.uint64]
            zero = isinstance(scale_d, types.IntegerLiteral) and scale_d.literal_value == 0
            return types.void(acc, *a_types, types.uint64, scale_d), (fresh if zero else accumulate)

        if a_in_registers:
            def typer(typingctx, acc, a0, a1, a2, a3, desc_b, scale_d):
                return typing(acc, scale_d)
        else:
            def typer(typingctx, acc, desc_a, desc_b, scale_d):
                return typing(acc, scale_d)

        name = f"wgmma_{'rs' if a_in_registers else 'ss'}_{dtype}_n{n}{'_ta' if trans_a else ''}{'_tb' if trans_b else ''}"
        typer.__name__ = name
        fn = intrinsic(typer)
        _made[key] = fn
        return fn

    def wgmma_ss(dtype: str, n: int, trans_b: bool, trans_a: bool = False):
        """wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{f16|bf16} with A and B from shared
        memory (descriptors): ``fn(acc, desc_a, desc_b, scale_d)``; acc (float32 local
        array, N / 2 used) += A B, or = A B when scale_d is 0 (a literal 0 also keeps the
        old accumulator out of the instruction's operands). A is K-major (element (m, k)
        at row m, column k) or, with trans_a, MN-major (at row k, column m: the 16-bit
        types' transposed A); B is K-major (element (k, n) at row n, column k of its
        tile) or, with trans_b, MN-major (element (k, n) at row k, column n)."""
        return _wgmma(dtype, n, trans_b, False, trans_a)

    def wgmma_rs(dtype: str, n: int, trans_b: bool):
        """As wgmma_ss with A from registers (four .b32 in mma.m16n8k16's A fragment
        layout, warp w of the warpgroup holding rows 16w .. 16w + 15):
        ``fn(acc, a0, a1, a2, a3, desc_b, scale_d)``."""
        return _wgmma(dtype, n, trans_b, True)
