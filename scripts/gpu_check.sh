#!/usr/bin/env bash
# Everything a lent GPU session runs, in one call, on a machine that already has torch, triton,
# transformers and peft (no network): install this checkout without dependencies, run the GPU
# tests, the kernel tuning probe and the benchmark suites. Results go to $OUT (or ./gpu-out);
# copy $OUT/results/* into bench/results/ and commit them with the device and versions.
#
#   STAGES="tests tune" bash scripts/gpu_check.sh                  # ~3-4 min
#   STAGES=bench BENCH_ARGS="--budget 300" bash scripts/gpu_check.sh # ~7-8 min
# (the device tool allows 10 minutes per command: run the two halves as two calls)
set -uo pipefail
OUT=${OUT:-gpu-out}
STAGES=${STAGES:-tests tune bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a "$OUT/device.txt"
for stage in $STAGES; do
    case "$stage" in
        tests) python3 -m pytest tests/kernels tests/ops -q -p no:cacheprovider \
                   ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/gpu_tests.log" | tail -25 ;;
        tune)  python3 -m bench tune --json "$OUT/tune.json" 2>&1 | tee "$OUT/tune.log" | tail -30 ;;
        bench) python3 -m bench --out "$OUT/results" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -40 ;;
        *) echo "unknown stage $stage (tests, tune, bench)" >&2; exit 2 ;;
    esac
done
