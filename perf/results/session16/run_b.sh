#!/bin/bash
# Session 16, second device call: the GPU tier of the forward's staged bias / mask with the
# 32-bit-addressed mask reader, the forward's bias / mask rows again, and the backward's
# softcap with 0 / 1 / 2 of every four 8-query blocks of P taking exp2 on the FMA pipe
# (NBFLASH_EXP2_FMA_BWD), one process each.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null && export PYTHONPATH=/tmp/site:src || exit
cc -O2 -shared -fPIC -I$(python3 -c "import sysconfig;print(sysconfig.get_paths()['include'])") -o src/nbflash/_fastlaunch$(python3 -c "import sysconfig;print(sysconfig.get_config_var('EXT_SUFFIX'))") src/nbflash/_fastlaunch.c
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 140 python3 -m pytest -q -x tests/test_forward_wgmma.py -k "staged_bias_and_mask and mask" -p no:cacheprovider > $OUT/t_fwd.txt 2>&1; tail -3 $OUT/t_fwd.txt
timeout 100 python3 perf/bench_forward.py --variants --repeats 10 --rows "full;bias fp16 BHNN;mask BHNN" --out $OUT/fwd > $OUT/fwd.txt 2>&1; grep -v "^{" $OUT/fwd.txt | tail -5
for n in 0 1 2; do
  NBFLASH_EXP2_FMA_BWD=$n timeout 90 python3 perf/bench_backward.py --variants --repeats 10 --read-families none --out $OUT/bwd-e$n > $OUT/bwd-e$n.txt 2>&1; echo "exp2_fma_bwd=$n"; grep -E "^plain causal|^softcap" $OUT/bwd-e$n.txt
done
