"""Static SASS of the tensor-core kernels with softcap / ALiBi, without a GPU.

Compiles one kernel (forward, or a backward part) for sm_90a with Numba (simulator
off), links it with nvJitLink (ptxas -v) and disassembles it with nvdisasm; prints
one JSON line: registers, stack and spills, and the count of each SASS opcode. The
key loop is fully unrolled, so a variant's static count minus the plain kernel's,
divided by the scores each thread holds per tile (``elements``), is the variant's
per-score instruction cost (prologue and epilogue barely differ).

    PYTHONPATH=src python perf/sass_variants.py fwd fp16 128 1 alibi [...]
    PYTHONPATH=src python perf/sass_variants.py --table   # the issue-7 comparison

Needs nvdisasm: $NVDISASM or /work/tools/nvidia/cu13/bin/nvdisasm.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import replace

os.environ["NUMBA_ENABLE_CUDASIM"] = "0"
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

NVDISASM = os.environ.get("NVDISASM", "/work/tools/nvidia/cu13/bin/nvdisasm")
VARIANTS = {"plain": {}, "cap": {"softcap": True}, "alibi": {"alibi": True},
            "cap-alibi": {"softcap": True, "alibi": True}, "mask": {"mask": True, "mask_staged": True}}
ARCH = (9, 0, "a")


def link(ptx: str):
    from cuda.bindings import nvjitlink

    handle = nvjitlink.create(2, ["-arch=sm_90a", "-Xptxas=-v"])
    data = ptx.encode()
    nvjitlink.add_data(handle, nvjitlink.InputType.PTX, data, len(data), "kernel.ptx")
    nvjitlink.complete(handle)
    log = bytearray(nvjitlink.get_info_log_size(handle))
    nvjitlink.get_info_log(handle, log)
    cubin = bytearray(nvjitlink.get_linked_cubin_size(handle))
    nvjitlink.get_linked_cubin(handle, cubin)
    nvjitlink.destroy(handle)
    return log.decode(), bytes(cubin)


def opcode_counts(cubin: bytes) -> collections.Counter:
    """How many times each SASS opcode (without its modifiers) occurs in a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([NVDISASM, "-c", f.name], capture_output=True, text=True, check=True).stdout
    ops = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m:
            ops[m.group(2).split(".")[0]] += 1
    return ops


def compile_one(kind: str, dtype: str, head_dim: int, causal: bool, variant_name: str) -> dict:
    from numba import cuda
    from numba.cuda import types

    from nbflash import tuning
    from nbflash.kernels import backward_mma, forward_mma
    from nbflash.spec import ForwardSpec, Variant

    variant = Variant(**VARIANTS[variant_name])
    if kind == "fwd":
        from ptx_gate_worker import variant_types

        tiles = tuning.mma_tiles(head_dim, False, ARCH, causal)
        bm, bn, threads, stages, q_regs = tuning.mma_variant_tiles(head_dim, False, ARCH, causal, variant, tiles)
        spec = ForwardSpec("mma", dtype, head_dim, head_dim, causal, True, bm, bn, threads, stages, q_regs,
                           variant=variant)
        u16 = types.Array(types.uint16, 4, "A")
        seqlens = types.Array(types.int32, 1, "A")
        sig = (u16, u16, u16, u16, types.Array(types.float32, 3, "A"), types.float32, types.int64, seqlens,
               seqlens) + variant_types()
        kernel = forward_mma.build(spec)
        elements = (bm // (16 * (threads // 32))) * bn // 8 * 4
    else:
        from ptx_gate_backward_worker import signature

        plan = backward_mma.choose_spec(dtype, head_dim, causal, False, variant, wgmma=False)
        spec = replace(plan, part=kind)
        sig = signature(kind)
        kernel = backward_mma.build(spec)
        if kind == "dq":
            elements = spec.dq_block_m // (16 * (spec.dq_threads // 32)) * spec.dq_block_n // 8 * 4
        else:
            elements = spec.block_n // (16 * (spec.threads // 32)) * spec.block_m // 8 * 4
    fastmath = kernel.targetoptions.get("fastmath", False)
    ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(8, 0), fastmath=fastmath)
    log, cubin = link(ptx)
    ops = opcode_counts(cubin)
    grab = lambda pattern: int(re.search(pattern, log).group(1))  # noqa: E731
    return {
        "kind": kind, "dtype": dtype, "head_dim": head_dim, "causal": causal, "variant": variant_name,
        "key": spec.key, "elements": elements, "registers": grab(r"Used (\d+) registers"),
        "stack": grab(r"(\d+) bytes stack frame"), "spill_stores": grab(r"(\d+) bytes spill stores"),
        "spill_loads": grab(r"(\d+) bytes spill loads"), "total": sum(ops.values()), "ops": dict(ops),
    }


WATCH = ("MUFU", "FMUL", "FFMA", "FADD", "FMNMX", "I2F", "IABS", "IADD3", "FSEL", "FSETP", "ISETP", "SEL")


def table(rows):
    """Per-score deltas of each variant against the plain kernel of the same case."""
    plain = {(r["kind"], r["dtype"], r["head_dim"], r["causal"]): r for r in rows if r["variant"] == "plain"}
    print("| kernel | dtype | d | causal | variant | regs | spill | total | d/score | "
          + " | ".join(WATCH) + " |")
    print("|" + "---|" * (9 + len(WATCH)))
    for r in rows:
        base = plain.get((r["kind"], r["dtype"], r["head_dim"], r["causal"]))
        per = (r["total"] - base["total"]) / r["elements"] if base else float("nan")
        deltas = [(r["ops"].get(op, 0) - (base["ops"].get(op, 0) if base else 0)) / r["elements"] for op in WATCH]
        print(f"| {r['kind']} | {r['dtype']} | {r['head_dim']} | {int(r['causal'])} | {r['variant']} | "
              f"{r['registers']} | {r['spill_stores']}/{r['spill_loads']} | {r['total']} | {per:+.2f} | "
              + " | ".join(f"{d:+.2f}" for d in deltas) + " |")


def main():
    if sys.argv[1:2] == ["--table"]:
        rows = [json.loads(line) for line in sys.stdin if line.startswith("{")]
        table(rows)
        return
    kind, dtype, head_dim, causal, *names = sys.argv[1:]
    for name in names:
        print(json.dumps(compile_one(kind, dtype, int(head_dim), causal == "1", name)), flush=True)


if __name__ == "__main__":
    main()
