"""Make ``prefixattn.kernels`` importable when running from a source checkout that was not installed.

The Triton code lives in the top-level ``kernels/`` directory and becomes ``prefixattn.kernels``
through the pyproject package-dir mapping, which only exists once the project is installed. A
benchmark run straight from a checkout (``python -m bench.run_all`` on a fresh GPU machine) has no
install: this loads ``kernels/`` under its package name instead. It does nothing when the import
already works.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path


def ensure_kernels_importable() -> bool:
    """True if ``prefixattn.kernels`` can be imported (after loading it from the checkout if needed)."""
    try:
        importlib.import_module("prefixattn.kernels")
        return True
    except ModuleNotFoundError as e:
        if e.name != "prefixattn.kernels":
            raise
    import prefixattn

    root = Path(prefixattn.__file__).resolve().parent.parent / "kernels"
    init = root / "__init__.py"
    if not init.exists():
        return False
    spec = importlib.util.spec_from_file_location("prefixattn.kernels", init,
                                                  submodule_search_locations=[str(root)])
    if spec is None or spec.loader is None:
        return False
    module = importlib.util.module_from_spec(spec)
    sys.modules["prefixattn.kernels"] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules["prefixattn.kernels"]
        raise
    prefixattn.kernels = module  # type: ignore[attr-defined]
    return True
