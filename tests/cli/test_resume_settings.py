"""``--resume`` takes the run's settings from its checkpoint (prefixattn/cli/resume.py): what is left out comes
from the run, what is given again must agree except what may change, and each conflict is named."""

from __future__ import annotations

import os
from dataclasses import asdict

import pytest

from prefixattn.cli.resume import MAY_CHANGE, settings_for_resume
from prefixattn.cli.train import TrainConfig


def saved_run(**changes) -> dict:
    """The settings a checkpoint's marker holds (run_settings: paths absolute, the global batch)."""
    cfg = TrainConfig(out="runs/x", steps=40, batch_size=4, grad_accum=2, lr=0.05, prefix_tokens=8, seed=3,
                      eval_every=5, plot=False, backend="torch", **changes)
    model = os.path.abspath(cfg.model) if cfg.model else None
    return {**asdict(cfg), "model": model, "world_size": 1, "global_batch": cfg.batch_size * cfg.grad_accum,
            "step": 20}


def test_left_out_options_take_the_runs_values():
    saved = saved_run()
    cfg = settings_for_resume(TrainConfig(out="runs/x", resume=True), saved, {"out", "resume"}, "ckpt", 1)
    for name in ("steps", "batch_size", "grad_accum", "lr", "prefix_tokens", "seed", "eval_every", "plot", "backend"):
        assert getattr(cfg, name) == saved[name], name
    assert cfg.out == "runs/x" and cfg.resume


def test_options_that_may_change():
    saved = saved_run()
    given = TrainConfig(out="runs/x", resume=True, steps=80, eval_every=7, save_every=9, keep_checkpoints=5,
                        report_to="none", plot=True, backend="auto", device="cpu", gradient_checkpointing=True,
                        batch_size=2, grad_accum=4)  # the same global batch
    names = {"out", "resume", "steps", "eval_every", "save_every", "keep_checkpoints", "report_to", "plot",
             "backend", "device", "gradient_checkpointing", "batch_size", "grad_accum"}
    assert names - {"out", "resume"} == MAY_CHANGE
    cfg = settings_for_resume(given, saved, names, "ckpt", 1)
    for name in names:
        assert getattr(cfg, name) == getattr(given, name), name
    assert cfg.lr == 0.05


def test_conflicts_are_named_with_both_values():
    given = TrainConfig(out="runs/x", resume=True, lr=0.05, seed=4, prefix_tokens=8, packing=True, bf16=True)
    with pytest.raises(ValueError) as exc:
        settings_for_resume(given, saved_run(), {"out", "resume", "lr", "seed", "prefix_tokens", "packing", "bf16"},
                            "runs/x/checkpoint-20", 1)
    msg = str(exc.value)
    assert msg.startswith("--resume: these options disagree with the run in runs/x/checkpoint-20:")
    assert "--seed 4 (the run has 3)" in msg and "--packing on (the run has off)" in msg
    assert "--bf16 on (the run has off)" in msg
    assert "--lr" not in msg and "--prefix-tokens" not in msg  # given again, but the same
    assert "leave them out to keep the run's settings" in msg


def test_more_steps_under_a_decaying_schedule_are_refused():
    for schedule in ("linear", "cosine"):
        saved = saved_run(lr_schedule=schedule)
        with pytest.raises(ValueError, match=f"its {schedule} LR schedule decays to 0 at step 40"):
            settings_for_resume(TrainConfig(out="runs/x", resume=True, steps=80), saved, {"out", "resume", "steps"},
                                "ckpt", 1)
        # the same --steps given again is fine
        assert settings_for_resume(TrainConfig(out="runs/x", resume=True, steps=40), saved,
                                   {"out", "resume", "steps"}, "ckpt", 1).lr_schedule == schedule


def test_the_global_batch_must_stay_the_runs():
    saved = saved_run()  # 4 per process x 1 x 2 = 8
    with pytest.raises(ValueError, match=r"global batch 4 per process x 2 processes x 2 accumulation = 16 \(the run "
                                         r"has 8\): choose --batch-size and --grad-accum so the product is 8"):
        settings_for_resume(TrainConfig(out="runs/x", resume=True), saved, {"out", "resume"}, "ckpt", 2)
    cfg = settings_for_resume(TrainConfig(out="runs/x", resume=True, batch_size=2), saved,
                              {"out", "resume", "batch_size"}, "ckpt", 2)
    assert (cfg.batch_size, cfg.grad_accum) == (2, 2)


def test_paths_are_compared_as_absolute_paths(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    monkeypatch.chdir(tmp_path)
    saved = saved_run(model="model")  # saved absolute
    assert saved["model"] == str(tmp_path / "model")
    cfg = settings_for_resume(TrainConfig(out="runs/x", resume=True, model="./model"), saved,
                              {"out", "resume", "model"}, "ckpt", 1)
    assert os.path.abspath(cfg.model) == saved["model"]
    monkeypatch.chdir(tmp_path.parent)  # left out: the run's absolute path, from any directory
    assert settings_for_resume(TrainConfig(out="x", resume=True), saved, {"out", "resume"}, "c", 1).model == saved["model"]
    with pytest.raises(ValueError, match="--model /elsewhere"):
        settings_for_resume(TrainConfig(out="x", resume=True, model="/elsewhere"), saved, {"out", "resume", "model"},
                            "c", 1)


def test_in_python_the_fields_that_differ_from_the_defaults_count_as_given():
    with pytest.raises(ValueError, match=r"--seed 9 \(the run has 3\)"):
        settings_for_resume(TrainConfig(out="runs/x", resume=True, seed=9), saved_run(), None, "ckpt", 1)
    cfg = settings_for_resume(TrainConfig(out="runs/x", resume=True), saved_run(), None, "ckpt", 1)
    assert cfg.seed == 3 and cfg.lr == 0.05
