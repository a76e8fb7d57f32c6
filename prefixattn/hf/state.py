"""What a patched model remembers: the ``PatchState`` (shared by the model, the module that runs the
layers and every attention module), and the names under which the patcher registers and stores it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..prefix import PrefixKV, SiteKey
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
    # the largest attention dropout the layers hand the attention function in training (patch()'s probe)
    attention_dropout: float = 0.0
    previous_impl: Any = None
    previous_requires_grad: dict[str, bool] = field(default_factory=dict)
    previous_keys_to_ignore_on_save: Any = None
    tagged_modules: list[nn.Module] = field(default_factory=list)
    plan: StepPlan | None = None  # the last step's plan (fallback when a layer does not pass kwargs on)
    capture: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None  # probing / init-from-text
    layer_modules: list[nn.Module] = field(default_factory=list)
    # layer -> the layer whose keys and values it attends over (KV sharing), found by the shape probe
    shared_kv: dict[int, int] = field(default_factory=dict)
    wrapped_prepare: bool = False
    # decoder layers whose attention reads its DynamicLayer's own tensors (probe.py): generate() on the
    # torch backend may keep their prefix in the cache (decode_cache.py)
    cache_layers: frozenset[int] = frozenset()

    # the first attention layer (the one whose KV cache length numbers positions): a site key
    first_layer: SiteKey = 0
    # encoders and encoder-decoders (sites.py): the model's kind, every module that runs a stack (each has
    # the pre-hook; ``base_model`` is the decoder's, or the encoder's), the position embeddings hooked
    # (positions.py), the attention modules tagged with a site, and the sites option ("decoder" | "all")
    kind: str = "causal"
    stack_owners: list[nn.Module] = field(default_factory=list)
    position_modules: list[nn.Module] = field(default_factory=list)
    site_modules: list[nn.Module] = field(default_factory=list)
    sites: str = ""
    # T5-style attention whose position bias counts the prefix in, or is zeros (position_bias.py)
    bias_modules: list[nn.Module] = field(default_factory=list)
    # (config, its attention implementation) of sub-configs that set_attn_implementation did not reach
    previous_config_impls: list[tuple[Any, Any]] = field(default_factory=list)
    # explicit position_ids get P added (PEFT's CAUSAL_LM); its encoder task types hand them on unchanged
    shift_explicit_positions: bool = True

    @property
    def num_tokens(self) -> int:
        return 0 if self.prefix is None else self.prefix.config.num_tokens

    @property
    def position_offset(self) -> int:
        """Where sequence positions start: P when the first attention layer carries a prefix, else 0.
        PEFT's rule: positions continue from the KV cache's length, which is layer 0's, and PEFT skips
        Gemma 4 layers larger than its adapter (a Gemma 4 whose first layer it skips numbers from 0)."""
        if self.prefix is None or self.prefix.slot(self.first_layer) is None:
            return 0
        return self.prefix.config.num_tokens


def get_state(model: nn.Module) -> PatchState | None:
    """The patch state of a model (or of its layer runner / attention modules), None when unpatched."""
    return model.__dict__.get(STATE_ATTR)
