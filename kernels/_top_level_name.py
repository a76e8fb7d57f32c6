"""Give the top-level name ``kernels`` to Hugging Face's package when Python runs from the repo root.

Only ``kernels/__init__.py`` calls this, and only when it was imported as ``kernels`` (not as
``prefixattn.kernels``): the repository root was on ``sys.path`` ahead of site-packages.
"""

import importlib.machinery
import importlib.util
import os
import sys

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _is_repo_root(entry: str) -> bool:
    return os.path.abspath(entry or os.getcwd()) == _REPO_ROOT


def hand_over_to_installed_kernels() -> None:
    """Load the next ``kernels`` on ``sys.path`` (skipping the repo root) under the name ``kernels``.

    The import system returns whatever ``sys.modules["kernels"]`` holds once this package's
    ``__init__`` has run, so the caller of ``import kernels`` gets the installed package.
    """
    search = [entry for entry in sys.path if not _is_repo_root(entry)]
    spec = importlib.machinery.PathFinder.find_spec("kernels", search)
    if spec is None or spec.loader is None:
        # No installed `kernels` (transformers < 5.25 does not need one). Raising here would break
        # transformers' own probe, which imports whatever `find_spec("kernels")` finds and reads its
        # __version__; an empty module without one reads as "not available", which is the truth.
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    spec.loader.exec_module(module)
