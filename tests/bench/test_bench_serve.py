"""bench/serve.py without a server: the summary (per-round ratios against the base, medians), its markdown
with the CPU label, the workload of each mode, and the missing-vLLM message."""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # bench/ is a checkout directory, not an installed package
    sys.path.insert(0, str(ROOT))

from bench import serve  # noqa: E402


def test_summary_ratios_are_per_round_medians(monkeypatch):
    monkeypatch.setattr(serve, "vllm_version", lambda python: "0.32.0")
    rounds = {m: [] for m in serve.MODES}
    for base_tps, slow in ((100.0, 0.5), (50.0, 0.8), (80.0, 1.0)):
        for mode in serve.MODES:
            f = 1.0 if mode == "base" else slow
            rounds[mode].append({"wall_s": 1.0, "tokens_per_s": base_tps * f, "latency_s": 1.0 / f,
                                 "latency_p90_s": 1.0 / f, "ttft_s": 0.1 / f})
    args = argparse.Namespace(model=None, prompt_tokens=8, max_tokens=4, requests=2, concurrency=2, rounds=3)
    doc = serve.report(args, rounds, 5, "python", on_gpu=False)
    assert doc["summary"]["base"]["throughput_vs_base"] == 1.0
    assert doc["summary"]["prefix"]["throughput_vs_base"] == 0.8  # median of 0.5, 0.8, 1.0
    assert abs(doc["summary"]["prefix"]["latency_vs_base"] - 1.25) < 1e-12
    text = serve.markdown(doc)
    # the spread of the rounds: prefix ran 50, 40, 80 tok/s (min / median / max), x0.8 the median ratio
    assert "CPU: relative costs only" in text and "| prefix | 40.0 / 50.0 / 80.0 | 0.80 |" in text
    assert doc["summary"]["prefix"]["latency_s_min"] == 1.0 and doc["summary"]["prefix"]["latency_s_max"] == 2.0


def test_modes_send_what_they_say():
    prompts = [[5, 6], [7, 8]]
    rng = random.Random(0)
    assert serve.jobs_for("base", prompts, "p", 3, rng) == [("base", [5, 6]), ("base", [7, 8])]
    assert serve.jobs_for("prefix", prompts, "p", 3, rng) == [("p", [5, 6]), ("p", [7, 8])]
    assert [m for m, _ in serve.jobs_for("mixed", prompts, "p", 3, rng)] == ["base", "p"]
    text = serve.jobs_for("base_text_prefix", prompts, "p", 3, rng)
    assert all(m == "base" and len(q) == 5 and q[3:] == prompts[i] for i, (m, q) in enumerate(text))


def test_output_goes_outside_the_checkout(monkeypatch, capsys, tmp_path):
    """Without --out: a new temporary directory, printed (it left an untracked bench-serve/ in the checkout)."""
    class Stop(Exception):
        pass

    def stop(*args):
        raise Stop

    monkeypatch.setattr(serve, "build_model", stop)
    monkeypatch.chdir(tmp_path)
    try:
        serve.main(["--vllm-python", sys.executable])
    except Stop:
        pass
    printed = capsys.readouterr().out
    out = Path(printed.split("writing to ", 1)[1].split()[0])
    assert out.is_dir() and not list(tmp_path.iterdir())
    assert ROOT not in out.parents and out.name.startswith("bench-serve-out-")
    out.rmdir()


def test_missing_vllm_environment(capsys, tmp_path):
    assert serve.main(["--vllm-python", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    assert "setup_vllm.sh" in capsys.readouterr().err


def test_soak_report_and_memory():
    import os

    from bench import serve_soak

    assert serve_soak.resident_mib(os.getpid()) > 10  # this Python, with torch loaded
    bad = serve_soak.bad_requests(["base", "p32"], {"base": 100, "p32": 68})
    assert ({"model": "p32", "prompt": [5] * 68, "max_tokens": 2}, 400) in bad  # no room left for output
    doc = {"env": {"device": "cpu", "vllm": "0.32.0", "torch": "2.13", "date": "d", "cpu_only": True},
           "shape": {"minutes": 2, "names": ["base", "p32"], "prefix_tokens": {"p32": 32}, "prompts_per_name": 6,
                     "max_tokens": 32, "concurrency": 8, "bad_every": 10},
           "minutes_table": [{"minute": 1, "seconds": 60.0, "requests": 90, "tokens_per_s": 48.0, "latency_p50_s": 1.2,
                              "latency_p95_s": 2.5, "bad_requests": 10, "bad_answered_right": 10, "mismatches": 0}],
           "requests": 90, "bad_requests": 10, "bad_wrong": 0, "mismatches": 0, "rss_mib_start": 1000.0,
           "rss_mib_end": 1010.0, "wall_s": 60.0}
    text = serve_soak.markdown(doc)
    assert "mismatches against their solo answers: **0**" in text and "1000 MiB at the start, 1010 MiB" in text
    assert "| 1 (60) | 90 | 48.0 | 1200 | 2500 | 10 (10) | 0 |" in text
