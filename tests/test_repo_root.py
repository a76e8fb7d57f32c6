"""Python started at the repository root finds the top-level ``kernels/`` folder first.

transformers >= 5.25 imports Hugging Face's ``kernels`` package (``transformers.activations``); the
folder must hand the name over to it, and where that package is absent (transformers 5.19 in
``.venv-vllm``) it must read as "not available" to transformers' probe instead of raising.
Each check runs in a fresh interpreter with the repository root as its working directory, as a
user's ``python script.py`` or ``pytest`` there would.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_at_root(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_transformers_gets_hugging_faces_kernels_at_the_repo_root():
    out = _run_at_root(
        "import sys; assert sys.path[0] == ''\n"
        "from transformers import LlamaConfig; LlamaConfig()\n"
        "import kernels, transformers.activations\n"
        "print(kernels.__file__)\n"
    )
    assert out != str(ROOT / "kernels" / "__init__.py"), "the checkout's kernels/ shadowed the installed package"
    assert "site-packages" in out, out


def test_without_the_installed_package_the_name_reads_as_not_available():
    # site-packages off the path: no Hugging Face `kernels` to hand over to. transformers' probe
    # (5.19) imports what find_spec finds and reads __version__; an error here broke `import vllm`.
    out = _run_at_root(
        "import sys\n"
        "sys.path[:] = [p for p in sys.path if 'site-packages' not in p and 'dist-packages' not in p]\n"
        "import importlib.util\n"
        "assert importlib.util.find_spec('kernels') is not None\n"
        "import kernels\n"
        "print(getattr(kernels, '__version__', 'N/A'), hasattr(kernels, 'attention_forward'))\n"
    )
    assert out == "N/A False"


def test_the_kernels_themselves_still_load_as_prefixattn_kernels_at_the_root():
    out = _run_at_root(
        "import kernels\n"
        "from prefixattn.kernels import attention_backward, attention_forward\n"
        "import prefixattn.kernels as k\n"
        "print(k.__file__)\n"
    )
    assert out == str(ROOT / "kernels" / "__init__.py")
