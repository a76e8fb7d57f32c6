#!/usr/bin/env bash
# One-shot set-up on a fresh machine: a virtual environment in .venv with the CPU build of torch
# installed first (a plain `torch` requirement resolved on its own would pull a multi-GB CUDA
# build), then this project with its test/bench extras. Safe to run again: it only installs what
# is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        .venv/bin/python -m pip install -q torch
    else
        .venv/bin/python -m pip install -q torch==2.13.0
    fi
fi
.venv/bin/python -m pip install -q -e ".[test,bench]"
