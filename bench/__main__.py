"""``python -m bench``: the benchmark harness's entry point (a development tool; run it from a checkout
with the project installed, e.g. after ``bash scripts/setup.sh``).

    python -m bench [OPTIONS]              every suite (bench/run_all.py; same as ``run_all``)
    python -m bench micro|train|bank ...   one suite: run_all with --suites NAME
    python -m bench cartridge [--quick]    long prefixes (bench/cartridge.py; not part of the default run)
    python -m bench tune [--json FILE]     the kernel tuning probe (bench/tune.py, needs a GPU)
    python -m bench layer_overhead ...     host time per patched layer (bench/layer_overhead.py)
    python -m bench compile [--set ...]    compile every kernel launch for sm_90 without a GPU, write
                                           the compile table (bench/compile.py)
    python -m bench serve ...              prefixattn serve vs the base model on vLLM (bench/serve.py)
    python -m bench train_step ...         one training-step configuration (bench/train_step.py), e.g.
                                           --model wide512 (head dim 512 vs PEFT, GPU)
    python -m bench distill [--grid ...]   a context-distillation step, the teacher over kept K/V vs
                                           re-reading the context (bench/distill.py)
    python -m bench run_all ...            explicit form of the first line

Options of the suites: ``python -m bench --help``; of the probe: ``python -m bench tune --help``.
"""

from __future__ import annotations

import importlib
import sys

from . import run_all

SUITE_COMMANDS = ("micro", "train", "bank", "cartridge")
# modules with their own main(argv)
TOOLS = ("tune", "layer_overhead", "compile", "serve", "train_step", "distill")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and not argv[0].startswith("-") else "run_all"
    rest = argv[1:] if argv and command == argv[0] else argv
    if command in TOOLS:
        return importlib.import_module(f".{command}", __package__).main(rest)
    if command == "run_all":
        return run_all.main(rest)
    if command in SUITE_COMMANDS:
        if any(a == "--suites" or a.startswith("--suites=") for a in rest):
            print(f"python -m bench {command}: --suites is implied by the command", file=sys.stderr)
            return 2
        return run_all.main(["--suites", command, *rest])
    print(f"python -m bench: unknown command {command!r}; choose from run_all, "
          f"{', '.join(SUITE_COMMANDS + TOOLS)} (see python -m bench --help)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
