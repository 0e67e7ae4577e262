"""The frozen description of one kernel specialization, and its readable key.

Every compile-time choice lives here; the key spells them all out, so a cache
entry, an error message and a benchmark row name exactly the kernel that ran.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ForwardSpec:
    """A forward-attention kernel specialization.

    kernel: "simt" (portable, any dtype) or "mma" (tensor cores, fp16/bf16).
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

    @property
    def module(self) -> str:
        """The nbflash.kernels module that builds this specialization."""
        return f"forward_{self.kernel}"

    @property
    def key(self) -> str:
        flags = ("-causal" if self.causal else "") + ("-lse" if self.with_lse else "")
        flags += "-varlen" if self.varlen else ""
        stages = f"s{self.stages}" + ("qr" if self.q_in_registers else "") if self.kernel != "simt" else ""
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

    @property
    def module(self) -> str:
        """The nbflash.kernels module that builds this specialization."""
        return f"backward_{self.kernel}"

    @property
    def key(self) -> str:
        flags = "-causal" if self.causal else ""
        stages = f"s{self.stages}" if self.kernel != "simt" else ""
        return (
            f"bwd_{self.kernel}-{self.dtype}-d{self.head_dim}-dv{self.head_dim_v}{flags}"
            f"-m{self.block_m}n{self.block_n}t{self.threads}{stages}"
        )

    def __str__(self) -> str:
        return self.key
