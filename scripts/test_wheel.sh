#!/usr/bin/env bash
# The package as a user gets it: build the sdist and, from it, the wheel (python -m build: so a file
# missing from the sdist shows), install the wheel into a clean venv outside the checkout (CPU torch
# first, then the wheel with its declared dependencies at the pinned versions), and from another
# directory run `prefixattn --version`, the main job, and scripts/wheel_smoke.py (the op, the kernels
# shipped in the wheel, patch + a training step + generate, unpatch). CI runs it (README's test command).
set -euo pipefail
cd "$(dirname "$0")/.."
CHECKOUT=$PWD
WORK=$(mktemp -d "${TMPDIR:-/tmp}/prefixattn-wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
PY=${PYTHON:-python3}

echo "== build (sdist, then the wheel from the sdist) =="
# from a copy of the checkout's files (what git tracks and what it does not ignore), so that the build
# writes nothing (prefixattn.egg-info) into the checkout while scripts/test_oldest.sh installs from it
SRC="$WORK/src"
mkdir -p "$SRC"
if git rev-parse --is-inside-work-tree > /dev/null 2>&1; then
    git ls-files -z --cached --others --exclude-standard | tar --null -T - --ignore-failed-read -cf - 2> /dev/null \
        | tar -xf - -C "$SRC"
else  # an unpacked sdist or a copy without git
    tar --exclude=./.git --exclude='./.venv*' --exclude=./build --exclude=./dist --exclude='./*.egg-info' \
        -cf - . | tar -xf - -C "$SRC"
fi
"$PY" -m venv "$WORK/build-env"
"$WORK/build-env/bin/python" -m pip install -q -c scripts/constraints.txt build
"$WORK/build-env/bin/python" -m build -q --outdir "$WORK/dist" "$SRC" > "$WORK/build.log" 2>&1 || {
    cat "$WORK/build.log"; exit 1; }
ls "$WORK/dist"
version=$("$WORK/build-env/bin/python" -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['version'])")
wheel=$(ls "$WORK"/dist/prefixattn-"$version"-*.whl)
# the listing is read whole before it is searched: `zipfile -l | grep -q` fails under pipefail whenever grep
# exits at its match before zipfile has printed the rest (BrokenPipeError; it did in a CI run)
listing=$("$WORK/build-env/bin/python" -c "import sys, zipfile; print('\n'.join(zipfile.ZipFile(sys.argv[1]).namelist()))" "$wheel")
for f in LICENSE prefixattn/py.typed prefixattn/kernels/forward.py; do
    grep -qF "$f" <<< "$listing" || { echo "the wheel lacks $f"; exit 1; }
done

echo "== a clean venv with the wheel =="
"$PY" -m venv "$WORK/venv"
torch_pin=$(grep -m1 '^torch==' scripts/constraints.txt | cut -d= -f3)
"$WORK/venv/bin/python" -m pip install -q "torch==$torch_pin"
"$WORK/venv/bin/python" -m pip install -q -c scripts/constraints.txt "$wheel"

cd "$WORK"  # from another directory: nothing of the checkout on sys.path
echo "== prefixattn --version =="
got=$("$WORK/venv/bin/prefixattn" --version)
echo "$got"
[ "$got" = "prefixattn $version" ] || { echo "expected 'prefixattn $version'"; exit 1; }
echo "== the main job: prefixattn train =="
"$WORK/venv/bin/prefixattn" train --out "$WORK/run" --no-plot
[ -s "$WORK/run/prefix.safetensors" ] || { echo "the main job wrote no prefix.safetensors"; ls -R "$WORK/run"; exit 1; }
echo "== the op, patch + a training step + generate =="
"$WORK/venv/bin/python" "$CHECKOUT/scripts/wheel_smoke.py" "$CHECKOUT"
echo "wheel smoke test: passed"
