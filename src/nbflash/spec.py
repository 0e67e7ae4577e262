"""The frozen description of one kernel specialization, and its readable key.

Every compile-time choice lives here; the key spells them all out, so a cache
entry, an error message and a benchmark row name exactly the kernel that ran.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    """The attention variants compiled into a kernel (issue 7); their run-time values
    (window bounds, softcap, slopes, bias, mask, dropout threshold and seed) are kernel
    arguments, see nbflash.variants.

    window: a sliding window (left, right) bounds each row's keys; tiles outside it
        are skipped.
    softcap: scores become softcap * tanh(scores / softcap) before the softmax.
    alibi: -slope * |i + seqlen_k - seqlen_q - j| is added to the scores.
    bias: "" for none, else the short dtype name of an additive bias read through
        its strides.
    mask: a boolean mask (True attends) read through its strides.
    dropout: Philox dropout on P (nbflash.dropout).
    bias_staged / mask_staged: the tensor-core forward copies bias / mask tiles to
        shared memory with cp.async (kernels/bias_tile.py) instead of reading each
        element from global memory; only for layouts it can copy (contiguous keys,
        16-byte aligned rows), decided on the host by variants.check_variants.
    """

    window: bool = False
    softcap: bool = False
    alibi: bool = False
    bias: str = ""
    mask: bool = False
    dropout: bool = False
    bias_staged: bool = False
    mask_staged: bool = False

    @property
    def key(self) -> str:
        """"" for plain attention, else e.g. "-win-cap-alibi-bias_fp32-mask-drop" (staged
        tiles: "-bias_fp16_smem", "-mask_smem")."""
        parts = [name for name, on in (("win", self.window), ("cap", self.softcap), ("alibi", self.alibi))
                 if on]
        parts += [f"bias_{self.bias}" + ("_smem" if self.bias_staged else "")] if self.bias else []
        parts += ["mask" + ("_smem" if self.mask_staged else "")] if self.mask else []
        parts += ["drop"] if self.dropout else []
        return "".join("-" + p for p in parts)

    def __bool__(self) -> bool:
        return self != PLAIN


PLAIN = Variant()


@dataclass(frozen=True)
class ForwardSpec:
    """A forward-attention kernel specialization.

    kernel: "simt" (portable, any dtype), "mma" (tensor cores, fp16/bf16) or "wgmma"
        (Hopper warpgroup MMA, fp16/bf16, dense; window, softcap, ALiBi; default on sm_90,
        NBFLASH_WGMMA=0 turns it off).
    dtype: short dtype name ("fp16", "bf16", "fp32", "fp64").
    head_dim / head_dim_v: head sizes of q/k and of v.
    causal: bottom-right-aligned causal mask compiled in.
    with_lse: the kernel writes the log-sum-exp.
    block_m / block_n: query rows and key rows per tile; threads: per CTA.
    stages: shared-memory K/V buffers (mma only; 1 for simt).
    q_in_registers: the Q fragments stay in registers for the whole kernel instead of
        being re-read from shared memory every key tile (mma only).
    varlen: packed variable-length sequences (nbflash.attention_varlen): each CTA reads
        its sequence's offsets and lengths from cu_seqlens arrays.
    variant: the attention variants compiled in (window, softcap, ...; see Variant).
    softmax_overlap: wgmma only: each key tile's softmax runs while the previous tile's
        O += P V is on the tensor cores (FlashAttention-3's intra-warpgroup pipelining;
        costs a second S tile of registers, so tuning.wgmma_overlap picks it per head_dim).
    exp2_fma: wgmma only: of every four 8-key blocks of a tile's scores, this many take
        their exp2 on the FMA pipe (kernels.ptx.ex2_fma) instead of the MUFU, which
        softcap's tanh loads as much again (tuning.wgmma_exp2_fma).
    """

    kernel: str
    dtype: str
    head_dim: int
    head_dim_v: int
    causal: bool
    with_lse: bool
    block_m: int
    block_n: int
    threads: int
    stages: int = 1
    q_in_registers: bool = False
    varlen: bool = False
    variant: Variant = PLAIN
    softmax_overlap: bool = False
    exp2_fma: int = 0

    @property
    def module(self) -> str:
        """The nbflash.kernels module that builds this specialization."""
        return f"forward_{self.kernel}"

    @property
    def key(self) -> str:
        flags = ("-causal" if self.causal else "") + ("-lse" if self.with_lse else "")
        flags += ("-varlen" if self.varlen else "") + self.variant.key
        stages = f"s{self.stages}" + ("qr" if self.q_in_registers else "") if self.kernel != "simt" else ""
        stages += "ov" if self.softmax_overlap else ""
        stages += f"e{self.exp2_fma}" if self.exp2_fma else ""
        return (
            f"fwd_{self.kernel}-{self.dtype}-d{self.head_dim}-dv{self.head_dim_v}{flags}"
            f"-m{self.block_m}n{self.block_n}t{self.threads}{stages}"
        )

    def __str__(self) -> str:
        return self.key


@dataclass(frozen=True)
class BackwardSpec:
    """A backward-attention specialization: the kernels that turn (do, q, k, v, out,
    lse) into (dq, dk, dv), built together by ``kernels/backward_<kernel>.py``.

    kernel: "simt" (portable, any dtype); other families plug in by name.
    dtype, head_dim, head_dim_v, causal: as in ForwardSpec.
    block_m / block_n: query rows and key rows per tile; threads: per CTA.
    stages: shared-memory buffers per streamed tile (1 for simt).
    variant: the attention variants compiled in (see Variant).
    dbias: the kernels also write dS, the gradient of an additive bias (needs a bias
        variant; attention_backward(..., return_dbias=True)).
    """

    kernel: str
    dtype: str
    head_dim: int
    head_dim_v: int
    causal: bool
    block_m: int
    block_n: int
    threads: int
    stages: int = 1
    variant: Variant = PLAIN
    dbias: bool = False

    @property
    def module(self) -> str:
        """The nbflash.kernels module that builds this specialization."""
        return f"backward_{self.kernel}"

    @property
    def key(self) -> str:
        flags = ("-causal" if self.causal else "") + self.variant.key + ("-dbias" if self.dbias else "")
        stages = f"s{self.stages}" if self.kernel != "simt" else ""
        return (
            f"bwd_{self.kernel}-{self.dtype}-d{self.head_dim}-dv{self.head_dim_v}{flags}"
            f"-m{self.block_m}n{self.block_n}t{self.threads}{stages}"
        )

    def __str__(self) -> str:
        return self.key


@dataclass(frozen=True)
class BackwardMmaSpec:
    """The tensor-core backward (fp16/bf16): a plan of up to three kernels.

    part: "plan" names the whole backward (what kernels.backward_mma.launch_backward
        takes); the kernels it launches are the same spec with part set to
        "dkdv" (dK and dV), "dkdvq" (dK, dV and float32 dQ atomics), "dq" (dQ alone,
        no atomics: the deterministic path) or "dq_convert" (float32 dQ to 16 bits).
    dtype: "fp16" or "bf16". head_dim: of q, k and v (equal).
    causal: bottom-right-aligned causal mask compiled in.
    block_m / block_n / threads: query rows per streamed tile, keys per CTA and
        threads of the dK/dV kernel; kv_in_registers keeps its K and V A-fragments
        in registers instead of re-reading them from shared memory.
    dq_block_m / dq_block_n / dq_threads / dq_in_registers: the same for the
        separate dQ kernel (query rows per CTA, keys per streamed tile; Q and dO
        A-fragments in registers).
    dq_atomics: without deterministic=True, dQ comes from float32 atomics in the
        dK/dV kernel ("dkdvq" + "dq_convert") instead of the separate dQ kernel.
    variant: the attention variants compiled in (see Variant).
    dbias: the dK/dV kernel also writes dS, the gradient of an additive bias.
    varlen: packed variable-length sequences (nbflash.attention_varlen_backward): the
        dK/dV and dQ kernels read their sequence's offsets and lengths from cu_seqlens
        arrays (blockIdx.z is the sequence), as ForwardSpec.varlen.
    wgmma: the Hopper (sm_90a) kernels of kernels/backward_wgmma.py: block_n is 64
        keys per warpgroup of the dK/dV kernel and dq_block_m 64 query rows per
        warpgroup of the dQ kernel; with dq_atomics, "dkdvq" fuses dQ (bulk float32
        reductions into a tile-contiguous accumulator, block_m 64).
    exp2_fma: of every four 8-query blocks of P, how many the fused wgmma kernel's softcap
        path takes exp2 of on the FMA pipe (kernels.ptx.ex2_fma; tuning.wgmma_bwd_exp2_fma).
    """

    dtype: str
    head_dim: int
    causal: bool
    block_m: int
    block_n: int
    threads: int
    kv_in_registers: bool
    dq_block_m: int
    dq_block_n: int
    dq_threads: int
    dq_in_registers: bool
    dq_atomics: bool = False
    variant: Variant = PLAIN
    part: str = "plan"
    dbias: bool = False
    varlen: bool = False
    wgmma: bool = False
    exp2_fma: int = 0

    @property
    def module(self) -> str:
        return "backward_wgmma" if self.wgmma else "backward_mma"

    @property
    def key(self) -> str:
        family = "bwd_wgmma" if self.wgmma else "bwd_mma"
        name = family if self.part == "plan" else f"{family}_{self.part}"
        flags = ("-causal" if self.causal else "") + self.variant.key + ("-dbias" if self.dbias else "")
        flags += "-varlen" if self.varlen else ""
        return (
            f"{name}-{self.dtype}-d{self.head_dim}{flags}"
            f"-m{self.block_m}n{self.block_n}t{self.threads}" + ("kvr" if self.kv_in_registers else "")
            + f"-dq_m{self.dq_block_m}n{self.dq_block_n}t{self.dq_threads}" + ("qr" if self.dq_in_registers else "")
            + ("-dqatomic" if self.dq_atomics else "") + (f"-e{self.exp2_fma}" if self.exp2_fma else "")
        )

    def __str__(self) -> str:
        return self.key


@dataclass(frozen=True)
class DeltaSpec:
    """The tensor-core backward's preprocess (kernels/backward_delta.py): delta =
    rowsum(dO * O) in float32, 16-byte loads, head_dim / 8 lanes per row (rounded up to
    a power of two).

    dtype: "fp16" or "bf16"; head_dim_v: of dO and O (a multiple of 8, at most 256);
    threads: per CTA.
    """

    dtype: str
    head_dim_v: int
    threads: int

    @property
    def module(self) -> str:
        return "backward_delta"

    @property
    def key(self) -> str:
        return f"bwd_delta-{self.dtype}-dv{self.head_dim_v}-t{self.threads}"

    def lanes_per_row(self) -> int:
        """head_dim_v / 8 (one 16-byte load each) rounded up to a power of two: the
        butterfly reduction needs one; lanes past the row's end add 0."""
        lanes = 1
        while lanes * 8 < self.head_dim_v:
            lanes *= 2
        return lanes

    def rows_per_cta(self) -> int:
        return self.threads // self.lanes_per_row()

    def __str__(self) -> str:
        return self.key


@dataclass(frozen=True)
class DecodeSpec:
    """A split-KV decoding kernel specialization (attention_with_kvcache).

    One CTA owns one (split, kv head, batch) and ``rows`` query rows of that kv head's
    group (all of them when group * seqlen_q <= rows).

    dtype: short dtype name. head_dim / head_dim_v: of q/k and of v.
    rows: query rows (heads of the group x seqlen_q) per CTA, kept in registers.
    causal: bottom-right-aligned causal mask over each sequence's total length.
    block_size: 0 for a contiguous cache, else the paged cache's block size.
    vectorized: cache rows are read 16 bytes at a time (aligned rows, head dims
        multiples of 16 bytes); scalar loads otherwise.
    split: write float32/float64 partial outputs and lse for the combine kernel;
        else the final output (and lse with ``with_lse``) directly.
    threads: per CTA; unroll: keys each thread has in flight per loop step.
    """

    dtype: str
    head_dim: int
    head_dim_v: int
    rows: int
    causal: bool
    block_size: int
    vectorized: bool
    split: bool
    with_lse: bool
    threads: int
    unroll: int

    @property
    def module(self) -> str:
        return "decode"

    @property
    def key(self) -> str:
        cache = f"-paged{self.block_size}" if self.block_size else "-contig"
        loads = "-v16" if self.vectorized else "-scalar"
        out = "-split" if self.split else ("-lse" if self.with_lse else "")
        return (
            f"decode-{self.dtype}-d{self.head_dim}-dv{self.head_dim_v}-r{self.rows}"
            f"{'-causal' if self.causal else ''}{cache}{loads}{out}-t{self.threads}u{self.unroll}"
        )

    def __str__(self) -> str:
        return self.key


@dataclass(frozen=True)
class CombineSpec:
    """The kernel that merges split-KV partial outputs by their log-sum-exp.

    dtype: of the final output; head_dim_v; with_lse: also write the merged lse.
    """

    dtype: str
    head_dim_v: int
    with_lse: bool
    threads: int

    @property
    def module(self) -> str:
        return "decode_combine"

    @property
    def key(self) -> str:
        return f"combine-{self.dtype}-dv{self.head_dim_v}{'-lse' if self.with_lse else ''}-t{self.threads}"

    def __str__(self) -> str:
        return self.key


@dataclass(frozen=True)
class AppendSpec:
    """The kernel that writes new k/v tokens into a KV cache (bit copies).

    bits: element width (16, 32, 64); paged: through a block table.
    """

    bits: int
    paged: bool
    threads: int

    @property
    def module(self) -> str:
        return "kv_append"

    @property
    def key(self) -> str:
        return f"kv_append-b{self.bits}{'-paged' if self.paged else '-contig'}-t{self.threads}"

    def __str__(self) -> str:
        return self.key


@dataclass(frozen=True)
class DecodeMmaSpec:
    """The tensor-core split-KV decoding kernel (kernels/decode_mma.py): the fast path
    of attention_with_kvcache for float16 / bfloat16 caches whose rows start on 16
    bytes, head dims multiples of 8.

    One CTA owns one (split, kv head, batch) and 16 query rows (``rows``) of that kv
    head's group; each of its threads // 32 warps streams its own 16-key tiles of K
    and V through a ``stages``-deep cp.async ring in shared memory.
    dtype: "fp16" or "bf16". causal, block_size, split, with_lse: as DecodeSpec's.
    """

    dtype: str
    head_dim: int
    head_dim_v: int
    causal: bool
    block_size: int
    split: bool
    with_lse: bool
    threads: int
    stages: int

    rows = 16  # one m16n8k16 row slice

    @property
    def module(self) -> str:
        return "decode_mma"

    @property
    def key(self) -> str:
        cache = f"-paged{self.block_size}" if self.block_size else "-contig"
        out = "-split" if self.split else ("-lse" if self.with_lse else "")
        return (
            f"decode_mma-{self.dtype}-d{self.head_dim}-dv{self.head_dim_v}-r{self.rows}"
            f"{'-causal' if self.causal else ''}{cache}{out}-w{self.threads // 32}s{self.stages}"
        )

    def __str__(self) -> str:
        return self.key
