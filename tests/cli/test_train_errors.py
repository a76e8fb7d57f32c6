"""``prefixattn train`` refuses bad data, models and settings before training starts: one clear
message naming the problem (a JSONL line by its number), exit status 2, no traceback, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prefixattn.cli import main

FAST = ["--backend", "torch", "--device", "cpu", "--report-to", "none"]
TINY = ["--batch-size", 2, "--seq-len", 8, "--prefix-tokens", 2, "--no-plot", *FAST]


pytestmark = pytest.mark.usefixtures("one_thread")


def fails(argv: list, message: str, capsys) -> str:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err, (message, err)
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("content,message", [
    ('{"text": "fine"}\n{"text": "also fine"}\n{"text": broken\n', "data.jsonl:3: not valid JSON"),
    ("", "data.jsonl: the file is empty"),
    ("\n\n  \n", "data.jsonl: the file is empty"),
    ('{"text": "fine"}\n{"prompt": "2 + 2 ="}\n', "data.jsonl:2: missing field 'completion'"),
    ('{"text": "fine"}\n{"question": "no"}\n', "data.jsonl:2: missing field 'text' or 'prompt'/'completion' (fields: 'question')"),
    ('{"text": "fine"}\n{"text": 7}\n', "data.jsonl:2: field 'text' must be a string, got int"),
    ('{"text": "fine"}\n["a list"]\n', "data.jsonl:2: expected a JSON object"),
    ('{"text": "only one"}\n', "need at least 2 examples"),
])
def test_bad_jsonl_is_reported_with_its_line(tmp_path, capsys, content, message):
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    out = tmp_path / "run"
    fails(["train", "--data", data, "--out", out, *TINY], message, capsys)
    assert not out.exists()


def test_bad_model_directories(tmp_path, capsys):
    out = tmp_path / "run"
    fails(["train", "--out", out, "--model", tmp_path / "nope", *FAST], "no such directory", capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(["train", "--out", out, "--model", empty, *FAST], "not a local Hugging Face model directory (no config.json)",
          capsys)
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=300, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=32).save_pretrained(empty)
    fails(["train", "--out", out, "--model", empty, *FAST], "has a config.json but no weights", capsys)
    fails(["train", "--out", out, "--data", tmp_path / "missing.jsonl", *FAST], "no such file", capsys)
    assert not out.exists()


def test_bad_settings_and_resume_rules(tmp_path, capsys):
    out = tmp_path / "run"
    fails(["train", "--out", out, "--resume", *FAST], "no complete checkpoint in", capsys)
    if not torch.cuda.is_available():
        fails(["train", "--out", out, "--device", "cuda", "--backend", "torch"], "no CUDA device", capsys)
    fails(["train", "--out", out, "--deepspeed", tmp_path / "ds.json", *FAST], "ds.json: no such file", capsys)
    if not torch.cuda.is_available():  # accelerate would silently train in fp32 and call it fp16
        fails(["train", "--out", out, "--fp16", *[a for a in FAST if a not in ("--device", "cpu")]],
              "--fp16 needs a CUDA GPU", capsys)
        fails(["train", "--out", out, "--fp16", *FAST], "use --bf16 for mixed precision on a CPU", capsys)
    assert main([str(a) for a in ["train", "--out", out, "--steps", 2, "--save-every", 1, *TINY]]) == 0
    capsys.readouterr()
    fails(["train", "--out", out, "--steps", 4, *TINY], "already holds a checkpoint", capsys)
    fails(["train", "--out", out, "--steps", 4, "--resume", "--overwrite", *TINY], "contradict", capsys)
    fails(["train", "--out", out, "--steps", 1, "--resume", *TINY], "already at step 2, past --steps 1", capsys)
    # options given again that disagree with the run are named with both values; those that may change are not
    err = fails(["train", "--out", out, "--steps", 4, "--resume", *TINY, "--lr", 0.5, "--prefix-tokens", 3,
                 "--eval-every", 7, "--report-to", "none"], f"--resume: these options disagree with the run in {out}",
                capsys)
    assert "--lr 0.5 (the run has 0.03)" in err and "--prefix-tokens 3 (the run has 2)" in err, err
    assert "eval-every" not in err and "report-to" not in err and "--steps" not in err, err
    err = fails(["train", "--out", out, "--resume", "--batch-size", 4], "--resume: these options disagree", capsys)
    assert "global batch 4 per process x 1 process x 1 accumulation = 4 (the run has 2)" in err, err
    assert json.loads((out / "checkpoint-2" / "prefixattn.json").read_text())["step"] == 2  # left alone

    # --overwrite starts again and deletes only what a run writes
    (out / "notes.txt").write_text("keep me")
    assert main([str(a) for a in ["train", "--out", out, "--steps", 1, "--overwrite", *TINY]]) == 0
    assert sorted(p.name for p in Path(out).glob("checkpoint-*")) == ["checkpoint-1"]
    assert (out / "notes.txt").read_text() == "keep me"


def test_bad_paths_backends_and_loggers_are_refused_before_anything_runs(tmp_path, capsys, monkeypatch):
    from transformers.integrations import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    fails(["train", "--out", a_file, *FAST], "--out " + str(a_file) + ": a file, not a directory", capsys)
    out = tmp_path / "run"
    fails(["train", "--out", out, "--data", tmp_path, *FAST], "a directory; --data takes a JSONL file", capsys)
    fails(["train", "--out", out, *FAST, "--report-to", "frobnicate"],
          "--report-to frobnicate: not one of the Trainer's integrations", capsys)
    missing = sorted(set(INTEGRATION_TO_CALLBACK) - set(get_available_reporting_integrations()) - {"flyte"})
    if missing:  # the Trainer would raise a bare RuntimeError
        fails(["train", "--out", out, *FAST, "--report-to", missing[0]],
              f"--report-to {missing[0]}: its package is not installed here", capsys)
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET")
        fails(["train", "--out", out, *FAST, "--backend", "triton"], "--backend triton needs a CUDA GPU", capsys)
    assert not out.exists()


def _llama_dir(path: Path, vocab: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, pad_token_id=1, eos_token_id=2,
                                 bos_token_id=None)).save_pretrained(path)
    return path


def test_a_model_without_its_tokenizer_is_refused_not_fed_byte_ids(tmp_path, capsys):
    """Only the embedded demo uses the byte tokenizer: a --model directory without tokenizer files (here a
    vocabulary of 500 with pad 1 / eos 2, which byte ids would fit but mean nothing to) is refused before
    anything loads, saying how to fix it; --tokenizer DIR gives the tokenizer, and is checked."""
    from transformers import ByT5Tokenizer

    model = _llama_dir(tmp_path / "model", vocab=500)
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"line {i}"}) for i in range(4)) + "\n")
    out = tmp_path / "run"
    common = ["--out", out, "--data", data, *TINY]
    err = fails(["train", "--model", model, *common], f"--model {model} has no tokenizer files", capsys)
    assert "pass --tokenizer DIR" in err and "tokenizer.save_pretrained" in err, err
    fails(["train", "--tokenizer", tmp_path, *common], "--tokenizer is for --model", capsys)
    fails(["train", "--model", model, "--tokenizer", tmp_path / "nope", *common],
          f"--tokenizer {tmp_path / 'nope'}: no such directory", capsys)
    fails(["train", "--model", model, "--tokenizer", tmp_path, *common],
          f"--tokenizer {tmp_path}: no tokenizer files", capsys)
    assert not out.exists()
    wide = tmp_path / "wide"
    ByT5Tokenizer(extra_ids=300).save_pretrained(wide)  # 559 tokens for 500 embeddings
    fails(["train", "--model", model, "--tokenizer", wide, *common],
          f"the tokenizer in {wide} has 559 tokens, more than the model's 500 embeddings", capsys)
    assert not out.exists()

    tok = tmp_path / "tok"
    ByT5Tokenizer(extra_ids=0).save_pretrained(tok)
    assert main([str(a) for a in ["train", "--model", model, "--tokenizer", tok, "--steps", 1, *common]]) == 0
    capsys.readouterr()
    marker = json.loads((out / "checkpoint-1" / "prefixattn.json").read_text())
    assert marker["tokenizer"] == str(tok.resolve())  # a setting of the run: --resume takes it back
    fails(["train", "--out", out, "--resume", "--steps", 2, "--tokenizer", wide],
          f"--tokenizer {wide} (the run has {tok.resolve()})", capsys)
