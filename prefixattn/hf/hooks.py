"""The forward pre-hook on the module that runs the decoder layers (an encoder-decoder: on its encoder
and on its decoder; an encoder: on the module around its layers): the per-step work.

Once per forward it checks the call (``prefix_ids`` for a bank, KV cache kind), numbers positions from
P the way PEFT does (packed rows: every document from P), builds the step plan (``plan.py``) and
passes it to every layer in the ``prefixattn_step`` keyword argument that decoder layers hand down to
their attention (so gradient checkpointing recomputes with the same plan); the plan is also kept on the
patch state as a fallback.

PEFT semantics: sequence positions start at P (explicit ``position_ids`` get P added, as PEFT does;
generate() derives them from the attention mask, so left padding works); OPT's mask-based positions
count P leading prefix slots. Encoders and decoders that number positions inside their position embedding
are shifted there (``positions.py``); an encoder's explicit ``position_ids`` are kept, as PEFT keeps them.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
import torch.nn as nn

from .adapters import active_prefix
from .decode_cache import held_prefix_layers, prefixed_cache_layers
from .plan import CAPTURE_PLAN, StepInputs, StepPlan, build_plan, check_prefix_ids, compute_dtype
from .positions import learned_position_limit
from .state import STATE_ATTR, STEP_KWARG, PatchState

# on a module running a stack: how it numbers positions from P. "owner": the pre-hook sets position_ids
# (decoder-only models; the default); "embedding": its position embedding's pre-hook does
# (``positions.py``); "none": positions stay as they are (an encoder-decoder's encoder: PEFT leaves it
# alone, and Li & Liang's BART did not shift it either)
POSITIONS_ATTR = "_prefixattn_owner_positions"
# on a module running a stack whose positions start at P: the rows of its learned position table
POSITION_LIMIT_ATTR = "_prefixattn_position_limit"
UNPREFIXED_ATTR = "_prefixattn_unprefixed"
# forward arguments that carry the batch, in the order they are looked for
_BATCH_INPUTS = ("input_ids", "inputs_embeds", "input_features", "input_values")


def _bind_to_kwargs(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    if not args:
        return dict(kwargs)
    sig = inspect.signature(module.forward)
    bound = sig.bind_partial(*args, **kwargs)
    out = {}
    for name, val in bound.arguments.items():
        param = sig.parameters[name]
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            out.update(val)
        elif param.kind is inspect.Parameter.VAR_POSITIONAL:
            if val:
                raise TypeError(f"{type(module).__name__}.forward got extra positional arguments")
        else:
            out[name] = val
    return out


# transformers 5.24 renamed the forward argument ``past_key_values`` to ``cache`` (the old names stay
# deprecated aliases until 5.40, renamed inside forward, i.e. after this hook): read every name
CACHE_KWARGS = ("cache", "past_key_values", "cache_params")


def cache_argument(kwargs: dict):
    """The KV cache a call passes, under whichever name the caller used (None without one)."""
    for name in CACHE_KWARGS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def _positions(state: PatchState, kwargs: dict, batch: int, length: int,
               device: torch.device) -> torch.Tensor:
    P = state.position_offset
    cache = cache_argument(kwargs)
    past = 0
    if cache is not None and hasattr(cache, "get_seq_length"):
        past = int(cache.get_seq_length())
    mask = kwargs.get("attention_mask")
    if state.family.positions == "mask_cumsum" and mask is not None and mask.dim() == 2:
        # OPT: positions = cumsum(mask) - 1 over [P prefix slots; mask], as with PEFT's prefixed mask
        mask = mask.to(device=device, dtype=torch.long)
        full = torch.cat([mask.new_ones(mask.shape[0], P), mask], dim=1)
        pos = full.cumsum(1) * full - 1
        return pos[:, -length:]
    return torch.arange(past + P, past + P + length, device=device).unsqueeze(0)


def _activation_dtype(state: PatchState, embeds: torch.Tensor | None) -> torch.dtype | None:
    if embeds is not None:
        return embeds.dtype
    weight = getattr(state.embeddings, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.dtype
    return None


def pre_hook(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook (with kwargs) on the module that runs the layers.

    A plain function that finds the state on the module (not a closure), so deep copies of a patched
    model carry their own state.
    """
    state: PatchState = module.__dict__[STATE_ATTR]
    kwargs = _bind_to_kwargs(module, args, kwargs)
    prefix_ids = kwargs.pop("prefix_ids", None)
    kwargs.pop(STEP_KWARG, None)
    cache = cache_argument(kwargs)
    if cache is not None and getattr(cache, "is_compileable", False):
        raise ValueError("prefixattn does not support static (compileable) KV caches; use the default "
                         "DynamicCache")
    if state.capture is not None:  # probing / init from text: the frozen model as is
        state.plan = CAPTURE_PLAN
        kwargs[STEP_KWARG] = CAPTURE_PLAN
        return (), kwargs
    if module.__dict__.get(UNPREFIXED_ATTR):  # a stack without a prefix: the model's own attention
        device = next((kwargs[n].device for n in _BATCH_INPUTS if kwargs.get(n) is not None), None)
        kwargs[STEP_KWARG] = StepPlan(
            autocast=device is not None and torch.is_autocast_enabled(device.type),
            output_attentions=bool(kwargs.get("output_attentions")))
        return (), kwargs

    # looked up every step: PEFT may have wrapped the prefix (modules_to_save) or merged it back
    state.prefix = active_prefix(state, module.training and torch.is_grad_enabled())
    embeds = kwargs.get("inputs_embeds")
    ref = next((kwargs[name] for name in _BATCH_INPUTS if kwargs.get(name) is not None), None)
    if ref is None:
        raise ValueError("prefixattn: the model was called without input_ids or inputs_embeds")
    batch, length = ref.shape[0], ref.shape[1]
    device = ref.device
    config = state.prefix.config
    if config.bank:
        if prefix_ids is None:
            raise ValueError(f"this model has a bank of {config.num_prefixes} prefixes: pass prefix_ids "
                             "(a (batch,) long tensor) to choose each row's prefix. With the Hugging Face "
                             "Trainer, set TrainingArguments(remove_unused_columns=False): by default it "
                             "drops every batch key that forward() does not name, prefix_ids included")
        check_prefix_ids(prefix_ids, batch)
    elif prefix_ids is not None:
        raise ValueError("prefix_ids was given but the model has a single prefix (patch with "
                         "num_prefixes=N for a bank)")

    user_mask = kwargs.get("attention_mask")
    if isinstance(user_mask, torch.Tensor) and user_mask.dim() != 2:
        raise ValueError("prefixattn takes a 2-D (batch, keys) attention mask; got a "
                         f"{user_mask.dim()}-D one (custom 4-D masks are not supported)")
    position_ids = kwargs.get("position_ids")
    inputs = StepInputs(batch=batch, length=length, device=device, prefix_ids=prefix_ids,
                        position_ids=position_ids, attention_mask=kwargs.get("attention_mask"),
                        has_cache=cache is not None, cu_seq_lens_q=kwargs.get("cu_seq_lens_q"),
                        cu_seq_lens_k=kwargs.get("cu_seq_lens_k"),
                        output_attentions=bool(kwargs.get("output_attentions")))
    mode = module.__dict__.get(POSITIONS_ATTR, "owner")
    if position_ids is None and module.__dict__.get(POSITION_LIMIT_ATTR):
        _check_position_limit(module, state, cache, length)
    if mode != "owner":
        pass  # the position embedding's hook shifts them, or they stay (an encoder-decoder's encoder)
    elif position_ids is not None:
        # as PEFT does for prefix tuning; packed rows: every document's positions start at P
        if state.shift_explicit_positions:
            kwargs["position_ids"] = position_ids + state.position_offset
    else:
        kwargs["position_ids"] = _positions(state, kwargs, batch, length, device)

    if config.projection and module.training and torch.is_grad_enabled():
        _refuse_reentrant_checkpointing(state)
    held = held_prefix_layers(cache) if state.kind == "causal" else {}
    if held and not torch.is_grad_enabled() and held.keys() >= state.prefix.layer_slot.keys():
        # a generate() step on the torch backend whose cache holds every layer's prefix: nothing to
        # compute or lay out (the bank's ids are still checked)
        plan = StepPlan(documents=inputs.documents(config), autocast=torch.is_autocast_enabled(device.type),
                        output_attentions=inputs.output_attentions, cached=held)
    else:
        plan = build_plan(state.prefix, inputs, compute_dtype(device, _activation_dtype(state, embeds)),
                          state.shared_kv)
        if state.kind == "causal":
            cached = prefixed_cache_layers(cache, plan.layers, state.backend, batch, state.cache_layers)
            if cached:
                plan = dataclasses.replace(plan, cached=cached)
    state.plan = plan
    kwargs[STEP_KWARG] = plan
    return (), kwargs


def _check_position_limit(module: nn.Module, state: PatchState, cache, length: int) -> None:
    """Positions start at P: an input whose last position falls off the stack's learned position table
    would raise a bare IndexError inside the embedding; refuse it naming the lengths."""
    P = state.position_offset
    limit = module.__dict__[POSITION_LIMIT_ATTR]
    past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
    if P and past + P + length > limit:
        cached = f" after {past} cached" if past else ""
        raise ValueError(f"prefixattn: {length} tokens{cached} do not fit {type(module).__name__}'s learned "
                         f"position table of {limit} positions once the prefix's {P} come first (positions "
                         f"start at P, as with PEFT): at most {limit - P - past} tokens")


def _refuse_reentrant_checkpointing(state: PatchState) -> None:
    """Reentrant checkpointing backpropagates each layer separately into the graph that made the step's
    prefix; with the MLP reparameterization that graph would be walked (and freed) once per layer."""
    for layer in state.layer_modules:
        if getattr(layer, "gradient_checkpointing", False):
            func = getattr(layer, "_gradient_checkpointing_func", None)
            if getattr(func, "keywords", {}).get("use_reentrant", False):
                raise ValueError(
                    "prefix_projection=True does not work with reentrant gradient checkpointing "
                    "(use_reentrant=True); enable checkpointing with use_reentrant=False "
                    "(transformers' default)"
                )


def add_pre_hook(module: nn.Module, positions: str = "owner", prefixed: bool = True) -> None:
    """``prefixed=False``: the stack carries no prefix (an encoder-decoder's encoder under PEFT's layout);
    its step plan holds none."""
    module.__dict__[POSITIONS_ATTR] = positions
    limit = learned_position_limit(module) if positions != "none" else None
    if limit is not None:
        module.__dict__[POSITION_LIMIT_ATTR] = limit
    if not prefixed:
        module.__dict__[UNPREFIXED_ATTR] = True
    module.register_forward_pre_hook(pre_hook, with_kwargs=True)


def remove_pre_hooks(module: nn.Module) -> None:
    for key, fn in list(module._forward_pre_hooks.items()):
        if fn is pre_hook:
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)
    module.__dict__.pop(POSITIONS_ATTR, None)
    module.__dict__.pop(POSITION_LIMIT_ATTR, None)
    module.__dict__.pop(UNPREFIXED_ATTR, None)
