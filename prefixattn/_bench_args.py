"""Arguments of ``prefixattn bench`` (kept here so the parser builds without the bench harness)."""

from __future__ import annotations

import argparse
from pathlib import Path

SUITES = ("micro", "train", "bank")


def add_bench_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--out", type=Path, default=None,
                    help="output directory (default: bench/results on a GPU, ./bench-cpu on a CPU)")
    ap.add_argument("--quick", action="store_true", help="a few shapes only")
    ap.add_argument("--suites", default=",".join(SUITES),
                    help=f"comma-separated subset of {','.join(SUITES)} (default: all)")
    ap.add_argument("--providers", default=None,
                    help="comma-separated microbenchmark providers (default: all)")
    ap.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"),
                    help="prefixattn backend (default auto: triton on GPU)")
    ap.add_argument("--device", default=None, choices=("cuda", "cpu"),
                    help="default: cuda if available")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the microbenchmark grid; shapes left when it runs out are recorded as"
                         " skipped (default: 330 on GPU, none on CPU)")
    ap.add_argument("--rep-ms", type=float, default=None, help="do_bench repetition time per measurement")
