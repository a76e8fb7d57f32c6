"""Run the benchmark suites and write the results: ``python -m bench --out DIR``.

    python -m bench --out bench/results          # everything on a GPU (~8 min on an H100)
    python -m bench --quick --out /tmp/b          # a few points
    python -m bench micro --out /tmp/b            # one suite (micro, train, bank); or --suites a,b

Suites: ``micro`` (attention microbenchmarks, bench/micro.py; ``--budget`` seconds, 330 by default on
a GPU, the shapes left are recorded as skipped), ``train`` (one prefix-tuning training step three
ways, bench/train_step.py; a packed mixed-length batch, bench/train_packed.py) and ``bank`` (a
mixed-task batch over a bank of prefixes, bench/bank.py). ``cartridge`` (long prefixes, bench/cartridge.py)
runs only when named: ``python -m bench cartridge`` (``--quick``: P = 2048, the GPU script's entry).
The JSON and markdown are rewritten after every suite; a suite that fails is recorded in
``suite_errors`` and the exit status is 1. Runs that write to the same directory on the same device
and day overwrite each other (one file per device and date): give split runs separate ``--out``.

Without a GPU it runs tiny shapes on the CPU (prefixattn's torch backend unless TRITON_INTERPRET=1)
to show the harness works; such results are labelled CPU and are not kernel speed.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from . import grid as G
from .env import environment
from .report import compact, write_all

SUITES = ("micro", "train", "bank", "cartridge")
DEFAULT_SUITES = ("micro", "train", "bank")  # the cartridge grid runs when asked for


def parse_args(argv: list[str] | None = None, prog: str = "python -m bench") -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0],
                                 epilog="one suite: python -m bench micro|train|bank [OPTIONS]; the kernel "
                                        "tuning probe (GPU): python -m bench tune --help")
    add_arguments(ap)
    return ap.parse_args(argv)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--out", type=Path, default=None,
                    help="output directory (default: bench/results on a GPU, ./bench-cpu on a CPU)")
    ap.add_argument("--quick", action="store_true", help="a few shapes only")
    ap.add_argument("--suites", default=",".join(DEFAULT_SUITES),
                    help=f"comma-separated subset of {','.join(SUITES)} "
                         f"(default: {','.join(DEFAULT_SUITES)})")
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
    ap.add_argument("--grid", default=None, choices=sorted(G.GRIDS),
                    help="the microbenchmark's shapes (default: full on GPU, cpu on CPU; quick with --quick)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the suites named in ``args`` and write the results; return the JSON document."""
    if args.device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA device is available")
    suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    bad = [s for s in suites if s not in SUITES]
    if bad or not suites:
        raise ValueError(f"unknown suite(s) {bad}; choose from {', '.join(SUITES)}")
    from .cartridge import PROVIDERS as CARTRIDGE_PROVIDERS

    providers = G.ALL_PROVIDERS if args.providers is None else tuple(args.providers.split(","))
    known = G.ALL_PROVIDERS + tuple(p for p in CARTRIDGE_PROVIDERS if p not in G.ALL_PROVIDERS)
    unknown = [p for p in providers if p not in known]
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown}; choose from {', '.join(known)}")
    if args.rep_ms is not None and not args.rep_ms >= 0:
        raise ValueError(f"--rep-ms must be >= 0, got {args.rep_ms}")
    if args.budget is not None and not args.budget > 0:
        raise ValueError(f"--budget must be positive, got {args.budget}")
    gpu = device.type == "cuda"
    out_dir = args.out or Path("bench/results" if gpu else "bench-cpu")
    rep_ms = args.rep_ms if args.rep_ms is not None else (30.0 if gpu else 0.0)
    if device.type == "cuda" or args.backend == "triton":
        _require_kernels()
    env = environment(device)
    print(f"bench on {env['device']} (torch {env['torch']}, triton {env['triton']}), "
          f"suites {','.join(suites)} -> {out_dir}", flush=True)
    if not gpu:
        print("NOTE: CPU run: tiny shapes, proves the harness works; not kernel speed.", flush=True)

    records: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    t0 = time.monotonic()

    def label(recs: list[dict[str, Any]]) -> None:
        for r in recs:  # every record says where it ran; CPU numbers are never kernel speed
            r["device_type"] = device.type
            if r.get("peak_mem_mb") is None and r.get("status", "ok") == "ok" and not gpu:
                r["peak_mem_note"] = "not measured on CPU"

    for suite in [s for s in SUITES if s in suites]:
        try:
            if suite == "micro":
                if args.grid:
                    shapes = G.GRIDS[args.grid]()
                elif gpu:
                    shapes = G.quick_grid() if args.quick else G.full_grid()
                else:
                    shapes = G.smoke_grid() if args.quick else G.cpu_grid()
                budget = args.budget if args.budget is not None else (330.0 if gpu else None)
                deadline = None if budget is None else time.monotonic() + budget
                new = _run_micro(shapes, device, providers, args.backend, deadline, rep_ms)
            elif suite == "cartridge":
                from .cartridge import run_cartridge_bench

                budget = args.budget if args.budget is not None else (330.0 if gpu else None)
                deadline = None if budget is None else time.monotonic() + budget
                chosen = CARTRIDGE_PROVIDERS if args.providers is None else providers
                new = run_cartridge_bench(device, quick=args.quick, backend=args.backend, rep_ms=rep_ms,
                                          deadline=deadline, providers=chosen)
            elif suite == "train":
                from .train_packed import run_packed_bench
                from .train_step import run_train_bench

                new = run_train_bench(device, quick=args.quick, backend=args.backend)
                new += run_packed_bench(device, quick=args.quick, backend=args.backend)
            else:
                from .bank import run_bank_bench

                new = run_bank_bench(device, quick=args.quick, backend=args.backend, rep_ms=rep_ms)
        except Exception as e:  # one broken suite must not lose the others' results
            errors[suite] = f"{type(e).__name__}: {e}"[:500]
            print(f"!! suite {suite} failed: {errors[suite]}", flush=True)
            traceback.print_exc()
            continue
        label(new)
        records += new
        # results on disk after every suite: a run cut short (time limit, crash) keeps what it measured
        write_all(_with_errors(env, errors), records, out_dir, figures=False)

    env = _with_errors(env, errors)
    paths = write_all(env, records, out_dir)
    doc = {**env, "records": records}
    print(f"\nbench done in {time.monotonic() - t0:.0f}s; wrote:", flush=True)
    for p in paths:
        print(f"  {p}")
    print(compact(doc), flush=True)
    if errors:
        print(f"!! failed suites: {', '.join(errors)}", flush=True)
    return doc


def _require_kernels() -> None:
    """The Triton kernels come with the installed project (``prefixattn.kernels``); bench does not
    load them from a bare checkout."""
    try:
        importlib.import_module("prefixattn.kernels")
    except ModuleNotFoundError as e:
        if e.name != "prefixattn.kernels":
            raise
        raise ValueError("prefixattn.kernels is not importable: install the checkout first "
                         "(pip install -e . or bash scripts/setup.sh)") from None


def _with_errors(env: dict[str, Any], errors: dict[str, str]) -> dict[str, Any]:
    return {**env, "suite_errors": dict(errors)} if errors else env


def _run_micro(shapes: list, device: torch.device, providers: tuple[str, ...], backend: str,
               deadline: float | None, rep_ms: float) -> list[dict[str, Any]]:
    from prefixattn.cli.progress import Progress

    from .micro import run_shape

    records: list[dict[str, Any]] = []
    bar = Progress(shapes, desc="micro", every=1)
    for shape in bar:
        bar.set(shape=shape.label())
        bar.write(f"# {shape.label()} [{shape.tag}]")
        records += run_shape(shape, device, providers=providers, backend=backend, deadline=deadline,
                             warmup_ms=min(10.0, rep_ms), rep_ms=rep_ms, log=bar.write)
    return records


def main(argv: list[str] | None = None) -> int:
    try:
        doc = run(parse_args(argv))
    except ValueError as e:  # bad arguments: a clear message, no traceback
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    return 1 if doc.get("suite_errors") else 0


if __name__ == "__main__":
    sys.exit(main())
