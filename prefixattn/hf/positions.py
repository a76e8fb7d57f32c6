"""Numbering an encoder's or a decoder's positions from P inside its own position embedding.

PEFT hands its prefix over as a KV cache of length P, so a model numbers the sequence from the cache's
length: BERT ``arange + P``, RoBERTa / XLM-R ``padding_idx + (cumsum(mask) + P) * mask``, BART's decoder
``arange + P`` (+ its offset of 2), M2M100's sinusoidal positions from its padding rule. These modules
compute positions in their position embedding from a ``cache_length`` argument (``past_key_values_length``
before transformers 5.24), and the module running the stack takes no ``position_ids`` (BART's decoder) or
hands them on unset (BERT). A forward pre-hook on that embedding adds P to the length it is given, so each
family's own rule gives PEFT's positions, whatever the rule is. Where the stack computes position ids
from the cache length itself and passes them in (BART's, Whisper's decoders), it adds P to those.

Explicit ``position_ids`` from the caller of an encoder stay as they are: PEFT's SEQ_CLS, TOKEN_CLS and
QUESTION_ANS models hand them to the backbone unchanged.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Literal

import torch.nn as nn

from .state import STATE_ATTR, PatchState

CACHE_LENGTH_NAMES = ("cache_length", "past_key_values_length")
# on the position embedding: "decoder" (the stack's own position ids count from the cache length: shift
# them too) or "encoder" (position ids given to it come from the caller: keep them)
MODE_ATTR = "_prefixattn_positions"
PositionKind = Literal["encoder", "decoder"]


def cache_length_parameter(module: nn.Module) -> str | None:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return None
    return next((name for name in CACHE_LENGTH_NAMES if name in params), None)


def find_position_embedding(owner: nn.Module, layers: Iterable[nn.Module]) -> nn.Module | None:
    """The module under ``owner`` (outside the stack of layers) that numbers positions from a cache
    length, or None."""
    inside = {id(m) for layer in layers for m in layer.modules()}
    for module in owner.modules():
        if module is owner or id(module) in inside:
            continue
        if cache_length_parameter(module) is not None:
            return module
    return None


def _bind(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    bound = inspect.signature(module.forward).bind_partial(*args, **kwargs)
    out = {}
    for name, value in bound.arguments.items():
        if inspect.signature(module.forward).parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


def position_pre_hook(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook on a position embedding: count from P (see the module docstring)."""
    state: PatchState = module.__dict__[STATE_ATTR]
    offset = state.position_offset
    if state.capture is not None or not offset:
        return None
    kwargs = _bind(module, args, kwargs)
    if kwargs.get("position_ids") is not None:
        if module.__dict__[MODE_ATTR] == "decoder":
            kwargs["position_ids"] = kwargs["position_ids"] + offset
        return (), kwargs
    name = cache_length_parameter(module)
    kwargs[name] = (kwargs.get(name) or 0) + offset
    return (), kwargs


def hook_position_embedding(module: nn.Module, state: PatchState, kind: PositionKind) -> None:
    module.__dict__[STATE_ATTR] = state
    module.__dict__[MODE_ATTR] = kind
    module.register_forward_pre_hook(position_pre_hook, with_kwargs=True)


def unhook_position_embedding(module: nn.Module) -> None:
    for key, fn in list(module._forward_pre_hooks.items()):
        if fn is position_pre_hook:
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)
    module.__dict__.pop(STATE_ATTR, None)
    module.__dict__.pop(MODE_ATTR, None)


def learned_position_limit(owner: nn.Module) -> int | None:
    """How many positions the learned absolute position table of the stack ``owner`` runs holds (GPT-2's
    ``wpe``, OPT's and BART's tables with their offset of 2, BERT's ``position_embeddings``, the fixed
    sinusoidal tables of Marian and Pegasus): the config's ``max_position_embeddings``, when an embedding
    outside the layers has that many rows (or 1-2 more, the offset). None: no such table (rotary, ALiBi,
    relative or growing sinusoidal positions), where a longer input raises no IndexError."""
    config = getattr(owner, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text, "max_position_embeddings", None)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        return None
    inputs = owner.get_input_embeddings() if hasattr(owner, "get_input_embeddings") else None
    in_layers: list[str] = []
    for name, module in owner.named_modules():
        if any(name.startswith(prefix) for prefix in in_layers):
            continue
        if isinstance(module, nn.ModuleList):
            in_layers.append(name + ".")
        elif (isinstance(module, nn.Embedding) and module is not inputs
              and module.num_embeddings - limit in (0, 1, 2)):
            return limit
    return None
