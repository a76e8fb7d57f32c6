"""``python -m bench compile``: the kernels compiled for sm_90 (H100/H200) on this CPU machine.

The CI subset (the pinned configs of the forward, dq and dk/dv kernels, bf16 and fp16, D = 64, 128,
256, and the small helper kernels) is compiled afresh (no cache) and must: compile; fit the device's
shared memory; not spill at D <= 128; and have the launchers' shared-memory estimate (smem_bytes, which
picks the pinned configs and prunes the autotune lists) at or above the compiler's figure and close to
it. The compile runs in a subprocess: this test process runs triton in interpreter mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.compile_table import ctas_per_sm, problems  # noqa: E402
from bench.compile_worker import count_mma, parse_ptxas_log  # noqa: E402

PTXAS_LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_dq_kernel_jit' for 'sm_90a'
ptxas info    : Function properties for _dq_kernel_jit
    80 bytes stack frame, 80 bytes spill stores, 84 bytes spill loads
ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to \
insufficient register resources for the wgmma pipeline in the function '_dq_kernel_jit'
ptxas info    : Used 255 registers, used 1 barriers, 80 bytes cumulative stack size
"""


def _nvidia_backend() -> bool:
    code = ("import triton.backends.nvidia.compiler as c, os; "
            "p = c.get_ptxas(90).path; raise SystemExit(0 if os.path.exists(p) else 1)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode == 0


def test_ptxas_report_and_occupancy():
    r = parse_ptxas_log(PTXAS_LOG)
    assert (r["registers"], r["stack"], r["spill_stores"], r["spill_loads"]) == (255, 80, 80, 84)
    assert r["wgmma_serialized"] and "insufficient register resources" in r["serialized_reason"][0]
    assert count_mma("wgmma.mma_async.sync.aligned.m64n64k16 x; mma.sync.aligned.m16n8k16 y;") == \
        {"wgmma": 1, "mma_sync": 1, "tcgen05": 0, "fma": 0}
    # 255 registers x 256 threads: one program per SM; 128 threads and 64 KiB: three (shared memory)
    assert ctas_per_sm(255, 131072, 8) == 1
    assert ctas_per_sm(128, 65536, 4) == 3


def test_ci_rules():
    row = dict(ok=True, kind="pinned", dtype="bf16", dk=128, dv=128, shared=240000, spill_stores=8, estimate=200000)
    found = problems(row, 232448)
    assert any("shared memory" in p for p in found) and any("spills" in p for p in found)
    assert any("estimate" in p for p in found)
    assert problems(dict(row, kind="pruned", shared=240000, estimate=250000, spill_stores=0), 232448) == []
    assert problems(dict(row, dk=256, dv=256, shared=100000, estimate=100000), 232448) == []  # spills at 256 allowed
    assert problems(dict(ok=False, kind="pinned", error="boom"), 232448)[0].startswith("compile failed")


@pytest.mark.skipif(not _nvidia_backend(), reason="triton's NVIDIA backend (ptxas) is not installed")
def test_ci_set_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "compile", "--set", "ci", "--no-cache", "--check", "--jobs", "2",
         "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    (doc_path,) = tmp_path.glob("compile-h100-*-ci.json")
    doc = json.loads(doc_path.read_text())
    rows = doc["rows"]
    pinned = [r for r in rows if r["kind"] == "pinned"]
    assert {r["short"] for r in pinned} == {"fwd", "dq", "dkdv"} and len(pinned) == 18
    assert all(r["ok"] for r in rows)
    for r in pinned:  # the estimate is safe (never below) and tight (the configs it rejects really do not fit)
        assert r["shared"] <= r["estimate"] <= 1.15 * r["shared"] + 4096, r
        assert r["shared"] <= doc["limit"]
        if max(r["dk"], r["dv"]) <= 128:
            assert r["spill_stores"] == 0, r
    print(f"compiled {len(rows)} launches in {seconds:.0f} s")
