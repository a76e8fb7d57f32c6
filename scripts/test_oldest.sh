#!/usr/bin/env bash
# The tests of every transformers API the package calls (hf, prefix, cli), with the oldest transformers
# the project supports (5.17.0: the GPU machine's), in .venv-oldest. CI runs it after the main suite
# (README's test command). The Triton-backend cases are left to the main suite: the kernels do not
# touch transformers, and under the interpreter they are the slowest tests. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-oldest CONSTRAINTS=scripts/constraints-oldest.txt bash scripts/setup.sh
.venv-oldest/bin/python -c "import transformers; print('transformers', transformers.__version__, '(oldest supported)')"
exec .venv-oldest/bin/python -m pytest -q -n 2 -p no:cacheprovider tests/hf tests/prefix tests/cli -k "not triton" "$@"
