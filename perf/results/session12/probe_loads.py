"""Timing-only probe (results are garbage with loads off): what the K/V loads and the
stage-free barrier cost in the wgmma forward; one process per setting (the env is read
at build time) is avoided by keying plans on NBFLASH_PROBE via plans.forget + a fresh
cache dir per setting."""
import os, sys, json
import numpy as np
import cupy
import nbflash
from nbflash import plans
N, H, D = 16384, 16, 128
rng = cupy.random.default_rng()
q, k, v = (rng.standard_normal((1, N, H, D), dtype=cupy.float32).astype(cupy.float16) for _ in range(3))
out = cupy.empty_like(q)
cases = {"full": (False, {}), "causal": (True, {}), "causal+softcap": (True, {"softcap": 30.0})}
res = {}
for name, (causal, kw) in cases.items():
    def call():
        nbflash.attention(q, k, v, causal=causal, out=out, **kw)
    ts = [nbflash.device.queued_gpu_ms(call, 3, 7, 10) for _ in range(3)]
    res[name] = float(np.median(ts))
print(json.dumps({"probe": os.environ.get("NBFLASH_PROBE", ""), **res}))
