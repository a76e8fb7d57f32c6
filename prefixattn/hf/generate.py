"""``generate()`` with a bank: letting ``prefix_ids`` through to every decoding step.

generate() validates its kwargs against ``prepare_inputs_for_generation``'s signature, so the patcher
sets an instance attribute (removed by unpatch) that adds a ``prefix_ids`` parameter; generate then
expands the ids with the batch (beams, num_return_sequences) and forwards them at every step.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn

_ATTR = "prepare_inputs_for_generation"


class PrepareInputsWithPrefixIds:
    """The wrapper; it holds the model (not a bound method) so that deep copies of the model get their
    own."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        # generate() reads this signature (which inputs the model forwards: inputs_embeds, ...): the
        # model's own, plus prefix_ids
        own = inspect.signature(type(model).prepare_inputs_for_generation)
        params = [p for name, p in own.parameters.items() if name != "self"]
        extra = inspect.Parameter("prefix_ids", inspect.Parameter.KEYWORD_ONLY, default=None)
        where = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD),
                     len(params))
        self.__signature__ = own.replace(parameters=[*params[:where], extra, *params[where:]])

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
