"""``python -m bench compile``: compile every launch the kernels make on a GPU (an H100/H200, sm_90, by
default), on a machine without a GPU, and write the compile table (shared memory against the limit,
registers, spills, wgmma, mma.sync, tcgen05 or MFMA, serialized wgmma, CTAs per SM).

    python -m bench compile [--set devices|ci|pinned|tuned|full] [--jobs N] [--cache DIR | --no-cache]
                            [--device a100|l4|h100|h200|b200|rtx5090|mi300x|mi355x|all] [--out DIR] [--check]

How: bench/compile_plan.py runs the real launchers on meta tensors with the device's facts (SMs,
opt-in shared memory or LDS, compute capability or gfx arch, warp size; kernels/device.py KNOWN)
and records each launch (triton's own specialization of it) instead of running it;
bench/compile_worker.py compiles each one for the device's target in worker processes through
triton's own ``JITFunction.preload`` (NVIDIA: ptxas's report; AMD: the hip backend's hsaco and the
AMDGPU metadata); bench/compile_table.py writes the table. ``--device all`` does every device in turn.

Caching: the figures of each compile are kept in DIR/results (keyed by triton's version, the kernel's
source hash and the launch's specialization), triton's compiled kernels in DIR/triton (triton's own
cache, TRITON_CACHE_DIR). --no-cache compiles everything afresh in a temporary directory (CI).

--check exits 1 when a launch fails to compile, a pinned config needs more shared memory than the
device has, a pinned bf16/fp16 config spills at head dims <= 128, or the launchers' estimate is below
the compiler's figure for a launch they would pick.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

DEFAULT_CACHE = Path(".gpu/compile-cache")


def _result_key(launch, triton_version: str, target=90) -> str:
    import importlib

    module, name = launch.kernel.split(":")
    jit = getattr(importlib.import_module(module), name)
    raw = f"{triton_version}|{jit.cache_key}|{launch.specialization}"
    if target != 90:  # sm_90's keys as before (their cached results stay valid)
        raw += f"|{target}"
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def _worker(conn, triton_cache: str) -> None:
    os.environ["TRITON_CACHE_DIR"] = triton_cache
    from .compile_worker import compile_launch

    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        try:
            conn.send({"ok": True, **compile_launch(*job)})
        except Exception as e:  # noqa: BLE001 - a failed compile is a result
            conn.send({"ok": False, "error": f"{type(e).__name__}: {str(e).strip()[:2000]}"})


def compile_all(jobs: list[tuple[int, Any]], n_workers: int, timeout: float, triton_cache: str, arch,
                progress) -> dict[int, dict[str, Any]]:
    """Compile (index, launch) jobs on n_workers spawned processes; a compile past `timeout` seconds is
    killed (its worker replaced) and reported as a failure."""
    ctx = mp.get_context("spawn")
    pending = list(jobs)
    results: dict[int, dict[str, Any]] = {}
    workers: dict[Any, list] = {}  # conn -> [process, job index or None, started]

    def start():
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child, triton_cache), daemon=True)
        proc.start()
        child.close()
        workers[parent] = [proc, None, 0.0]

    def feed(conn):
        if pending:
            idx, launch = pending.pop(0)
            conn.send((launch.kernel, launch.specialization, arch))
            workers[conn][1:] = [idx, time.monotonic()]
        else:
            conn.send(None)
            workers[conn][0].join(timeout=10)
            del workers[conn]

    for _ in range(max(1, min(n_workers, len(jobs)))):
        start()
    for conn in list(workers):
        feed(conn)
    while workers:
        ready = wait(list(workers), timeout=5)
        for conn in ready:
            proc, idx, started = workers[conn]
            try:
                res = conn.recv()
            except (EOFError, OSError):
                res = {"ok": False, "error": f"worker died (exit code {proc.exitcode})"}
                del workers[conn]
                start()
                conn = next(c for c, w in workers.items() if w[1] is None)
            results[idx] = res
            progress(idx, res)
            feed(conn)
        now = time.monotonic()
        for conn, (proc, idx, started) in list(workers.items()):
            if idx is not None and now - started > timeout:
                proc.kill()
                proc.join()
                del workers[conn]
                results[idx] = {"ok": False, "error": f"timeout: compile ran over {timeout:.0f} s"}
                progress(idx, results[idx])
                start()
                new = next(c for c, w in workers.items() if w[1] is None)
                feed(new)
    return results


def _finish(rows: list[dict[str, Any]], facts=None) -> None:
    """Occupancy from the compiler's figures, and the launchers' estimate for each config."""
    from prefixattn.kernels.device import H100
    from prefixattn.kernels.smem import launch_smem_estimate

    from .compile_table import ctas_per_sm

    facts = facts or H100
    elsize = {"bf16": 2, "fp16": 2, "fp32": 4, "tf32": 4}
    for row in rows:
        if row.get("ok"):
            row["ctas_per_sm"] = ctas_per_sm(row["registers"], row["shared"], row["num_warps"], facts,
                                             row.get("agprs"))
        if row["short"] in ("fwd", "dq", "dkdv") and row.get("dtype"):
            row["estimate"] = launch_smem_estimate(row["short"], row["constants"], row["num_warps"],
                                                   row["num_stages"], elsize[row["dtype"]], facts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench compile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", default="full",
                    choices=("devices", "ci", "pinned", "pinned128", "pinned_wide", "tuned", "full"))
    from prefixattn.kernels.device import KNOWN

    ap.add_argument("--device", default="h100", choices=(*KNOWN, "all"))
    ap.add_argument("--jobs", type=int, default=max(1, min(os.cpu_count() or 1, 4)),
                    help="compile worker processes (default: the CPU count, at most 4)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"default {DEFAULT_CACHE}")
    ap.add_argument("--no-cache", action="store_true", help="compile everything afresh (temporary directory)")
    ap.add_argument("--out", type=Path, default=None,
                    help="write compile-<device>-triton<version>-<set>.md and .json here")
    ap.add_argument("--timeout", type=float, default=900,
                    help="seconds per compile before it counts as failed")
    ap.add_argument("--check", action="store_true", help="exit 1 on the problems CI fails on")
    ap.add_argument("--only", default="", help="only launches whose kernel or case contains this text")
    ap.add_argument("--skip-pruned", action="store_true",
                    help="do not compile autotune candidates the prune drops")
    ap.add_argument("--triton-cache", type=Path, default=None,
                    help="triton's own cache of compiled kernels (default CACHE/triton); gpu_check.sh "
                         "uses .gpu/triton-cache when carried (see bench/TUNING.md on whether it can hit)")
    ap.add_argument("--cached-only", action="store_true",
                    help="compile nothing: the table of what the cache holds (the rest marked not compiled)")
    ap.add_argument("--from-json", type=Path, default=None,
                    help="re-render the table of an earlier run's JSON (estimates from the current model)")
    args = ap.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("bench compile needs the compiling triton: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    if args.device == "all":
        if args.from_json:
            ap.error("--from-json re-renders one device's table")
        codes = []
        for name in KNOWN:
            print(f"=== {name}", flush=True)
            codes.append(compile_device(args, name))
        return max(codes)
    return compile_device(args, args.device)


def compile_device(args: argparse.Namespace, device: str) -> int:
    """One device's plan, compiles, table and checks."""
    import torch
    import triton
    from prefixattn.kernels.device import KNOWN

    from .compile_plan import case_set, record
    from .compile_table import problems, table

    facts = KNOWN[device]
    target = facts.target
    arch = target[1] if target[0] == "cuda" else target  # sm number, or the hip target
    if args.from_json:
        doc = json.loads(args.from_json.read_text())
        rows = doc.pop("rows")
        _finish(rows, facts)
        report = table(rows, doc["limit"], doc)
        target = args.from_json.with_suffix(".md")
        target.write_text(report)
        args.from_json.write_text(json.dumps({**doc, "rows": rows}, indent=1))
        print(f"re-rendered {target}")
        return 0
    tmp = tempfile.TemporaryDirectory() if args.no_cache else None
    cache = Path(tmp.name) if tmp else args.cache
    (cache / "results").mkdir(parents=True, exist_ok=True)
    triton_cache = args.triton_cache or cache / "triton"
    triton_cache.mkdir(parents=True, exist_ok=True)

    t0 = time.monotonic()
    launches = record(case_set(args.set), facts)
    if args.only:
        launches = [x for x in launches if args.only in x.kernel or any(args.only in c for c in x.cases)]
    if args.skip_pruned:
        launches = [x for x in launches if x.kind != "pruned"]
    print(f"{len(launches)} launches from set {args.set!r} ({time.monotonic() - t0:.1f} s to record)",
          flush=True)

    rows: list[dict[str, Any]] = []
    todo: list[tuple[int, Any]] = []
    keys = []
    for i, x in enumerate(launches):
        row = {k: v for k, v in vars(x).items() if k != "specialization"}
        row["short"] = x.short
        rows.append(row)
        keys.append(_result_key(x, triton.__version__, arch))
        cached = cache / "results" / f"{keys[-1]}.json"
        if cached.exists():
            row.update(json.loads(cached.read_text()))
        else:
            todo.append((i, x))
    print(f"{len(launches) - len(todo)} cached, {len(todo)} to compile on {args.jobs} workers", flush=True)

    done = [0]

    def progress(idx: int, res: dict[str, Any]) -> None:
        done[0] += 1
        r = rows[idx]
        what = (f"smem {res['shared']} regs {res['registers']} spill {res['spill_stores']} "
                f"{res['compile_s']} s" if res.get("ok") else res.get("error", "")[:160])
        print(f"[{done[0]}/{len(todo)}] {r['short']} {r['config']} {r['cases'][:1]}: {what}", flush=True)
        rows[idx].update(res)
        if res.get("ok"):
            (cache / "results" / f"{keys[idx]}.json").write_text(json.dumps(res))

    if args.cached_only:
        rows[:] = [r for r in rows if "ok" in r]
        print(f"--cached-only: {len(todo)} launches left out (not compiled yet)")
    else:
        compile_all(todo, args.jobs, args.timeout, str(triton_cache), arch, progress)

    _finish(rows, facts)
    header = {"device": facts.name, "arch": arch if isinstance(arch, int) else target[1],
              "backend": target[0], "warp_size": target[2], "sms": facts.sms, "name": device,
              "limit": facts.smem_per_block, "triton": triton.__version__,
              "torch": torch.__version__, "python": platform.python_version(), "set": args.set,
              "date": datetime.date.today().isoformat(), "seconds": round(time.monotonic() - t0, 1)}
    report = table(rows, facts.smem_per_block, header)
    limit = facts.smem_per_block
    bad = [(r["short"], r["config"], r.get("cases", [])[:1], p) for r in rows for p in problems(r, limit)]
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = f"compile-{device}-triton{triton.__version__}-{args.set}"
        (args.out / f"{stem}.md").write_text(report)
        (args.out / f"{stem}.json").write_text(json.dumps({**header, "rows": rows}, indent=1))
        print(f"wrote {args.out / stem}.md and .json", flush=True)
    summary = report.split("## Checks")[0].split("## Summary")[1].strip()
    print(summary)
    print(f"{len(bad)} problems; {header['seconds']} s in all")
    for b in bad:
        print("PROBLEM", *b)
    if tmp:
        tmp.cleanup()
    return 1 if (args.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
