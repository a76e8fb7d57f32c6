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


def test_train_help_shows_every_default(capsys):
    """Every option with a default says it in --help (an option whose default is "not given" or "off"
    describes itself), and the help tells how --resume treats left-out options."""
    import argparse

    from prefixattn.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    parser = build_parser()
    train = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    shown = 0
    for action in train._actions:
        default = action.default
        if default is None or default is False or default in ("", argparse.SUPPRESS):
            continue
        assert f"(default: {default})" in text, (action.option_strings, default)
        shown += 1
    assert shown >= 15
    for expected in ("--steps N total optimizer steps (default: 100)", "(default: 0.03)", "(default: constant)",
                     "--seed SEED", "(default: runs/prefixattn-train)", "the options left out take the run's values"):
        assert expected in text, expected


def test_every_train_setting_is_an_option_with_the_dataclass_default():
    """The parser and TrainConfig cannot drift apart: one option per field (--no-plot for plot), whose
    default is the field's; and the command line's settings build the TrainConfig the defaults make."""
    import dataclasses

    from prefixattn.cli import build_parser
    from prefixattn.cli.config import TrainConfig

    args = vars(build_parser().parse_args(["train"]))
    for field in dataclasses.fields(TrainConfig):
        if field.name == "plot":
            assert args["no_plot"] is (not field.default)
        else:
            assert field.name in args, field.name
            assert args[field.name] == field.default and type(args[field.name]) is type(field.default), field.name
    assert set(args) - {f.name for f in dataclasses.fields(TrainConfig)} == {"no_plot", "command", "func"}


def test_train_options_given_on_the_command_line():
    """--resume tells an option given on the command line (even at its default value) from a default."""
    from prefixattn.cli import given_train_options

    assert given_train_options(["train", "--out", "x", "--resume"]) == {"out", "resume"}
    assert given_train_options(["train", "--lr", "0.03", "--no-plot", "--no-gradient-checkpointing"]) == {
        "lr", "plot", "gradient_checkpointing"}
