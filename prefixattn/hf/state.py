"""What a patched model remembers: the ``PatchState`` (shared by the model, the module that runs the
layers and every attention module), and the names under which the patcher registers and stores it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..prefix import PrefixKV
from .families import Family
from .plan import StepPlan

IMPL_NAME = "prefixattn"  # the AttentionInterface / AttentionMaskInterface name
STEP_KWARG = "prefixattn_step"  # the keyword that carries the step plan from the pre-hook to every layer
STATE_ATTR = "_prefixattn_state"


@dataclass
class PatchState:
    family: Family
    backend: str
    base_model: nn.Module  # the module that runs the layers (its pre-hook builds the step plan)
    owner: nn.Module | None = None  # the patched model: it holds the prefix module (or PEFT's wrapper)
    embeddings: nn.Module | None = None  # the input embeddings: their dtype is the activations' dtype
    prefix: PrefixKV | None = None
    ignore_attention_dropout: bool = False
    previous_impl: Any = None
    previous_requires_grad: dict[str, bool] = field(default_factory=dict)
    previous_keys_to_ignore_on_save: Any = None
    tagged_modules: list[nn.Module] = field(default_factory=list)
    plan: StepPlan | None = None  # the last step's plan (fallback when a layer does not pass kwargs on)
    capture: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None  # probing / init-from-text
    layer_modules: list[nn.Module] = field(default_factory=list)
    seen_step_kwarg: bool = False
    wrapped_prepare: bool = False

    @property
    def num_tokens(self) -> int:
        return 0 if self.prefix is None else self.prefix.config.num_tokens


def get_state(model: nn.Module) -> PatchState | None:
    """The patch state of a model (or of its layer runner / attention modules), None when unpatched."""
    return model.__dict__.get(STATE_ATTR)
