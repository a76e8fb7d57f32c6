#!/usr/bin/env bash
# On a GPU machine that already has torch/triton/transformers (no network): install this checkout
# without dependencies, run the GPU tests, then the kernel tuning probe. Results go to $OUT (or
# ./gpu-out).
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a "$OUT/device.txt"
python3 -m pytest tests/test_gpu.py -q -x -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
python3 -m bench.tune --json "$OUT/tune.json" 2>&1 | tee "$OUT/tune.log" | tail -30
