#!/usr/bin/env bash
# The suite against the newest releases: a fresh .venv-latest with every dependency at its newest
# version on PyPI (torch held at the pinned CPU build: a newer torch is a multi-GB CUDA download here),
# then the whole suite. Prints which packages moved past scripts/constraints.txt and what broke.
# Each closing note says what it printed. Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-latest
rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
torch_pin=$(grep -m1 '^torch==' scripts/constraints.txt | cut -d= -f3)
"$VENV/bin/python" -m pip install -q "torch==$torch_pin"
"$VENV/bin/python" -m pip install -q --upgrade --upgrade-strategy eager -e ".[test,bench]" || exit 1
echo "== versions that differ from scripts/constraints.txt =="
"$VENV/bin/python" -m pip freeze --exclude-editable 2>/dev/null | sed 's/+cpu$//' | sort > "$VENV/freeze.txt"
grep -v '^#' scripts/constraints.txt | sort | comm -13 - "$VENV/freeze.txt" | while read -r line; do
    name=${line%%==*}
    pinned=$(grep -i -m1 "^$name==" scripts/constraints.txt | cut -d= -f3)
    echo "  $name ${pinned:-(not pinned)} -> ${line#*==}"
done
echo "== the suite =="
"$VENV/bin/python" -m pytest -q -n 2 -p no:cacheprovider -W ignore::FutureWarning "$@" 2>&1 | tee "$VENV/pytest.log" | tail -3
status=${PIPESTATUS[0]}
echo "== what broke =="
grep -E '^(FAILED|ERROR) ' "$VENV/pytest.log" || echo "  nothing: the suite is green on the newest releases"
exit "$status"
