#!/bin/bash
# Session 15, second device call: the backward variants at 16k (softcap / ALiBi / window
# against plain causal, and the bias / mask reads), then the GPU tier of the wgmma
# backward tests (plain and the light variants: regressions of the staged-tile change).
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src || exit
cc -O2 -shared -fPIC -I$(python3 -c "import sysconfig;print(sysconfig.get_paths()['include'])") -o src/nbflash/_fastlaunch$(python3 -c "import sysconfig;print(sysconfig.get_config_var('EXT_SUFFIX'))") src/nbflash/_fastlaunch.c
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 300 python3 perf/bench_backward.py --variants --out $OUT/variants > $OUT/variants.txt 2>&1; grep -v "^{" $OUT/variants.txt | tail -16
timeout 250 python3 -m pytest -q tests/test_variants_backward.py -k "wgmma" > $OUT/t_gpu_variants_wgmma.txt 2>&1; tail -3 $OUT/t_gpu_variants_wgmma.txt
