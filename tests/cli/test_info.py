"""``prefixattn info`` and the command's argument errors (one clear line, exit status 2)."""

from __future__ import annotations

import pytest
import torch

import prefixattn
from prefixattn.cli import main


def test_info_prints_versions_and_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"torch:        {torch.__version__}" in out
    assert f"prefixattn:   {prefixattn.__version__}" in out
    for key in ("triton:", "transformers:", "peft:", "device:", "backends:"):
        assert key in out, key
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert lines["torch"].strip().startswith("torch   yes")
    assert "triton" in lines and "auto" in lines
    # auto names the backend that would run here
    expected = "triton" if lines["triton"].split(None, 1)[1].startswith("yes") else "torch"
    assert lines["auto"].split()[1] == expected


@pytest.mark.parametrize("argv,message", [
    (["train", "--steps", "0"], "--steps: must be positive"),
    (["train", "--lr", "-1"], "--lr: must be positive"),
    (["train", "--batch-size", "two"], "expected an integer, got 'two'"),
    (["train", "--grad-accum", "0"], "--grad-accum: must be positive"),
    (["train", "--dtype", "float64"], "invalid choice"),
    (["train", "--lr-schedule", "zigzag"], "invalid choice"),
    (["train", "--device", "gpu9"], "invalid choice"),
    (["train", "--bf16", "--fp16"], "not allowed with argument"),
    (["frobnicate"], "invalid choice"),
    (["bench"], "invalid choice"),  # benchmarks are python -m bench, a development tool
    ([], "required"),
])
def test_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
