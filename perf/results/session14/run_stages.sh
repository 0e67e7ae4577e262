#!/bin/bash
# Session 14, first device call: the three-stage K/V ring of the wgmma forward, checked
# on the GPU and timed against two stages (NBFLASH_WGMMA_STAGES), alternating processes.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src || exit
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
cc -O2 -shared -fPIC -I$(python3 -c "import sysconfig;print(sysconfig.get_paths()['include'])") -o src/nbflash/_fastlaunch$(python3 -c "import sysconfig;print(sysconfig.get_config_var('EXT_SUFFIX'))") src/nbflash/_fastlaunch.c
ROWS="full 16k;causal+softcap;causal+alibi;window(1024,0)"
for round in 1 2; do
  for st in 3 2; do
    NBFLASH_WGMMA_STAGES=$st timeout 240 python3 perf/bench_forward.py --variants --rows "$ROWS" --out $OUT/s$st-r$round > $OUT/bench-s$st-r$round.txt 2>&1
    echo "== stages $st round $round"; tail -8 $OUT/bench-s$st-r$round.txt
  done
done
timeout 280 python3 -m pytest -q -x tests/test_forward_wgmma.py > $OUT/t_gpu_forward_wgmma.txt 2>&1; tail -3 $OUT/t_gpu_forward_wgmma.txt
