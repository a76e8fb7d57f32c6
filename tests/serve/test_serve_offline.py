"""``vllm.LLM`` with the prefix connector (``prefixattn.serve.offline``), in the vLLM environment: greedy
outputs equal transformers + prefixattn, and requests built wrong on purpose, past the helper's checks,
are failed by the connector (finish reason "error", no tokens) while the engine keeps serving."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from serve_env import child_env, vllm_python

pytestmark = [pytest.mark.xdist_group("vllm_offline"),  # its own engine: runs beside the server's group
              pytest.mark.usefixtures("one_thread")]

PROMPT = [7, 70, 170, 17, 77, 177, 27]  # offline_run.py's


def test_offline_llm_serves_prefixes_and_fails_wrong_requests(serve_fixture, reference, tmp_path):
    python = vllm_python()
    out = tmp_path / "offline.json"
    env = child_env()
    run = subprocess.run([str(python), str(Path(__file__).with_name("offline_run.py")), str(serve_fixture.root),
                          str(tmp_path / "run"), str(out)], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    for phase in ("before", "after"):
        for name in (None, "peft37", "bank8/1"):
            assert result[phase][str(name)] == reference.greedy(name, PROMPT, 12)[0], (phase, name)
    assert set(result["wrong"]) == {"unknown name", "no placeholders", "wrong salt", "prompt logprobs",
                                    "reserved salt on the base"}
    for what, got in result["wrong"].items():
        assert "error" in got or (got["finish_reason"] == "error" and got["token_ids"] == []), (what, got)
