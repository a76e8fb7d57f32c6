"""``python -m bench compile --device NAME``: the kernels compiled for every GPU users train on, on this CPU.

For each device other than the H100/H200 (sm_90 has its own, larger check in test_compile.py) the
launchers plan that device's launches (its SMs, shared memory or LDS limit, target and warp size),
and the main path's pinned configs (forward, dq, dk/dv; bf16; D = 64 and 128) and the helper
kernels are compiled afresh for its target: NVIDIA through ptxas, AMD through triton's hip backend.
Each must compile, fit the device's limit, not spill, and have the launchers' shared-memory estimate
(which picks the configs) at or above the compiler's figure. One device per test, so that pytest-xdist
spreads them over the CI's cores; the compile runs in a subprocess (this process runs triton in
interpreter mode). Cost, measured one test after another on a shared 2-core machine: a100 63 s, l4 36 s,
b200 92 s, rtx5090 60 s, mi355x 52 s (310 s wall, 198 s CPU for the five at a load average of 3-8), mi300x
106 s (58 s CPU, load 10): about 4.5 CPU-minutes in all, about 2.5 minutes on CI's two xdist workers."""

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

from bench.compile_table import problems  # noqa: E402
from bench.compile_worker import parse_amdgcn  # noqa: E402

AMDGCN = """
    .name:           _fwd_kernel_jit
    .private_segment_fixed_size: 40
    .sgpr_count:     96
    .sgpr_spill_count: 0
    .vgpr_count:     256
  - .agpr_count:     8
    .vgpr_spill_count: 10
    .group_segment_fixed_size: 40960
  v_mfma_f32_32x32x8_bf16 a[0:15], v[0:1], v[2:3], a[0:15]
  v_mfma_f32_32x32x8_bf16 a[0:15], v[4:5], v[6:7], a[0:15]
"""

# sm_90 (h100, h200) is compiled by test_compile.py's CI set, which holds these launches and more
DEVICES = ("a100", "l4", "b200", "rtx5090", "mi300x", "mi355x")


def _backend(name: str) -> bool:
    code = ("import triton.backends as b, sys; "
            f"sys.exit(0 if {name!r} in b.backends else 1)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode == 0


def test_amdgpu_metadata():
    r = parse_amdgcn(AMDGCN)
    assert (r["registers"], r["agprs"], r["sgprs"]) == (256, 8, 96)
    assert (r["spill_stores"], r["spill_loads"], r["lds_asm"], r["mfma"]) == (40, 10, 40960, 2)
    row = dict(ok=True, kind="pinned", dtype="bf16", dk=128, dv=128, shared=40960, estimate=49152, **r)
    assert problems(row, 65536) == ["spills 40 B at D <= 128"]


def test_device_facts_plan_their_own_launches():
    """Each device's facts reach triton: a launch recorded for it is specialized for its target (one
    process records them all in turn)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json; from bench.compile_plan import Case, record; "
            "from prefixattn.kernels.device import KNOWN; "
            "cases = [Case('base', 'fwd', 'bf16', 128, 128)]; "
            "print(json.dumps({n: [json.loads(x.specialization)['target'] for x in record(cases, f)] "
            "for n, f in KNOWN.items()}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    targets = json.loads(proc.stdout.strip().splitlines()[-1])
    assert targets["a100"][0] == {"backend": "cuda", "arch": 80, "warp_size": 32}
    assert targets["rtx5090"][0]["arch"] == 120 and targets["b200"][0]["arch"] == 100
    assert targets["mi300x"][0] == {"backend": "hip", "arch": "gfx942", "warp_size": 64}
    assert targets["mi355x"][0]["arch"] == "gfx950"


@pytest.mark.parametrize("device", DEVICES)
def test_main_path_compiles_for(device, tmp_path):
    backend = "amd" if device.startswith("mi") else "nvidia"
    if not _backend(backend):
        pytest.skip(f"triton's {backend} backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "compile", "--set", "devices", "--device", device, "--no-cache",
         "--check", "--jobs", "1", "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=900)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    (doc_path,) = tmp_path.glob(f"compile-{device}-*-devices.json")
    doc = json.loads(doc_path.read_text())
    rows = doc["rows"]
    assert all(r["ok"] for r in rows)
    pinned = [r for r in rows if r["kind"] == "pinned"]
    assert sorted((r["short"], r["dk"]) for r in pinned) == sorted(
        (k, d) for k in ("fwd", "dq", "dkdv") for d in (64, 128))
    for r in rows:
        assert r["shared"] <= doc["limit"], r
        assert r["spill_stores"] == 0, r
        if r["kind"] == "pinned":
            assert r["shared"] <= r["estimate"], r
    print(f"{device}: compiled {len(rows)} launches in {seconds:.0f} s")
