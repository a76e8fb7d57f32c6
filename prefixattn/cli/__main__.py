"""``python -m prefixattn.cli``: the ``prefixattn`` command without the console script (e.g. for
``torchrun --nproc-per-node N -m prefixattn.cli train ...``)."""

import sys

from . import main

sys.exit(main())
