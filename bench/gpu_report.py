"""The last stage of ``scripts/gpu_check.sh``: merge what the stages wrote into one results JSON, one
markdown table and the plots, in the folder the device tool brings back (at most 8 files there).

    python -m bench.gpu_report WORK OUT

WORK holds stages.tsv (name, exit code, seconds, status per stage), facts.txt (nvidia-smi, versions,
the triton cache), tests.log's summary line, and one bench results JSON per suite folder. A stage
that timed out or failed is in the JSON with its status; its records, if it wrote any, are kept.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from .report import CONVENTIONS, markdown, validate


def read_stages(work: Path) -> list[dict[str, Any]]:
    stages = []
    path = work / "stages.tsv"
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) == 4:
                stages.append({"stage": parts[0], "rc": int(parts[1]), "seconds": int(parts[2]),
                               "status": parts[3]})
    return stages


def tests_summary(log: Path) -> str | None:
    if not log.exists():
        return None
    lines = [ln for ln in log.read_text(errors="replace").splitlines()
             if re.search(r"\b(passed|failed|skipped|error|no tests ran)\b", ln) and " in " in ln]
    return lines[-1].strip("= ") if lines else None


def merge(work: Path, tests_log: Path) -> dict[str, Any]:
    docs = []
    for path in sorted(work.glob("*/*.json")):
        try:
            docs.append((path.parent.name, json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError) as e:
            print(f"gpu_report: skipping {path}: {e}", file=sys.stderr)
    env: dict[str, Any] = {}
    records: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    distill = None
    for suite_dir, doc in docs:
        if suite_dir == "distill":  # its own records (bench/distill.py: seconds per step, not the op's)
            distill = doc
            continue
        if not env:
            env = {k: v for k, v in doc.items() if k not in ("records", "conventions", "suite_errors")}
        for r in doc.get("records", []):
            records.append({**r, "stage": suite_dir})
        for k, v in (doc.get("suite_errors") or {}).items():
            errors[f"{suite_dir}:{k}"] = v
    facts = (work / "facts.txt").read_text(errors="replace") if (work / "facts.txt").exists() else ""
    check = {"stages": read_stages(work), "tests": tests_summary(tests_log), "facts": facts}
    doc = {**env, "gpu_check": check, "conventions": CONVENTIONS, "records": records}
    if errors:
        doc["suite_errors"] = errors
    if distill is not None:
        doc["distill"] = distill
    return doc


def stage_table(doc: dict[str, Any]) -> str:
    check = doc["gpu_check"]
    lines = ["## GPU check", "", "| stage | status | exit code | seconds |", "|---|---|---|---|"]
    lines += [f"| {s['stage']} | {s['status']} | {s['rc']} | {s['seconds']} |" for s in check["stages"]]
    lines += ["", f"Tests: {check['tests'] or 'no summary'}", "", "```", check["facts"].strip(), "```", ""]
    return "\n".join(lines)


def write(doc: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "results.md"]
    paths[0].write_text(json.dumps(doc, indent=1, default=str) + "\n")
    try:
        validate(doc)
        body = markdown(doc)
    except Exception as e:  # a broken record must not lose the stage table and the JSON
        body = f"(results table not made: {type(e).__name__}: {e})\n"
    if doc.get("distill"):
        from .distill import table

        timed = [r for r in doc["distill"].get("records", []) if "s_per_step" in r]
        body += "\n" + (table(timed, doc["distill"]["meta"]) if timed else "(distill: no timed records)\n")
    paths[1].write_text(stage_table(doc) + "\n" + body)
    if doc.get("device_type") == "cuda" or doc.get("records"):
        try:
            from .plots import plot_all

            paths += plot_all(doc, out / "results")
        except Exception as e:  # matplotlib missing or no plottable records
            print(f"gpu_report: no plots: {type(e).__name__}: {e}", file=sys.stderr)
    return paths


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2:
        print("usage: python -m bench.gpu_report WORK OUT", file=sys.stderr)
        return 2
    work, out = Path(argv[0]), Path(argv[1])
    doc = merge(work, out / "tests.log")
    for p in write(doc, out):
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
