"""``prefixattn train`` as separate processes: 2 data-parallel gloo processes under torchrun train the
prefix of 1 process with twice the batch; a run killed with SIGKILL and resumed (``--out DIR --resume``,
nothing else) ends with exactly the prefix of an uninterrupted run (a half-written checkpoint is ignored)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefixattn.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--backend", "torch", "--device", "cpu", "--report-to", "none", "--no-plot"]
TINY = ["--seq-len", 12, "--prefix-tokens", 4, *FAST]
# one thread per process: two processes (and the other test worker) share the CPU cores
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def cli(*argv) -> list[str]:
    return [sys.executable, "-m", "prefixattn.cli", *map(str, argv)]


def prefix(out: Path) -> torch.Tensor:
    (t,) = load_file(str(out / "prefix.safetensors")).values()
    return t


def train_losses(out: Path) -> list[tuple[int, float]]:
    doc = json.loads((out / "run.json").read_text())
    return [(r["step"], r["loss"]) for r in doc["log_history"] if "loss" in r]


def test_two_gloo_processes_train_like_one_with_twice_the_batch(tmp_path, capsys):
    common = ["--steps", 6, "--eval-every", 3, "--save-every", 3, "--lr", 0.05, *TINY]
    two = tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "prefixattn.cli", "train", *map(str, ["--out", two, "--batch-size", 4, *common])],
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "x 2 processes" in proc.stdout and "batch 4 per process x 2 x 1 accumulation = 8" in proc.stdout
    assert proc.stdout.count("done: eval loss") == 1  # only the main process reports
    one = tmp_path / "one"
    assert main([str(a) for a in ["train", "--out", one, "--batch-size", 8, *common]]) == 0
    capsys.readouterr()

    a, b = prefix(one), prefix(two)
    diff = (a - b).abs().max().item()
    print(f"1x8 vs 2x4 final prefix: max abs diff {diff:.3g}, max rel diff {diff / a.abs().max().item():.3g}")
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    # the same global batches: the same loss at every step
    (la, lb) = train_losses(one), train_losses(two)
    assert [s for s, _ in la] == [s for s, _ in lb] == list(range(1, 7))
    torch.testing.assert_close(torch.tensor([x for _, x in lb]), torch.tensor([x for _, x in la]), rtol=1e-5, atol=0)
    # each process saved its RNG state in the checkpoint; the marker came after both
    ckpt = two / "checkpoint-6"
    assert (ckpt / "rng_state_0.safetensors").is_file() and (ckpt / "rng_state_1.safetensors").is_file()
    assert json.loads((ckpt / "prefixattn.json").read_text())["world_size"] == 2
    # not trivially equal: steps 4 to 6 moved the prefix
    (at_three,) = load_file(str(two / "checkpoint-3" / "model.safetensors")).values()
    assert (at_three - a).abs().max() > 1e-3


def test_sigkill_then_resume_ends_like_an_uninterrupted_run(tmp_path, capsys):
    steps = 30
    common = ["--steps", steps, "--batch-size", 8, "--eval-every", 25, "--save-every", 2, "--lr", 0.05,
              "--lr-schedule", "linear", "--warmup", 3, *TINY]
    a = tmp_path / "killed"
    victim = subprocess.Popen(cli("train", "--out", a, *common), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=ENV)
    try:
        deadline = time.monotonic() + 240
        while not list(a.glob("checkpoint-*/prefixattn.json")):
            assert victim.poll() is None, "the run ended before a checkpoint appeared"
            assert time.monotonic() < deadline, "no checkpoint after 240 s"
            time.sleep(0.005)
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(timeout=60) == -signal.SIGKILL
    finally:
        if victim.poll() is None:
            victim.kill()
    assert not (a / "run.json").exists()  # it really died mid-run
    done = sorted(int(p.parent.name.split("-")[1]) for p in a.glob("checkpoint-*/prefixattn.json"))
    assert done and done[-1] < steps
    # what a kill in the middle of writing a checkpoint leaves: a folder without the marker
    half = a / f"checkpoint-{done[-1] + 30}"
    if not half.exists():
        shutil.copytree(a / f"checkpoint-{done[-1]}", half)
        (half / "prefixattn.json").unlink()
        (half / "model.safetensors").write_bytes(b"\0" * 16)  # torn write

    # as the README says: the run's settings come from its checkpoint, not from repeating every option
    resumed = subprocess.run(cli("train", "--out", a, "--resume"), capture_output=True, text=True,
                             timeout=300, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"(step {done[-1]})" in resumed.stdout
    assert not half.exists()  # removed, not loaded

    b = tmp_path / "straight"
    assert main([str(x) for x in ["train", "--out", b, *common]]) == 0
    capsys.readouterr()
    pa, pb = prefix(a), prefix(b)
    torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)
    la, lb = train_losses(a), train_losses(b)
    assert [s for s, _ in la] == list(range(1, steps + 1))  # every step once, in order
    torch.testing.assert_close(torch.tensor([x for _, x in la]), torch.tensor([x for _, x in lb]), rtol=1e-6, atol=0)
