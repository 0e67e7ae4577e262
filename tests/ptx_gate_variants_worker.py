"""Compile representative tensor-core forward specializations with attention variants
(issue 7) for sm_90a without a GPU, link them with nvJitLink (ptxas -v) and print one
JSON line per kernel with its resources. Run by tests/test_ptx_gate_variants.py with
the simulator off. Usage: ptx_gate_variants_worker.py [part/parts] (GATE_SPECS with
index % parts == part; all without an argument)."""

import json
import os
import sys

os.environ["NUMBA_ENABLE_CUDASIM"] = "0"
sys.path.insert(0, os.path.dirname(__file__))

from numba import cuda  # noqa: E402
from numba.cuda import types  # noqa: E402
from ptx_gate_worker import ptxas_report, ptxas_resources, variant_types  # noqa: E402

from nbflash import tuning  # noqa: E402
from nbflash.kernels import forward_mma  # noqa: E402
from nbflash.spec import ForwardSpec, Variant  # noqa: E402

ARCH = (9, 0, "a")
ALL_VARIANTS = dict(window=True, softcap=True, alibi=True, mask=True, dropout=True)
# (dtype, head_dim, causal, variant): each tile family with the heaviest variants it
# runs (the light ones, window / softcap / ALiBi, keep the plain tiles)
GATE_SPECS = [
    ("fp16", 128, True, Variant(window=True, softcap=True, alibi=True)),
    ("fp16", 128, False, Variant(window=True, softcap=True, alibi=True)),
    ("fp16", 64, False, Variant(bias="fp16", mask=True, dropout=True)),
    ("bf16", 64, True, Variant(bias="bf16", **ALL_VARIANTS)),
    ("bf16", 128, False, Variant(bias="bf16", **ALL_VARIANTS)),
    ("bf16", 96, True, Variant(bias="fp32", **ALL_VARIANTS)),
    # bias / mask tiles staged through shared memory (kernels/bias_tile.py): alone on
    # the plain tiles (tuning.heavy_variant), with every variant on the heavy ones
    ("fp16", 128, False, Variant(bias="fp16", bias_staged=True)),
    ("bf16", 128, False, Variant(bias="bf16", bias_staged=True, mask=True, mask_staged=True)),
    ("bf16", 64, True, Variant(bias="fp32", bias_staged=True, mask=True, mask_staged=True)),
    ("bf16", 128, False, Variant(bias="bf16", bias_staged=True, mask_staged=True, **ALL_VARIANTS)),
    # head_dim 192 and 256 (the O accumulator alone 96 / 128 registers)
    ("bf16", 256, True, Variant(bias="bf16", **ALL_VARIANTS)),
    ("fp16", 256, False, Variant(window=True, softcap=True, alibi=True)),
    ("bf16", 192, False, Variant(bias="bf16", bias_staged=True, mask_staged=True, **ALL_VARIANTS)),
]


def spec_of(dtype, head_dim, causal, variant):
    """The spec nbflash would run on an H100 (api.choose_forward_spec's tiles)."""
    tiles = tuning.mma_tiles(head_dim, False, ARCH, causal)
    bm, bn, threads, stages, q_regs = tuning.mma_variant_tiles(head_dim, False, ARCH, causal, variant, tiles)
    return ForwardSpec("mma", dtype, head_dim, head_dim, causal, True, bm, bn, threads, stages, q_regs,
                       variant=variant)


def main():
    u16 = types.Array(types.uint16, 4, "A")
    seqlens = types.Array(types.int32, 1, "A")
    part, parts = (int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "0/1").split("/"))
    for index in range(part, len(GATE_SPECS), parts):
        spec = spec_of(*GATE_SPECS[index])
        bias = {"fp16": types.float16, "bf16": types.uint16}.get(spec.variant.bias, types.float32)  # kernel views
        sig = (u16, u16, u16, u16, types.Array(types.float32, 3, "A"), types.float32, types.int64, seqlens,
               seqlens) + variant_types(bias)
        kernel = forward_mma.build(spec)
        fastmath = kernel.targetoptions.get("fastmath", False)
        ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(8, 0), fastmath=fastmath)
        log = ptxas_report(ptx, "sm_90a")
        print(json.dumps({
            "index": index, "of": len(GATE_SPECS), "key": spec.key, "threads": spec.threads,
            **ptxas_resources(log),
            "mma": ptx.count("mma.sync.aligned.m16n8k16"),
            "shared_bytes": forward_mma.shared_bytes(spec),
        }), flush=True)


if __name__ == "__main__":
    main()
