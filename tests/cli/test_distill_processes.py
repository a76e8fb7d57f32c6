"""``prefixattn distill`` under torchrun: 2 gloo processes write the self-study file one process writes
(byte for byte), and train, with the teacher reading the whole context's kept K/V at every step and the
LM loss mixed in, the prefix that 1 process trains with twice the batch; a resume on another number of
processes is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefixattn.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = ["--question-tokens", 4, "--answer-tokens", 6, "--prefix-tokens", 8, "--top-k", 4, "--backend", "torch",
          "--device", "cpu", "--no-plot"]
# one thread per process: two processes (and the other test worker) share the CPU cores
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def torchrun(*argv, processes: int = 2) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(processes), "-m", "prefixattn.cli", "distill", *map(str, argv)],
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def in_process(*argv) -> None:
    assert main(["distill", *map(str, argv)]) == 0


def prefix(out: Path) -> torch.Tensor:
    (t,) = load_file(str(out / "prefix.safetensors")).values()
    return t


def losses(out: Path, step: int) -> list[tuple[int, float]]:
    state = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return [(r["step"], r["loss"]) for r in state["log_history"] if "loss" in r]


def test_two_gloo_processes_distill_like_one_with_twice_the_batch(tmp_path, capsys):
    # self-study split over the processes: the same file as one process's
    generate = ["--generate-only", "--conversations", 12, "--batch-size", 2, *COMMON]
    proc = torchrun("--out", tmp_path / "gen2", *generate)
    assert "12 conversations from 2 processes merged" in proc.stdout
    in_process("--out", tmp_path / "gen1", *generate)
    written = (tmp_path / "gen1" / "selfstudy.jsonl").read_bytes()
    assert (tmp_path / "gen2" / "selfstudy.jsonl").read_bytes() == written
    assert not list((tmp_path / "gen2").glob("selfstudy.rank*"))

    # 10 conversations: 2 held out, 8 to train on, one global batch of 8 a step (1 x 8 or 2 x 4); answers
    # cut to different lengths (the recorded top-k with them), so that the processes' parts of a batch hold
    # different numbers of answer tokens
    records = [json.loads(line) for line in written.splitlines()[:10]]
    for i, r in enumerate(records):
        n = 1 + i % len(r["response_ids"])
        r.update(response_ids=r["response_ids"][:n], topk_ids=r["topk_ids"][:n], topk_logprobs=r["topk_logprobs"][:n])
    data = tmp_path / "ten.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    train = ["--data", data, "--live-teacher", "--lm-weight", 0.1, "--steps", 4, "--save-every", 2, "--lr", 0.05,
             *COMMON]
    two, one = tmp_path / "two", tmp_path / "one"
    proc = torchrun("--out", two, "--batch-size", 4, *train)
    assert "2 processes, batch 4 each" in proc.stdout
    assert proc.stdout.count("held-out (") == 1  # only process 0 reports
    in_process("--out", one, "--batch-size", 8, *train)
    capsys.readouterr()

    a, b = prefix(one), prefix(two)
    diff = (a - b).abs().max().item()
    print(f"1x8 vs 2x4 distilled prefix: max abs diff {diff:.3g}, max rel diff {diff / a.abs().max().item():.3g}")
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    # the loss of every step is the whole global batch's (the answer tokens of both processes)
    la, lb = losses(one, 4), losses(two, 4)
    assert [s for s, _ in la] == [s for s, _ in lb] == [1, 2, 3, 4]
    torch.testing.assert_close(torch.tensor([x for _, x in lb]), torch.tensor([x for _, x in la]), rtol=1e-5, atol=0)
    # the held-out figures, split over the processes, summed
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (one, two))
    assert ra["processes"] == 1 and rb["processes"] == 2
    for name in ("none", "initial", "trained"):
        assert rb["eval"][name]["tokens"] == ra["eval"][name]["tokens"] > 0
        assert rb["eval"][name]["agreement"] == ra["eval"][name]["agreement"]
        assert rb["eval"][name]["kl"] == pytest.approx(ra["eval"][name]["kl"], rel=1e-5)
    assert ra["eval"]["trained"]["kl"] < ra["eval"]["initial"]["kl"]  # not trivially equal: training moved it
    assert (two / "checkpoint-4" / "rng_state_1.safetensors").is_file()
    assert json.loads((two / "checkpoint-4" / "prefixattn.json").read_text())["processes"] == 2

    # its global batch was 2 x 4: one process may not resume it
    assert main(["distill", "--out", str(two), "--batch-size", "4", "--resume",
                 *map(str, [*train[:-len(COMMON)], "--steps", 6, *COMMON])]) == 2
    assert "trained on 2 process(es), this is 1" in capsys.readouterr().err
