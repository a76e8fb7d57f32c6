#!/usr/bin/env bash
# install_torch.sh VENV VERSION [CONSTRAINTS]: torch==VERSION into VENV, the build pip would choose (the CPU
# build from this machine's disk where pip is configured to find one there; on a GPU machine PyPI's CUDA
# build). Where pip's choice is a wheel file on disk, uv (VENV/bin/uv, when present) installs that very file:
# it unpacks it once into its cache and links it into every later environment, about 2 s instead of pip's
# 40 for each of .venv, .venv-oldest and .venv-vllm. Otherwise pip installs it. CONSTRAINTS pins torch's own
# dependencies (its torch line is left out: the file decides the build).
set -euo pipefail
VENV=$1
VERSION=$2
CONSTRAINTS=${3:-}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
wheel=""
if [ -x "$VENV/bin/uv" ] && "$VENV/bin/python" -m pip install -q --dry-run --ignore-installed --no-deps \
        --report "$tmp/report.json" "torch==$VERSION" > /dev/null 2>&1; then
    wheel=$("$VENV/bin/python" - "$tmp/report.json" <<'PY'
import json, sys, urllib.parse
url = json.load(open(sys.argv[1]))["install"][0]["download_info"]["url"]
print(urllib.parse.unquote(url[len("file://"):]) if url.startswith("file://") and url.endswith(".whl") else "")
PY
)
fi
if [ -n "$wheel" ] && [ -f "$wheel" ]; then
    pins=()
    if [ -n "$CONSTRAINTS" ]; then
        grep -v -e '^#' -e '^torch==' "$CONSTRAINTS" > "$tmp/pins.txt"
        pins=(-c "$tmp/pins.txt")
    fi
    "$VENV/bin/uv" pip install -q --python "$VENV/bin/python" "${pins[@]}" "$wheel"
else
    "$VENV/bin/python" -m pip install -q "torch==$VERSION"
fi
