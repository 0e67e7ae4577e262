"""A/B (same process, interleaved): the straight K/V/Q loads of forward_wgmma's interior
tiles (new) against the per-row clamped loads (NBFLASH_PROBE=oldload), forward and
backward, fp16 H16, 16k tokens."""
import os, json
import numpy as np
import cupy
import nbflash
from nbflash import plans
H = 16
rng = cupy.random.default_rng()
def use(old):
    os.environ["NBFLASH_PROBE"] = "oldload" if old else ""
    plans.forget()
rows = []
import sys
setting = os.environ.get("NBFLASH_PROBE", "")
for d in (128,):
    q, k, v = (rng.standard_normal((1, 16384, H, d), dtype=cupy.float32).astype(cupy.float16) for _ in range(3))
    out = cupy.empty_like(q)
    cases = {"full": (False, {}), "causal": (True, {}), "causal+softcap": (True, {"softcap": 30.0}),
             "window(1024,0)": (False, {"window": (1024, 0)})}
    times = {}
    for r in range(2):
        for old in (setting == "oldload",):
            for name, (causal, kw) in cases.items():
                def call():
                    nbflash.attention(q, k, v, causal=causal, out=out, **kw)
                times.setdefault((name, old), []).append(nbflash.device.queued_gpu_ms(call, 3, 7, 10))
    # backward, causal, plain (wgmma backward)
    q4, k4, v4, do = (rng.standard_normal((4, 4096, H, d), dtype=cupy.float32).astype(cupy.float16) for _ in range(4))
    o4, lse = nbflash.attention(q4, k4, v4, causal=True, return_lse=True)
    for r in range(2):
        for old in (setting == "oldload",):
            def bcall():
                nbflash.attention_backward(do, q4, k4, v4, o4, lse, causal=True)
            times.setdefault(("backward causal 4x4096", old), []).append(nbflash.device.median_gpu_ms(bcall, 2, 7))
    for (name, old), ts in sorted(times.items()):
        pass
    for name in list(cases) + ["backward causal 4x4096"]:
        key = (name, setting == "oldload")
        rows.append((d, name, float(np.median(times[key]))))
print(json.dumps({"setting": setting or "new", "ms": {f"d{d} {name}": round(ms, 4) for d, name, ms in rows}}))
