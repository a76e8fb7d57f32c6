"""``prefixattn train --model DIR`` with an encoder-decoder (``{"prompt", "completion"}`` lines: the prompt
is the encoder's input, the completion the decoder's target) and with a sequence classifier (``{"text",
"label"}`` lines): the run learns, evaluates, writes checkpoints and a PEFT adapter that PEFT loads (the
classifier's with its trained head), and resumes to the prefix (and head) of an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_encdec import restore_old_cache_name
from transformers import ByT5Tokenizer

from prefixattn.cli import main

FAST = ["--backend", "torch", "--device", "cpu", "--report-to", "none", "--no-plot", "--prefix-tokens", 4]

pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(argv: list, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _bart_dir(path: Path) -> Path:
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(3)  # vocab 300: the byte tokenizer's 259 ids fit; it is saved as the model's own
    BartForConditionalGeneration(BartConfig(
        vocab_size=300, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=128,
        init_std=0.1, pad_token_id=0, bos_token_id=None, eos_token_id=1, decoder_start_token_id=1,
        forced_eos_token_id=None)).save_pretrained(path)
    ByT5Tokenizer(extra_ids=0).save_pretrained(path)
    return path


def _bert_dir(path: Path) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(3)
    BertForSequenceClassification(BertConfig(
        vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
        max_position_embeddings=128, pad_token_id=0, initializer_range=0.2, id2label={0: "neg", 1: "pos"},
        label2id={"neg": 0, "pos": 1})).save_pretrained(path)
    ByT5Tokenizer(extra_ids=0).save_pretrained(path)
    return path


def _evals(out: Path) -> list[dict]:
    return [r for r in json.loads((out / "run.json").read_text())["log_history"] if "eval_loss" in r]


def test_encoder_decoder_learns_checkpoints_and_writes_a_seq2seq_adapter(tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    model_dir = _bart_dir(tmp_path / "bart")
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"item {i}", "completion": "ok"}) for i in range(40)) + "\n")
    out = tmp_path / "run"
    rc, printed, err = run_cli(["train", "--model", model_dir, "--data", data, "--out", out, "--steps", 20,
                                "--batch-size", 8, "--lr", 0.3, "--eval-every", 10, "--save-every", 10, *FAST,
                                "--prefix-tokens", 8], capsys)
    assert rc == 0, err
    assert "an encoder-decoder" in printed
    evals = _evals(out)
    assert evals[-1]["eval_loss"] < 0.7 * evals[0]["eval_loss"] and evals[-1]["eval_accuracy"] > 0.9, evals
    assert (out / "checkpoint-20" / "prefixattn.json").is_file()
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_2_SEQ_LM" and adapter["num_transformer_submodules"] == 2
    peft = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(model_dir), out / "adapter")
    ids = torch.tensor([[5, 6, 7]])
    labels = torch.tensor([[ord("o") + 3, ord("k") + 3, 1]])
    with torch.no_grad():
        assert peft(input_ids=ids, labels=labels).loss < 0.7 * evals[0]["eval_loss"]


def test_sequence_classifier_learns_resumes_and_writes_its_head(tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    model_dir = _bert_dir(tmp_path / "bert")
    data = tmp_path / "labelled.jsonl"
    # labels by name or by id; the held-out last 10% hold both
    rows = [{"text": ("a" if i % 2 else "z") * (2 + i % 5), "label": "pos" if i % 2 else 0} for i in range(40)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    common = ["--model", model_dir, "--data", data, "--batch-size", 8, "--lr", 0.05, "--eval-every", 4,
              "--save-every", 4, "--seed", 1, "--ignore-attention-dropout", *FAST]
    straight = tmp_path / "straight"
    rc, printed, err = run_cli(["train", "--out", straight, "--steps", 8, *common], capsys)
    assert rc == 0, err
    assert "a sequence classifier" in printed
    evals = _evals(straight)
    assert evals[-1]["eval_loss"] < 0.3 * evals[0]["eval_loss"] and evals[-1]["eval_accuracy"] == 1.0, evals
    resumed = tmp_path / "resumed"
    assert run_cli(["train", "--out", resumed, "--steps", 4, *common], capsys)[0] == 0
    rc, printed, err = run_cli(["train", "--out", resumed, "--resume", "--steps", 8], capsys)
    assert rc == 0 and "resuming from" in printed, err
    a, b = load_file(str(straight / "prefix.safetensors")), load_file(str(resumed / "prefix.safetensors"))
    assert set(a) == {"kv", "head.classifier.weight", "head.classifier.bias"}
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    adapter = json.loads((straight / "adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS"
    base = AutoModelForSequenceClassification.from_pretrained(model_dir)
    restore_old_cache_name(base)  # PEFT's SEQ_CLS looks for past_key_values (named cache on >= 5.24)
    peft = PeftModel.from_pretrained(base, straight / "adapter")
    trained = peft.get_base_model().classifier.modules_to_save["default"].weight
    torch.testing.assert_close(trained.detach(), a["head.classifier.weight"])


def test_wrong_lines_and_options_for_these_kinds(tmp_path, capsys):
    bert, bart = _bert_dir(tmp_path / "bert"), _bart_dir(tmp_path / "bart")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x", "label": "maybe"}) + "\n" + json.dumps({"text": "y", "label": 1}) + "\n")
    rc, _, err = run_cli(["train", "--model", bert, "--data", bad, "--out", tmp_path / "a", *FAST], capsys)
    assert rc != 0 and "bad.jsonl:1: label 'maybe' is not one of the model's 2 labels" in err
    rc, _, err = run_cli(["train", "--model", bart, "--data", bad, "--out", tmp_path / "b", *FAST], capsys)
    assert rc != 0 and "bad.jsonl:1: missing field 'prompt'" in err
    rc, _, err = run_cli(["train", "--model", bart, "--out", tmp_path / "c", *FAST], capsys)
    assert rc != 0 and "encoder-decoder: pass --data" in err
    # BERT's default attention dropout (0.1): refused at the start, before the step-0 evaluation, naming
    # the command's own flag; nothing written
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps({"text": "ab" * (1 + i % 3), "label": i % 2}) for i in range(4)) + "\n")
    rc, printed, err = run_cli(["train", "--model", bert, "--data", good, "--out", tmp_path / "d", *FAST], capsys)
    assert rc == 2 and f"--model {bert} has attention dropout 0.1 in training" in err, err
    assert "pass --ignore-attention-dropout" in err and "ignore_attention_dropout=True" not in err, err
    assert "eval loss" not in printed + err and not (tmp_path / "d").exists()
