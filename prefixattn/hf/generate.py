"""``generate()`` with a bank: letting ``prefix_ids`` through to every decoding step.

generate() validates its kwargs against ``prepare_inputs_for_generation``'s signature, so the patcher
sets an instance attribute (removed by unpatch) that adds a ``prefix_ids`` parameter; generate then
expands the ids with the batch (beams, num_return_sequences) and forwards them at every step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

_ATTR = "prepare_inputs_for_generation"


class PrepareInputsWithPrefixIds:
    """The wrapper; it holds the model (not a bound method) so that deep copies of the model get their
    own."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, *args: Any, prefix_ids: torch.Tensor | None = None, **kwargs: Any) -> dict:
        inputs = type(self.model).prepare_inputs_for_generation(self.model, *args, **kwargs)
        if prefix_ids is not None:
            inputs["prefix_ids"] = prefix_ids
        return inputs


def wrap_prepare_inputs(model: nn.Module) -> bool:
    """Install the wrapper on ``model``; False when the model cannot generate (nothing to wrap)."""
    if getattr(type(model), _ATTR, None) is None:
        return False
    model.__dict__[_ATTR] = PrepareInputsWithPrefixIds(model)
    return True


def unwrap_prepare_inputs(model: nn.Module) -> None:
    model.__dict__.pop(_ATTR, None)
