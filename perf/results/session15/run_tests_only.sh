#!/bin/bash
# Session 15, last device try: only the GPU tier of the new wgmma bias / mask tests.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src || exit
nvidia-smi --query-gpu=name --format=csv,noheader
export NBFLASH_WGMMA_BWD_SCORES=1
timeout 200 python3 -m pytest -q tests/test_variants_backward.py -k "several_tiles or staged_bias and large" 2>&1 | tail -n 6
