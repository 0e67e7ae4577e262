#!/bin/bash
# Session 16, first device call: the GPU tier of the staged bias / mask in both wgmma
# kernels (backward: session 15's; forward: this session's), then the forward's bias /
# mask rows against plain attention of the same kernel family.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src || exit
cc -O2 -shared -fPIC -I$(python3 -c "import sysconfig;print(sysconfig.get_paths()['include'])") -o src/nbflash/_fastlaunch$(python3 -c "import sysconfig;print(sysconfig.get_config_var('EXT_SUFFIX'))") src/nbflash/_fastlaunch.c
nvidia-smi --query-gpu=name --format=csv,noheader
export NBFLASH_WGMMA_BWD_SCORES=1 NBFLASH_WGMMA_FWD_SCORES=1
timeout 170 python3 -m pytest -q -x tests/test_forward_wgmma.py -k "staged_bias_and_mask" -p no:cacheprovider > $OUT/t_fwd.txt 2>&1; tail -4 $OUT/t_fwd.txt
timeout 150 python3 -m pytest -q -x tests/test_variants_backward.py -k "staged_bias and large or several_tiles" -p no:cacheprovider > $OUT/t_bwd.txt 2>&1; tail -4 $OUT/t_bwd.txt
timeout 200 python3 perf/bench_forward.py --variants --repeats 10 --rows "full;full mma;bias fp16 BHNN;mask BHNN;bias fp16 BHNN mma;mask BHNN mma" --out $OUT/fwd > $OUT/fwd.txt 2>&1; grep -v "^{" $OUT/fwd.txt | tail -9
