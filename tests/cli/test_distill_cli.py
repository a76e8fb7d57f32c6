"""``prefixattn distill`` end to end on tiny settings: the embedded demo (outputs, report, adapter),
--resume, a model saved with save_pretrained as a cartridge, and bad input refused at the call."""

from __future__ import annotations

import json

import pytest

from prefixattn.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["--conversations", "6", "--question-tokens", "4", "--answer-tokens", "6", "--prefix-tokens", "8",
        "--steps", "4", "--save-every", "2", "--batch-size", "2", "--top-k", "4", "--backend", "torch", "--no-plot"]


def test_demo_resume_and_a_saved_model(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", "--out", str(out), *TINY]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["eval"]) == {"none", "initial", "trained"}
    assert all(0 <= r["agreement"] <= 1 and r["kl"] >= 0 for r in report["eval"].values())
    assert (out / "prefix.safetensors").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"
    lines = (out / "selfstudy.jsonl").read_bytes().splitlines()
    assert len(lines) >= 4
    # resume: train further from the last checkpoint, the conversations are not generated again
    assert main(["distill", "--out", str(out), *TINY[:-7], "--steps", "6", "--save-every", "2", "--batch-size",
                 "2", "--top-k", "4", "--backend", "torch", "--no-plot", "--resume"]) == 0
    assert (out / "checkpoint-6").is_dir()
    assert (out / "selfstudy.jsonl").read_bytes().splitlines() == lines
    assert main(["distill", "--out", str(out), *TINY]) == 2
    assert "--resume" in capsys.readouterr().err
    # the recorded conversations again, the teacher reading the whole context's kept K/V at every step
    live = tmp_path / "live"
    assert main(["distill", "--out", str(live), "--data", str(out / "selfstudy.jsonl"), "--live-teacher",
                 "--lm-weight", "0.1", *TINY]) == 0
    report = json.loads((live / "report.json").read_text())
    assert report["eval"]["trained"]["kl"] < report["eval"]["none"]["kl"]
    # a model saved with save_pretrained (the demo's base model), distilled into a cartridge
    context = tmp_path / "doc.txt"
    context.write_text("Punched cards held the programs of the Analytical Engine. " * 3)
    cart = tmp_path / "cart"
    assert main(["distill", "--model", str(out / "base_model"), "--context", str(context), "--out", str(cart),
                 "--cartridge", *TINY]) == 0
    config = json.loads((cart / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "CARTRIDGE" and config["num_frozen_tokens"] == 1


def test_bad_input_is_refused(tmp_path, capsys):
    def refused(args, match):
        assert main(["distill", "--out", str(tmp_path / "x"), *TINY, *args]) == 2
        assert match in capsys.readouterr().err

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    refused(["--context", str(empty)], "the context is empty")
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    refused(["--context", str(short), "--prefix-tokens", "9"], "exceeds the context's 4 tokens")
    long = tmp_path / "long.txt"
    long.write_text("x" * 1100)
    refused(["--context", str(long), "--live-teacher"], "1024 positions")
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"index": 0, "chunk": 0, "kind": "question", "context": "0", "tokenizer": "0",
                                 "prompt_ids": [1], "response_ids": [2], "topk_ids": [[2]],
                                 "topk_logprobs": [[-0.1]]}) + "\n")
    refused(["--data", str(other)], "another tokenizer")
    refused(["--context", str(tmp_path / "missing.txt")], "no such file")
