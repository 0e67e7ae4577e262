"""Compile the wgmma kernels for sm_90a without a GPU (Numba with cc=(9, 0, "a"), then
nvJitLink -arch=sm_90a -Xptxas=-v) and print one JSON line per kernel with its
resources: the probe's check and throughput kernels (kernels/wgmma_probe.py) and every
wgmma forward specialization the tuning ships (kernels/forward_wgmma.py), plain and with
each combination of window / softcap / ALiBi. Run by
tests/test_ptx_gate_wgmma.py in a subprocess with the simulator off. sm_80 is never
asked: wgmma exists on sm_90a only."""

import json
import os
import sys

os.environ["NUMBA_ENABLE_CUDASIM"] = "0"

from numba import cuda  # noqa: E402
from numba.cuda import types  # noqa: E402

from nbflash import tuning  # noqa: E402
from nbflash.kernels import backward_wgmma, forward_wgmma, wgmma_probe  # noqa: E402
from nbflash.spec import BackwardMmaSpec, ForwardSpec, Variant  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from ptx_gate_backward_worker import signature as backward_signature  # noqa: E402
from ptx_gate_worker import ptxas_report, ptxas_resources, variant_types  # noqa: E402

CC = (9, 0, "a")


def report(name, kernel, sig, **extra):
    fastmath = kernel.targetoptions.get("fastmath", False)
    ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=CC, fastmath=fastmath,
                              launch_bounds=kernel.targetoptions.get("launch_bounds"))
    log = ptxas_report(ptx, "sm_90a")
    print(json.dumps({
        "key": name, "arch": "sm_90a",
        **ptxas_resources(log),
        "wgmma": ptx.count("wgmma.mma_async.sync.aligned"),
        "mma_sync": ptx.count("mma.sync.aligned"),
        "serialized": "serialized" in log,  # ptxas: "wgmma.mma_async instructions are serialized"
        "log": log[-600:] if "serialized" in log else "",
        **extra,
    }), flush=True)


def probe_kernels():
    u16 = types.Array(types.uint16, 2, "A")
    f32 = types.Array(types.float32, 2, "A")
    for dtype, n, kd, dv, a_regs in (("fp16", 64, 128, 128, False), ("bf16", 128, 64, 64, True),
                                     ("fp16", 128, 128, 128, True), ("bf16", 64, 64, 128, False)):
        name = f"wgmma_check-{dtype}-n{n}-kd{kd}-dv{dv}-{'rs' if a_regs else 'ss'}"
        report(name, wgmma_probe.build_check(dtype, n, kd, dv, a_regs), (u16, u16, u16, f32, f32),
               threads=128, shared_bytes=wgmma_probe.check_shared_bytes(n, kd, dv), kind="probe")
    out = types.Array(types.float32, 1, "C")
    for a_regs in (False, True):
        report(f"wgmma_loop-fp16-n128-k4-{'rs' if a_regs else 'ss'}",
               wgmma_probe.build_wgmma_loop("fp16", 128, 4, a_regs), (out, types.int32),
               threads=256, shared_bytes=wgmma_probe.loop_shared_bytes(128, 4), kind="probe")


LIGHT_VARIANTS = [Variant(window=w, softcap=c, alibi=a) for w in (False, True) for c in (False, True)
                  for a in (False, True)]
"""Plain and every combination of the variants the wgmma forward compiles in
(tuning.wgmma_variant): window, softcap, ALiBi."""
BF16_VARIANTS = [Variant(), Variant(window=True, softcap=True, alibi=True)]
"""bf16 differs from fp16 only in the wgmma's type and the P pack: ptxas gave every
combination the same registers in both (all 64 compiled once, Nov 2026), so bf16 is
gated plain and with all three variants (the most registers) to keep the gate short."""


LSE_FREE_WINDOW_VARIANTS = [Variant(window=True), Variant(window=True, softcap=True)]
"""ptxas allocates a kernel without the lse store differently: with the softmax overlap
(tuning.wgmma_overlap, head_dim 128) the window kernels spill 56-64 bytes without lse and
none with it (Nov 2026), so those are gated both ways."""


def forward_specs():
    """Every wgmma forward specialization tuning.WGMMA_TILES ships (with lse, as the
    backward's forward runs it; the lse store is the only difference): fp16 plain and
    with each combination of LIGHT_VARIANTS, bf16 with BF16_VARIANTS, where
    tuning.wgmma_variant sends them (head_dim 64 and 128; plain only at 192 and 256),
    fp16 with FORWARD_SCORE_VARIANTS where their stages fit;
    and the varlen kernel, causal fp16, with BF16_VARIANTS where tuning.wgmma_varlen allows them."""
    for head_dim, (bm, bn, threads) in sorted(tuning.WGMMA_TILES.items()):
        stages = tuning.wgmma_stages(head_dim, bm, bn)
        for dtype, variants in (("fp16", LIGHT_VARIANTS), ("bf16", BF16_VARIANTS)):
            for causal in (False, True):
                for variant in (v for v in variants if tuning.wgmma_variant(v, head_dim)):
                    yield ForwardSpec("wgmma", dtype, head_dim, head_dim, causal, True, bm, bn, threads, stages,
                                      variant=variant, softmax_overlap=tuning.wgmma_overlap(head_dim, variant),
                                      exp2_fma=tuning.wgmma_exp2_fma(head_dim, variant))
        if tuning.wgmma_overlap(head_dim):
            for causal in (False, True):
                for variant in LSE_FREE_WINDOW_VARIANTS:
                    yield ForwardSpec("wgmma", "fp16", head_dim, head_dim, causal, False, bm, bn, threads, stages,
                                      variant=variant, softmax_overlap=tuning.wgmma_overlap(head_dim, variant),
                                      exp2_fma=tuning.wgmma_exp2_fma(head_dim, variant))
        for variant, causals in FORWARD_SCORE_VARIANTS:  # staged bias / mask, where their stages fit
            if not tuning.wgmma_variant(variant, head_dim, scores=True):
                continue
            for stages_wanted in (stages, 2):  # as api.choose_forward_spec: fewer K/V stages if need be
                spec = ForwardSpec("wgmma", "fp16", head_dim, head_dim, False, True, bm, bn, threads, stages_wanted,
                                   variant=variant, softmax_overlap=tuning.wgmma_overlap(head_dim, variant),
                                   exp2_fma=tuning.wgmma_exp2_fma(head_dim, variant))
                if forward_wgmma.shared_bytes(spec) <= tuning.WGMMA_MAX_SHARED_BYTES:
                    for causal in causals:
                        yield ForwardSpec(**{**spec.__dict__, "causal": causal})
                    break
        if tuning.wgmma_varlen(head_dim):  # packed batches: causal, plain and with everything on
            for variant in (v for v in BF16_VARIANTS if tuning.wgmma_varlen(head_dim, v)):
                yield ForwardSpec("wgmma", "fp16", head_dim, head_dim, True, True, bm, bn, threads, stages,
                                  variant=variant, varlen=True, exp2_fma=tuning.wgmma_exp2_fma(head_dim, variant))


# The forward's staged bias / mask (tuning.wgmma_variant): each alone, both, and beside
# all three light variants; (variant, causal values). A bf16 bias compiles to fp16's
# registers (session 16): not compiled here.
FORWARD_SCORE_VARIANTS = (
    (Variant(bias="fp16", bias_staged=True), (False, True)),
    (Variant(mask=True, mask_staged=True), (False, True)),
    (Variant(bias="fp16", bias_staged=True, mask=True, mask_staged=True), (True,)),
    (Variant(window=True, softcap=True, alibi=True, bias="fp16", bias_staged=True), (True,)),
    (Variant(window=True, softcap=True, alibi=True, mask=True, mask_staged=True), (True,)),
)


def forward_kernels(scores: bool):
    """The forward_specs with a bias or mask (``scores``) or without."""
    u16 = types.Array(types.uint16, 4, "A")
    seqlens = types.Array(types.int32, 1, "A")
    sig = (u16, u16, u16, u16, types.Array(types.float32, 3, "A"), types.float32, types.int64, seqlens, seqlens)
    for spec in (s for s in forward_specs() if bool(s.variant.bias or s.variant.mask) == scores):
        bias = {"fp16": types.float16, "bf16": types.uint16}.get(spec.variant.bias, types.float32)  # kernel views
        report(spec.key, forward_wgmma.build(spec), sig + variant_types(bias), threads=spec.threads, head_dim=spec.head_dim,
               block_n=spec.block_n, shared_bytes=forward_wgmma.shared_bytes(spec), kind="forward",
               variant=spec.variant.key)


def backward_specs():
    """Every kernel of every wgmma backward plan tuning.WGMMA_BWD_TILES ships (the
    deterministic dK/dV and dQ pair, and the fused dK/dV/dQ kernel where
    tuning.WGMMA_BWD_DQ_ATOMICS sends the default path): fp16 full and causal, bf16
    causal (registers as fp16's, as BF16_VARIANTS says); and the fused kernel with the
    variants tuning.wgmma_bwd_variant sends it (window, ALiBi, softcap and the pairs it
    takes), fp16 full and causal, and with the staged bias / mask (SCORE_VARIANTS)."""
    for head_dim, ((bm, bn, threads), (qbm, qbn, qthreads)) in sorted(tuning.WGMMA_BWD_TILES.items()):
        fused = bm == 64 and tuning.WGMMA_BWD_DQ_ATOMICS.get(head_dim, False)
        for dtype, causals in (("fp16", (False, True)), ("bf16", (True,))):
            for causal in causals:
                plan = BackwardMmaSpec(dtype, head_dim, causal, bm, bn, threads, False, qbm, qbn, qthreads, False,
                                       fused, wgmma=True)
                for part in ("dkdv", "dq") + (("dkdvq",) if fused else ()):
                    yield BackwardMmaSpec(**{**plan.__dict__, "part": part})
        for window, alibi, softcap in ((True, False, False), (False, True, False), (False, False, True),
                                       (True, True, False), (True, False, True)):
            light = Variant(window=window, alibi=alibi, softcap=softcap)
            if fused and tuning.wgmma_bwd_variant(light, head_dim):
                for causal in (False, True):
                    yield BackwardMmaSpec("fp16", head_dim, causal, bm, bn, threads, False, qbm, qbn, qthreads, False,
                                          True, wgmma=True, variant=light, part="dkdvq",
                                          exp2_fma=tuning.wgmma_bwd_exp2_fma(head_dim, light))
        for staged, causals in SCORE_VARIANTS:  # staged bias / mask, where their stages fit
            spec = BackwardMmaSpec("fp16", head_dim, False, bm, bn, threads, False, qbm, qbn, qthreads, False,
                                   True, wgmma=True, variant=staged, part="dkdvq",
                                   exp2_fma=tuning.wgmma_bwd_exp2_fma(head_dim, staged))
            if (fused and tuning.wgmma_bwd_variant(staged, head_dim, scores=True)  # (compiled while switched off)
                    and backward_wgmma.shared_bytes(spec) <= tuning.WGMMA_MAX_SHARED_BYTES):
                for causal in causals:
                    yield BackwardMmaSpec(**{**spec.__dict__, "causal": causal})


# The fused backward's staged bias / mask (tuning.wgmma_bwd_variant): each alone, both,
# and beside the light variants it takes them with; (variant, causal values). A bf16
# bias differs from fp16 by its two-instruction conversion only (same registers,
# session 15): not compiled here.
SCORE_VARIANTS = (
    (Variant(bias="fp16", bias_staged=True), (False, True)),
    (Variant(mask=True, mask_staged=True), (False, True)),
    (Variant(bias="fp16", bias_staged=True, mask=True, mask_staged=True), (True,)),
    (Variant(window=True, alibi=True, bias="fp16", bias_staged=True), (True,)),
    (Variant(window=True, softcap=True, mask=True, mask_staged=True), (True,)),
)


def backward_kernels():
    for spec in backward_specs():
        dq = spec.part == "dq"
        report(spec.key, backward_wgmma.build(spec), backward_signature(spec.part),
               threads=spec.dq_threads if dq else spec.threads, head_dim=spec.head_dim,
               block_m=spec.dq_block_m if dq else spec.block_m, block_n=spec.dq_block_n if dq else spec.block_n,
               part=spec.part, shared_bytes=backward_wgmma.shared_bytes(spec), kind="backward",
               variant=spec.variant.key)


PARTS = {"backward": lambda: backward_kernels(), "forward": lambda: forward_kernels(scores=False),
         "forward-scores": lambda: forward_kernels(scores=True), "probe": lambda: probe_kernels()}
"""The worker's command-line parts, one process each (tests/test_ptx_gate_wgmma.py
registers them separately: each stays well inside gate_jobs.TIMEOUT_S on CI's cores, and
two run at once)."""


def main():
    for part in sys.argv[1:] or PARTS:
        PARTS[part]()


if __name__ == "__main__":
    main()
