"""The ``prefixattn`` command: info, train (loss falls, PEFT-format checkpoint, loss plot,
resume equal to an uninterrupted run, JSONL data) and clear errors for bad arguments. Called
in-process through ``prefixattn.cli.main``, and once through the installed console script."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import prefixattn
from prefixattn.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# small, fast settings of the embedded job; the torch backend (the kernels have their own tests,
# and under the Triton interpreter a training step takes seconds)
FAST = ["--backend", "torch", "--device", "cpu"]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def state(out: Path) -> dict:
    return json.loads((out / "checkpoint" / "state.json").read_text())


# ---------------------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------------------


def test_info_prints_versions_and_backends(capsys):
    rc, out, _ = run_cli(["info"], capsys)
    assert rc == 0
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


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------


def test_train_loss_falls_and_writes_peft_checkpoint_and_plot(tmp_path, capsys):
    out = tmp_path / "run"
    rc, printed, _ = run_cli(["train", "--out", out, "--steps", 30, "--eval-every", 15, "--batch-size", 16,
                              "--seq-len", 24, "--prefix-tokens", 8, *FAST], capsys)
    assert rc == 0
    st = state(out)
    assert st["step"] == 30
    evals = st["history"]["eval"]
    assert [e[0] for e in evals] == [0, 15, 30]
    (_, loss0, acc0), (_, loss1, acc1) = evals[0], evals[-1]
    assert loss1 < 0.7 * loss0, evals
    assert acc1 > acc0 + 0.15, evals
    train_losses = [r[1] for r in st["history"]["train"]]
    assert [r[0] for r in st["history"]["train"]] == list(range(1, 31))
    assert sum(train_losses[-5:]) < 0.8 * sum(train_losses[:5])
    assert "done: eval loss" in printed

    png = (out / "loss.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 5000

    # the adapter is in PEFT's format and PEFT loads it: same eval loss as the run's last eval
    adapter = out / "checkpoint" / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PREFIX_TUNING" and cfg["num_virtual_tokens"] == 8
    assert cfg["num_layers"] == 2 and cfg["num_attention_heads"] == 2 and cfg["token_dim"] == 2 * 16
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    assert set(tensors) == {"prompt_embeddings"}
    assert tensors["prompt_embeddings"].shape == (8, 2 * 2 * 2 * 16)  # (P, L * 2 * Hkv * D)

    import peft
    from transformers import LlamaForCausalLM

    from prefixattn.tasks import SuccessorTask
    from prefixattn.train import TrainConfig, evaluate

    base = LlamaForCausalLM.from_pretrained(out / "base_model")
    base.set_attn_implementation("sdpa")
    model = peft.PeftModel.from_pretrained(base, adapter)
    tc = TrainConfig(batch_size=16, seq_len=24)
    task = SuccessorTask(seed=0, seq_len=24)
    peft_loss, peft_acc = evaluate(model, task, tc, torch.device("cpu"))
    assert peft_loss == pytest.approx(loss1, rel=1e-4)
    assert peft_acc == pytest.approx(acc1, abs=1e-6)


def test_resume_continues_like_an_uninterrupted_run(tmp_path, capsys):
    common = ["--batch-size", 8, "--seq-len", 16, "--prefix-tokens", 4, "--eval-every", 100,
              "--save-every", 100, "--no-plot", "--lr", 0.05, *FAST]
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli(["train", "--out", a, "--steps", 5, *common], capsys)[0] == 0
    half = load_file(str(a / "checkpoint" / "prefix.safetensors"))
    rc, printed, _ = run_cli(["train", "--out", a, "--steps", 10, "--resume", *common], capsys)
    assert rc == 0
    assert "at step 5" in printed
    assert run_cli(["train", "--out", b, "--steps", 10, *common], capsys)[0] == 0

    sa, sb = state(a), state(b)
    assert sa["step"] == sb["step"] == 10
    # the resumed run started at step 6: each step once, in order, with the uninterrupted run's losses
    assert [r[0] for r in sa["history"]["train"]] == list(range(1, 11))
    la = torch.tensor([r[1] for r in sa["history"]["train"]])
    lb = torch.tensor([r[1] for r in sb["history"]["train"]])
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-7)

    for name in ("prefix.safetensors", "optimizer.safetensors"):
        ta, tb = load_file(str(a / "checkpoint" / name)), load_file(str(b / "checkpoint" / name))
        assert set(ta) == set(tb) and len(ta) > 0
        for key in ta:
            torch.testing.assert_close(ta[key], tb[key], rtol=1e-6, atol=1e-7, msg=f"{name}:{key}")
    # not trivially equal: steps 6..10 moved the prefix
    final = load_file(str(a / "checkpoint" / "prefix.safetensors"))
    assert any((final[k] - half[k]).abs().max() > 1e-3 for k in final)


def test_train_on_jsonl_data(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": f"{i} + {i} =", "completion": f" {2 * i}"} for i in range(9)] + [{"text": "hello world"}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "run"
    rc, printed, err = run_cli(["train", "--data", data, "--out", out, "--steps", 2, "--batch-size", 4,
                                "--no-plot", *FAST], capsys)
    assert rc == 0, err
    assert "9 train / 1 eval examples" in printed
    assert state(out)["step"] == 2

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    rc, _, err = run_cli(["train", "--data", bad, "--out", tmp_path / "r2", *FAST], capsys)
    assert rc == 2 and f"{bad}:2: not valid JSON" in err
    bad.write_text('{"text": "fine"}\n{"question": "no"}\n')
    rc, _, err = run_cli(["train", "--data", bad, "--out", tmp_path / "r3", *FAST], capsys)
    assert rc == 2 and "each line must be" in err


# ---------------------------------------------------------------------------------------------
# bad arguments: one clear line, exit status 2, nothing half-done
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,message", [
    (["train", "--steps", "0"], "--steps: must be positive"),
    (["train", "--lr", "-1"], "--lr: must be positive"),
    (["train", "--batch-size", "two"], "expected an integer, got 'two'"),
    (["train", "--dtype", "float64"], "invalid choice"),
    (["frobnicate"], "invalid choice"),
    (["bench"], "invalid choice"),  # benchmarks are python -m bench, a development tool
    ([], "required"),
])
def test_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_settings_give_clear_errors(tmp_path, capsys):
    out = tmp_path / "run"

    def fails(argv: list, message: str) -> None:
        rc, _, err = run_cli(argv, capsys)
        assert rc == 2, (argv, err)
        assert message in err, (message, err)
        assert "Traceback" not in err

    fails(["train", "--out", out, "--device", "gpu9", *FAST[:2]], "'gpu9' is not a torch device")
    fails(["train", "--out", out, "--model", tmp_path / "nope", *FAST], "not a local Hugging Face model directory")
    fails(["train", "--out", out, "--data", tmp_path / "missing.jsonl", *FAST], "no such file")
    fails(["train", "--out", out, "--resume", *FAST], "no checkpoint in")
    if not torch.cuda.is_available():
        fails(["train", "--out", out, "--device", "cuda", "--backend", "torch"], "no CUDA device")

    tiny = ["--batch-size", 2, "--seq-len", 8, "--prefix-tokens", 2, "--no-plot", *FAST]
    assert run_cli(["train", "--out", out, "--steps", 2, *tiny], capsys)[0] == 0
    fails(["train", "--out", out, "--steps", 4, *tiny], "already holds a checkpoint")
    fails(["train", "--out", out, "--steps", 4, "--resume", "--overwrite", *tiny], "contradict")
    fails(["train", "--out", out, "--steps", 1, "--resume", *tiny], "already at step 2, past --steps 1")
    fails(["train", "--out", out, "--steps", 4, "--resume", "--lr", 0.5, *tiny],
          "cannot resume with different settings")
    assert state(out)["step"] == 2  # the refused runs left the checkpoint alone

    # --overwrite starts again and deletes only what a run writes
    (out / "notes.txt").write_text("keep me")
    assert run_cli(["train", "--out", out, "--steps", 1, "--overwrite", *tiny], capsys)[0] == 0
    assert state(out)["step"] == 1
    assert (out / "notes.txt").read_text() == "keep me"
