"""Gradient checkpointing (which PEFT prefix tuning refuses) gives the same prefix gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close_rel
from tiny_models import batch, labels_for, tiny_model

import prefixattn


def _enable_checkpointing(model, use_reentrant: bool) -> None:
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _grads(model, padding="left"):
    model.train()
    ids, mask = batch(padding=padding)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels_for(ids, mask)).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "family,projection,use_reentrant,backend",
    [
        ("llama", False, False, "torch"),
        ("llama", False, True, "torch"),
        ("gpt2", False, False, "torch"),
        ("qwen2", True, False, "torch"),
        ("gemma2", False, False, "triton"),
    ],
)
def test_checkpointing_gives_the_same_gradients(family, projection, use_reentrant, backend):
    base = tiny_model(family)
    torch.manual_seed(7)
    plain = prefixattn.patch(copy.deepcopy(base), num_prefix_tokens=3, prefix_projection=projection,
                             backend=backend)
    ckpt = copy.deepcopy(plain)
    _enable_checkpointing(ckpt, use_reentrant)
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in ckpt.modules())
    loss_a, grads_a = _grads(plain)
    loss_b, grads_b = _grads(ckpt)
    assert_close_rel(loss_b, loss_a, 1e-6, "loss")
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert_close_rel(grads_b[name], grads_a[name], 1e-5, name)


def test_reentrant_checkpointing_with_projection_is_refused():
    model = prefixattn.patch(tiny_model("qwen2"), num_prefix_tokens=3, prefix_projection=True, backend="torch")
    _enable_checkpointing(model, use_reentrant=True)
    with pytest.raises(ValueError, match="use_reentrant=False"):
        _grads(model)
