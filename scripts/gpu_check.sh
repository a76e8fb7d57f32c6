#!/usr/bin/env bash
# The one-shot GPU check: everything a lent GPU session runs, in ONE call of at most 6 minutes wall,
# on a machine that already has torch, triton, transformers and peft (no network):
#
#   setup    install this checkout with --no-deps; device, driver and versions (facts.txt)
#   tests    the GPU tests (pytest -m gpu over tests/kernels and tests/ops, xdist workers)
#   micro    the headline grid: fwd and fwd_bwd at D=128, S=1k-8k, P=16-256, GQA and MHA, against
#            concat_sdpa_mask, the best SDPA concat and FlexAttention (bench/grid.py headline_grid)
#   decode   decode steps over 4k and 16k caches
#   train    one training step against PEFT (bench train --quick: PEFT sdpa/eager vs prefixattn,
#            and the packed batch)
#   wide512  a training step of a Llama with head dim 512 (Gemma 4's global layers: the torch backend,
#            beyond the kernels' 256) against PEFT (bench train_step --model wide512)
#   distill  a context-distillation step, the teacher over kept K/V vs re-reading the context
#            (bench distill --grid quick: C = 2048 / 8192, S = 256, P = 256)
#   report   results.json, results.md and plots from what the stages wrote (bench/gpu_report.py)
#
# Every stage runs under `timeout` with its own budget, cut to what is left of the whole budget
# (GPU_CHECK_BUDGET seconds, 340 by default), so the script ends on time even if a stage hangs;
# what the stages before it wrote is kept. $OUT (./gpu-out by default) gets at most 8 files, no
# folders: results.json, results.md, results-micro.png, results-e2e.png, tests.log, gpu_check.log
# (and raw.tgz if the report stage failed).
#
#   OUT=$OUT bash scripts/gpu_check.sh             # on the GPU machine (device tool: one `run`)
#   bash scripts/gpu_check.sh --dry-run            # the same pipeline on the CPU, tiny shapes, the
#                                                  # kernels in the Triton interpreter (CI runs it)
#
# A Triton cache carried in .gpu/triton-cache (git-ignored: name it in the device tool's `carry`)
# is used when present; facts.txt records how many kernels it held before and after. Whether it
# can hit is explained in bench/TUNING.md ("Carrying a Triton cache").
# GPU_CHECK_HANG_STAGE=NAME replaces that stage by a hang, GPU_CHECK_REPORT_RESERVE=S keeps S seconds
# (default 30) for the report (tests of the time boxes).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${OUT:-gpu-out}
# Time boxes are for the GPU call. The dry run (the Triton interpreter on a CPU that CI may share with
# other work) checks that every stage runs and writes its records, so it has none, unless
# GPU_CHECK_BUDGET is given (the tests of the time boxes): then its stages get 3x the GPU's budgets.
UNBOUNDED=0
if [ "$DRY" = 1 ]; then
    SCALE=3
    [ -z "${GPU_CHECK_BUDGET:-}" ] && UNBOUNDED=1
else
    SCALE=1
fi
BUDGET=${GPU_CHECK_BUDGET:-$((340 * SCALE))}
PY=${PYTHON:-python3}
START=$(date +%s)
DEADLINE=$((START + BUDGET))
REPORT_RESERVE=${GPU_CHECK_REPORT_RESERVE:-30}  # seconds kept for the report stage
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
LOG="$OUT/gpu_check.log"
: > "$LOG"
: > "$WORK/stages.tsv"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "$DRY" = 1 ]; then
    export TRITON_INTERPRET=1 PREFIXATTN_POISON=1
    DEVICE_ARGS=(--device cpu --backend triton)
    TRAIN_ARGS=(--device cpu --backend torch)  # a training step through the interpreter takes minutes
    GRID_MICRO=dry GRID_DECODE=dry_decode
    WIDE_ARGS=(--batch 1 --seq 16 --prefix 4 --warmup 0 --steps 1)
    DISTILL_ARGS=(--device cpu --backend torch --grid dry --rep-ms 0)
    TEST_ARGS=(-p no:cacheprovider)
else
    DEVICE_ARGS=()
    TRAIN_ARGS=()
    GRID_MICRO=headline GRID_DECODE=decode
    WIDE_ARGS=(--steps 3)
    DISTILL_ARGS=(--grid quick --rep-ms 200)
    TEST_ARGS=(-p no:cacheprovider -n "${GPU_CHECK_TEST_WORKERS:-8}")
fi
if [ -d .gpu/triton-cache ]; then
    export TRITON_CACHE_DIR="$PWD/.gpu/triton-cache"
fi

# bench_budget SECONDS: a benchmark's own measuring budget (it records the cases past it as skipped)
bench_budget() { if [ "$UNBOUNDED" = 1 ]; then echo 100000; else echo $(($1 * SCALE)); fi; }

say() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# run_stage NAME BUDGET CMD...: run CMD under timeout (its budget, or what is left), log it, record
# its exit code, seconds and status (ok, failed, timeout, skipped) in stages.tsv
run_stage() {
    local name=$1 budget=$2
    shift 2
    local now left t rc status began
    now=$(date +%s)
    left=$((DEADLINE - now - REPORT_RESERVE))
    [ "$name" = report ] && left=$((DEADLINE - now))
    t=$((budget * SCALE))
    [ "$left" -lt "$t" ] && t=$left
    if [ "$UNBOUNDED" = 1 ]; then
        t=0  # timeout 0: no limit
    elif [ "$t" -lt 5 ]; then
        say "stage $name skipped: no time left"
        printf '%s\t%s\t%s\t%s\n' "$name" -1 0 skipped >> "$WORK/stages.tsv"
        return
    fi
    if [ "${GPU_CHECK_HANG_STAGE:-}" = "$name" ]; then
        set -- sleep 100000
    elif declare -F "$1" >/dev/null; then  # a function of this script: run it in a child bash
        set -- bash -c "$1"
    fi
    local log=$LOG
    [ "$name" = tests ] && log="$OUT/tests.log"
    if [ "$t" = 0 ]; then say "stage $name (no time limit): $*"; else say "stage $name (budget ${t}s): $*"; fi
    began=$(date +%s)
    timeout -k 5 "$t" "$@" >> "$log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status=timeout ;;
        *) status=failed ;;
    esac
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - began ))" "$status" >> "$WORK/stages.tsv"
    say "stage $name: $status (exit $rc)"
}

facts() {
    {
        echo "date: $(date -u +%FT%TZ)  dry_run: $DRY"
        if command -v nvidia-smi >/dev/null 2>&1; then
            nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
        else
            echo "nvidia-smi: not found"
        fi
        "$PY" - <<'EOF'
import importlib.metadata as md, os, platform
for name in ("torch", "triton", "transformers", "peft", "trl", "numpy"):
    try:
        print(f"{name}: {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name}: not installed")
import torch
print(f"python: {platform.python_version()}  cuda: {torch.version.cuda}  gpu: "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
try:  # what a carried Triton cache must match (bench/TUNING.md, "Carrying a Triton cache")
    import hashlib
    from triton.runtime.cache import triton_key
    print(f"triton_key sha256: {hashlib.sha256(triton_key().encode()).hexdigest()[:16]}")
except Exception as e:
    print(f"triton_key: {type(e).__name__}")
cache = os.environ.get("TRITON_CACHE_DIR")
if cache:
    print(f"triton cache: {cache}: {len(os.listdir(cache))} kernels")
EOF
    } > "$WORK/facts.txt" 2>&1
    cat "$WORK/facts.txt" >> "$LOG"
}

setup() {
    if [ "$DRY" = 1 ]; then
        echo "dry run: would run $PY -m pip install --no-deps --no-build-isolation -e ."
    else
        "$PY" -m pip install -q --no-deps --no-build-isolation -e . || return 1
    fi
    facts
}

export -f say facts setup
export DRY PY WORK LOG START
run_stage setup 40 setup
: > "$OUT/tests.log"
run_stage tests 100 "$PY" -m pytest tests/kernels tests/ops -m gpu -q "${TEST_ARGS[@]}"
run_stage micro 95 "$PY" -m bench micro --grid "$GRID_MICRO" "${DEVICE_ARGS[@]}" --budget "$(bench_budget 100)" \
    --out "$WORK/micro"
run_stage decode 35 "$PY" -m bench micro --grid "$GRID_DECODE" "${DEVICE_ARGS[@]}" --budget "$(bench_budget 28)" \
    --out "$WORK/decode"
run_stage train 45 "$PY" -m bench train --quick "${TRAIN_ARGS[@]}" --out "$WORK/train"
mkdir -p "$WORK/wide512"
run_stage wide512 15 "$PY" -m bench train_step --model wide512 "${WIDE_ARGS[@]}" \
    --json "$WORK/wide512/train_step.json"
mkdir -p "$WORK/distill"
run_stage distill 30 "$PY" -m bench distill "${DISTILL_ARGS[@]}" --json "$WORK/distill/distill.json"
if [ -f "$WORK/facts.txt" ] && [ -n "${TRITON_CACHE_DIR:-}" ]; then
    echo "triton cache after the stages: $(ls "$TRITON_CACHE_DIR" | wc -l) kernels" >> "$WORK/facts.txt"
fi
run_stage report 15 "$PY" -m bench.gpu_report "$WORK" "$OUT"
if [ ! -s "$OUT/results.json" ]; then
    say "report stage wrote no results.json: packing the raw stage outputs into raw.tgz"
    tar czf "$OUT/raw.tgz" -C "$WORK" . 2>> "$LOG"
fi
say "done in $(( $(date +%s) - START ))s; $OUT holds $(ls "$OUT" | wc -l) files"
cut -f1,4 "$WORK/stages.tsv" | tr '\t' ' ' | tee -a "$LOG"
rm -rf "$WORK"
