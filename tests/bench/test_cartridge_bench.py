"""The cartridge benchmark (bench/cartridge.py): its grid covers the issue's P and S and its GPU entry is
P = 2048; on a CPU (tiny long-prefix shapes) ``python -m bench cartridge`` checks the providers against
prefixattn before timing them, records FlexAttention's missing CPU backward as a skip with the reason,
and writes the JSON and the markdown with the cartridge section."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # bench/ is a checkout directory, not an installed package
    sys.path.insert(0, str(ROOT))

from bench import __main__ as bench_main  # noqa: E402
from bench import cartridge  # noqa: E402


def test_grid_covers_the_issue_and_the_gpu_entry_is_p2048():
    full = cartridge.grid(gpu=True)
    assert {s.P for s in full} == {512, 2048, 8192}
    assert {s.S for s in full if s.modes == ("fwd_bwd",)} == {256, 1024, 2048}
    assert {s.S for s in full if s.Sq == 1 and s.modes == ("infer",)} == {256, 2048}
    assert {s.P for s in cartridge.grid(gpu=True, quick=True)} == {2048}
    assert {(s.P, s.S, s.Sq) for s in cartridge.grid(gpu=False)} == {(s.P, s.S, s.Sq) for s in full}
    assert {s.P for s in full if s.B == 1 and s.Sq == 1} == {512, 2048, 8192}


def test_python_m_bench_cartridge_on_cpu(tmp_path, monkeypatch):
    from torch.nn.attention.flex_attention import flex_attention

    import bench.providers as providers

    # CI: the smoke shapes, and FlexAttention uncompiled (inductor's CPU compile takes a minute a shape)
    real_grid = cartridge.grid
    monkeypatch.setattr(cartridge, "grid", lambda gpu, quick=False, smoke=False: real_grid(gpu, smoke=True))
    monkeypatch.setattr(providers, "_flex", lambda: flex_attention)
    rc = bench_main.main(["cartridge", "--device", "cpu", "--backend", "torch", "--out", str(tmp_path)])
    assert rc == 0
    [name] = [p for p in os.listdir(tmp_path) if p.endswith(".json")]
    doc = json.loads((tmp_path / name).read_text())
    assert doc["cpu_only"] and {r["suite"] for r in doc["records"]} == {"cartridge"}
    by = {(r["provider"], r["mode"]): r for r in doc["records"]}
    skipped = by[("concat_flex_compiled", "fwd_bwd")]
    assert skipped["status"] == "skipped" and "no backward on CPU" in skipped["reason"]
    for key in (("prefixattn", "fwd_bwd"), ("concat_sdpa_mask", "fwd_bwd"), ("prefixattn", "infer"),
                ("concat_sdpa_mask", "infer"), ("concat_flex_compiled", "infer")):
        assert by[key]["status"] == "ok" and by[key]["agree"] and by[key]["ms"] > 0, by[key]
    assert "## Cartridges: long prefixes" in (tmp_path / name.replace(".json", ".md")).read_text()
