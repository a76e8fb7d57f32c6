#!/usr/bin/env bash
# One-shot set-up on a fresh machine: a virtual environment in .venv with the CPU build of torch
# installed first (a plain `torch` requirement resolved on its own would pull a multi-GB CUDA
# build), then this project with its test/bench extras at the versions the suite was last green
# with (scripts/constraints.txt, installed by uv, pinned there too), so the README's commands give the
# same result next month.
# Safe to run again: it only installs what is missing or differs from the pins.
#   CONSTRAINTS=path   another lock file (scripts/test_oldest.sh uses constraints-oldest.txt)
#   VENV=dir           another environment directory (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
CONSTRAINTS=${CONSTRAINTS:-scripts/constraints.txt}
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# uv installs the rest (parallel downloads and a cache: seconds where pip took about a minute)
[ -x "$VENV/bin/uv" ] || "$VENV/bin/python" -m pip install -q "$(grep -m1 '^uv==' "$CONSTRAINTS")"
torch_pin=$(grep -m1 '^torch==' "$CONSTRAINTS" | cut -d= -f3)
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$torch_pin')" 2>/dev/null; then
    # CPU build from this machine's disk where there is no GPU; on a GPU machine PyPI's CUDA build
    bash scripts/install_torch.sh "$VENV" "$torch_pin" "$CONSTRAINTS"
fi
# everything else at the pinned versions, the installed torch kept as it is
pins=$(mktemp)
trap 'rm -f "$pins"' EXIT
grep -v -e '^#' -e '^torch==' "$CONSTRAINTS" > "$pins"
"$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__)" >> "$pins"
"$VENV/bin/uv" pip install -q --python "$VENV/bin/python" -c "$pins" -e ".[test,bench]"
