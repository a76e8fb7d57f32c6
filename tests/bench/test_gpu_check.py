"""scripts/gpu_check.sh, the one-shot GPU check, run as CI runs it: ``--dry-run`` on the CPU (tiny shapes,
the kernels in the Triton interpreter), so the first GPU call cannot fail on a script error; and with a
stage that hangs, to show the time boxes end the script on time and keep what ran before."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
ALLOWED = {"results.json", "results.md", "results-micro.png", "results-e2e.png", "tests.log", "gpu_check.log",
           "raw.tgz"}


def run(out: Path, budget: int | None, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """The script's dry run; budget None: no time limits (they are for the GPU call), else time boxes of
    3 x the GPU's stage budgets within ``budget`` seconds."""
    full_env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), **env}
    full_env.pop("GPU_CHECK_BUDGET", None)
    if budget is not None:
        full_env["GPU_CHECK_BUDGET"] = str(budget)
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=budget + 60 if budget else 3600)  # unbounded: a hang guard only
    return proc, time.monotonic() - t0


def stages(out: Path) -> dict[str, str]:
    doc = json.loads((out / "results.json").read_text())
    return {s["stage"]: s["status"] for s in doc["gpu_check"]["stages"]}


def check_out_folder(out: Path) -> None:
    """What the device tool can bring back: at most 8 plain files, no folders."""
    entries = list(out.iterdir())
    assert len(entries) <= 8, entries
    assert all(e.is_file() for e in entries), entries
    assert {e.name for e in entries} <= ALLOWED, entries
    assert all(e.stat().st_size <= 16 * 2**20 for e in entries)


def test_dry_run_runs_every_stage(tmp_path):
    out = tmp_path / "out"
    proc, seconds = run(out, None)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_out_folder(out)
    assert stages(out) == {s: "ok" for s in ("setup", "tests", "micro", "decode", "train", "wide512", "distill")}, \
        (out / "gpu_check.log").read_text()[-4000:]
    doc = json.loads((out / "results.json").read_text())
    micro = {(r["provider"], r["mode"]) for r in doc["records"] if r["stage"] == "micro" and r["ms"] is not None}
    for provider in ("prefixattn", "concat_sdpa_mask", "concat_sdpa_causal"):
        assert {(provider, "fwd"), (provider, "fwd_bwd")} <= micro, micro
    assert any(r["stage"] == "decode" and r["mode"] == "infer" and r["ms"] for r in doc["records"])
    assert any(r["stage"] == "train" and r["provider"] == "peft_sdpa" for r in doc["records"])
    assert {r["provider"] for r in doc["records"] if r["stage"] == "wide512"} >= {"peft_sdpa", "prefixattn"}
    assert {r["provider"] for r in doc["distill"]["records"]} == {"teacher_kept_kv", "teacher_rereads"}
    assert all(r["s_per_step"] > 0 and r["teacher_rel_err"] < 1e-3 for r in doc["distill"]["records"])
    assert "torch:" in doc["gpu_check"]["facts"] and "triton:" in doc["gpu_check"]["facts"]
    assert (out / "results.md").read_text().startswith("## GPU check")
    print(f"dry run: {seconds:.0f} s")


def test_a_hung_stage_is_cut_and_the_rest_is_kept(tmp_path):
    out = tmp_path / "out"
    # setup (~5-10 s), then the tests stage hangs until 15 s before the end (kept for the report)
    budget = 45
    proc, seconds = run(out, budget, GPU_CHECK_HANG_STAGE="tests", GPU_CHECK_REPORT_RESERVE="15")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert seconds < budget + 15, f"the script ran {seconds:.0f} s on a {budget} s budget"
    check_out_folder(out)
    got = stages(out)
    assert got["setup"] == "ok" and got["tests"] == "timeout", got
    assert got["micro"] == got["decode"] == got["train"] == got["wide512"] == got["distill"] == "skipped", got  # no time left: never started
    assert "torch:" in json.loads((out / "results.json").read_text())["gpu_check"]["facts"]  # setup's output kept
