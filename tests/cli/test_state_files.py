"""The Trainer's resume state without pickle (prefixattn/cli/state_files.py): round trips that restore
an optimizer, a scheduler and every random number generator exactly."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from prefixattn.cli.state_files import load_optimizer, load_rng_states, save_optimizer, save_rng_states


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1)


def test_optimizer_round_trip_continues_exactly(tmp_path):
    torch.manual_seed(0)
    w = [torch.randn(3, 4, requires_grad=True), torch.randn(5, requires_grad=True)]
    opt = _adamw(w)
    for _ in range(3):
        opt.zero_grad()
        (w[0].square().sum() + w[1].sin().sum()).backward()
        opt.step()
    save_optimizer(opt.state_dict(), tmp_path / "optimizer.safetensors")

    twin = [p.detach().clone().requires_grad_() for p in w]
    restored = _adamw(twin)
    restored.load_state_dict(load_optimizer(tmp_path / "optimizer.safetensors"))
    assert restored.param_groups[0]["betas"] == (0.8, 0.99)
    for o, params in ((opt, w), (restored, twin)):
        o.zero_grad()
        (params[0].square().sum() + params[1].sin().sum()).backward()
        o.step()
    for a, b in zip(w, twin, strict=True):
        assert torch.equal(a, b)


def test_rng_states_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    save_rng_states(tmp_path / "rng.safetensors")
    want = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    load_rng_states(tmp_path / "rng.safetensors")
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[0] == want[0] and got[1] == want[1] and torch.equal(got[2], want[2])


def test_a_foreign_file_is_refused(tmp_path):
    save_rng_states(tmp_path / "rng.safetensors")
    with pytest.raises(ValueError, match="not a prefixattn optimizer state file"):
        load_optimizer(tmp_path / "rng.safetensors")


def test_the_trainer_still_has_every_private_method_prefixattn_overrides(monkeypatch):
    """PrefixTrainer overrides private Trainer methods (no public hook writes the resume state without
    pickles); a transformers whose Trainer lost one is refused at construction, naming it, instead of
    leaving the override uncalled."""
    from transformers import Trainer

    from prefixattn.cli.trainer import PRIVATE_TRAINER_METHODS, PrefixTrainer

    for name in PRIVATE_TRAINER_METHODS:
        assert callable(getattr(Trainer, name, None)), name  # this transformers has them all
    monkeypatch.delattr(Trainer, "_save_scaler")
    with pytest.raises(ValueError, match="its Trainer has no _save_scaler, which prefixattn train overrides"):
        PrefixTrainer(model=None, run_info={})
