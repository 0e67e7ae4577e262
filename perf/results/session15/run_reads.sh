#!/bin/bash
# Session 15, device call: the backward's bias / mask reads on the wgmma family (staged,
# fused dQ) against its own plain row; then the GPU tier of the new wgmma bias / mask
# tests. (Cut to fit what was left of the device budget after failed machine starts.)
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src || exit
cc -O2 -shared -fPIC -I$(python3 -c "import sysconfig;print(sysconfig.get_paths()['include'])") -o src/nbflash/_fastlaunch$(python3 -c "import sysconfig;print(sysconfig.get_config_var('EXT_SUFFIX'))") src/nbflash/_fastlaunch.c
nvidia-smi --query-gpu=name --format=csv,noheader
export NBFLASH_WGMMA_BWD_SCORES=1
timeout 170 python3 perf/bench_backward.py --variants --reads-only --read-families wgmma --repeats 10 --out $OUT/reads > $OUT/reads.txt 2>&1; grep -v "^{" $OUT/reads.txt | tail -8
timeout 150 python3 -m pytest -q -x tests/test_variants_backward.py -k "staged_bias and large or several_tiles" > $OUT/t_gpu_bias.txt 2>&1; tail -4 $OUT/t_gpu_bias.txt
