"""``python -m prefixattn``: the ``prefixattn`` command without the console script (e.g. ``python -m
prefixattn serve ...`` in an environment where vLLM is installed)."""

import sys

from .cli import main

sys.exit(main())
