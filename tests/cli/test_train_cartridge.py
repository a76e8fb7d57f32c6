"""``prefixattn train --cartridge``: a cartridge initialised from a text file (--init-text) trains on the
Trainer, its frozen tokens are the frozen model's keys/values of the file's first tokens, bitwise, in every
checkpoint and at the end, its adapter is a CARTRIDGE adapter that PEFT loads with the same logits; the
demo initialises from the built-in corpus; contradictory options are refused before anything runs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import prefixattn
from prefixattn.cli import main
from prefixattn.hf import load_prefix_into

FAST = ["--backend", "torch", "--device", "cpu", "--report-to", "none", "--no-plot"]
CORPUS = "A cartridge is a KV cache trained offline on one corpus. " * 2

pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(argv: list, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cartridge_from_init_text_trains_keeps_its_frozen_tokens_and_loads_in_peft(tmp_path, capsys):
    import peft
    from transformers import AutoTokenizer, LlamaForCausalLM

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    out = tmp_path / "run"
    rc, printed, err = run_cli(["train", "--cartridge", "--frozen-tokens", 2, "--init-text", corpus,
                                "--prefix-tokens", 24, "--steps", 6, "--save-every", 3, "--eval-every", 3,
                                "--batch-size", 8, "--seq-len", 12, "--weight-decay", 0.1, "--out", out, *FAST],
                               capsys)
    assert rc == 0, err
    assert f"cartridge: P=24, 2 frozen, initialised from {corpus}" in printed

    # the frozen tokens: what the frozen model computes for the file's first 24 tokens, never trained
    tok = AutoTokenizer.from_pretrained(out / "base_model")
    fresh = prefixattn.patch(LlamaForCausalLM.from_pretrained(out / "base_model"), num_prefix_tokens=24,
                             cartridge=True, num_frozen_tokens=2, init="text", init_text=CORPUS, tokenizer=tok,
                             backend="torch")
    initial = fresh.prefixattn_prefix
    final = load_file(str(out / "prefix.safetensors"))
    assert torch.equal(final["frozen_kv"], initial.frozen_kv)
    assert not torch.equal(final["kv"], initial.kv.detach())
    ckpt = load_file(str(out / "checkpoint-3" / "model.safetensors"))
    assert torch.equal(ckpt["prefixattn_prefix.frozen_kv"], initial.frozen_kv)

    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["num_virtual_tokens"], cfg["num_frozen_tokens"]) == ("CARTRIDGE", 24, 2)
    ids = torch.tensor([tok.encode("abcdefghijklmnop", add_special_tokens=False)])
    peft_model = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(out / "base_model"),
                                                out / "adapter").eval()
    ours = load_prefix_into(LlamaForCausalLM.from_pretrained(out / "base_model"), out / "prefix.safetensors",
                            backend="torch").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, peft_model(input_ids=ids).logits, rtol=1e-4,
                                   atol=1e-4)

    # --resume keeps the run's kind: another frozen count is refused before anything runs
    rc, _, err = run_cli(["train", "--out", out, "--resume", "--steps", 9, "--frozen-tokens", 1, *FAST], capsys)
    assert rc == 2 and "--frozen-tokens 1 (the run has 2)" in err


def test_cartridge_demo_starts_from_the_built_in_corpus(tmp_path, capsys):
    rc, printed, err = run_cli(["train", "--cartridge", "--prefix-tokens", 16, "--steps", 1, "--eval-every", 1,
                                "--batch-size", 4, "--seq-len", 8, "--out", tmp_path / "run", *FAST], capsys)
    assert rc == 0, err
    assert "cartridge: P=16, 1 frozen, initialised from the built-in task's corpus" in printed


@pytest.mark.parametrize("argv,message", [
    (["--frozen-tokens", 1], "--frozen-tokens is a cartridge option: add --cartridge"),
    (["--cartridge", "--frozen-tokens", 5, "--prefix-tokens", 4], "--frozen-tokens must be in [0, --prefix-tokens 4 - 1]"),
    (["--cartridge", "--frozen-tokens", 4, "--prefix-tokens", 4], "(at least one token trains), got 4"),
    (["--cartridge", "--prefix-projection"], "--prefix-projection cannot be combined with --cartridge"),
    (["--init-text", "no/such/file.txt"], "--init-text no/such/file.txt: no such file"),
])
def test_cartridge_options_are_checked_first(tmp_path, capsys, argv, message):
    rc, _, err = run_cli(["train", *argv, "--out", tmp_path / "run", *FAST], capsys)
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()
