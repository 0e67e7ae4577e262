#!/bin/bash
# Session 14, second device call: softcap's exp2 on the FMA pipe (NBFLASH_EXP2_FMA = n of
# every four 8-key blocks) over the three-stage forward, alternating processes; the GPU
# tier of the wgmma forward tests; the backward variants on the same machine.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src || exit
nvidia-smi --query-gpu=name --format=csv,noheader
for round in 1; do
  for e in 0 1 2; do
    NBFLASH_EXP2_FMA=$e timeout 150 python3 perf/bench_forward.py --variants --rows "causal+softcap;causal+softcap+alibi" --out $OUT/e$e-r$round > $OUT/bench-e$e-r$round.txt 2>&1
    echo "== exp2_fma $e round $round"; grep -E "^causal" $OUT/bench-e$e-r$round.txt
  done
done
# the two-stage loop on this machine (the first call's A/B ran on another)
NBFLASH_WGMMA_STAGES=2 NBFLASH_EXP2_FMA=0 timeout 150 python3 perf/bench_forward.py --variants --rows "causal+softcap" --out $OUT/s2 > $OUT/bench-s2.txt 2>&1
echo "== two stages, exp2_fma 0"; grep -E "^causal" $OUT/bench-s2.txt
timeout 200 python3 -m pytest -q tests/test_forward_wgmma.py > $OUT/t_gpu_forward_wgmma.txt 2>&1; tail -2 $OUT/t_gpu_forward_wgmma.txt
timeout 150 python3 perf/bench_backward.py --variants --out $OUT/bwd > $OUT/bench-backward-variants.txt 2>&1; grep -v "^{" $OUT/bench-backward-variants.txt | tail -14
