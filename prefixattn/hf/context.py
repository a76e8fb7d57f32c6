"""A context read once: its keys and values kept as a frozen prefix (the teacher of context distillation).

``prefill_context(model, ids)`` runs the frozen model over a context of C tokens (in chunks, positions
0..C-1, under ``torch.no_grad``) and keeps every attention layer's keys and values: a ``ContextKV``, laid
out as a prefix of C tokens, (L, 2, 1, Hkv, C, D), the keys rotated at their positions as a KV cache holds
them. ``reading_context(model, context)`` makes a patched model read that K/V as its prefix: positions of
the conversation continue at C (the patcher numbers positions from the prefix length, PEFT's rule), so

    model(conversation) inside reading_context  ==  the frozen model on [context; conversation]

(tested in float64 against the plain model and PEFT's prefix-as-cache). The context is never re-read:
every teacher pass is prefix attention over the kept K/V, no gradient buffers. ``running_bare(model)``
runs a patched model as the frozen model without any prefix (the "no context" baseline).

Where the two would differ, the teacher refuses: a layer whose cache keeps fewer than C tokens (a
sliding window shorter than the context: the prefix stays visible to every query, the plain model's
window would drop it), or a context plus conversation longer than the model's positions.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..prefix import MODULE_NAME, PrefixConfig, PrefixKV
from .probe import input_device
from .state import PatchState, get_state

DEFAULT_CHUNK = 512


@dataclass(frozen=True)
class ContextKV:
    """A prefilled context: ``kv`` (L, 2, 1, Hkv, C, D) in the model's dtype, the layout ``PrefixKV``
    computes (layers smaller than the stored shape fill the leading heads and dims, the rest is zero),
    ``config`` the prefix config of that layout (``num_tokens`` = C, every attention layer that computes
    its own keys and values), ``input_ids`` the context's C token ids."""

    kv: torch.Tensor
    config: PrefixConfig
    input_ids: torch.Tensor
    window: int | None = None  # the smallest sliding window of the model's layers (None: none)
    _module: list[PrefixKV] = field(default_factory=list, repr=False, compare=False)

    @property
    def length(self) -> int:
        return self.config.num_tokens

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's keys (Hkv, C, Dk) and values (Hkv, C, Dv), views."""
        slot = self.config.layers.index(layer)
        return self.prefix_module().layer_views(self.kv, slot)

    def prefix_module(self) -> PrefixKV:
        """A frozen ``PrefixKV`` whose values ARE ``kv`` (no copy; built once)."""
        if not self._module:
            module = PrefixKV(self.config, dtype=self.kv.dtype, device="meta", init="zeros")
            module.kv = nn.Parameter(self.kv, requires_grad=False)
            self._module.append(module)
        return self._module[0]


def _state(model: nn.Module) -> tuple[nn.Module, PatchState]:
    candidates = [model]
    get_base = getattr(type(model), "get_base_model", None)
    if callable(get_base):
        candidates.append(model.get_base_model())
    for m in candidates:
        state = get_state(m)
        if state is not None:
            if state.kind != "causal":
                raise ValueError("a context is read by causal LMs; this model is an encoder or an "
                                 "encoder-decoder")
            return m, state
    raise TypeError(f"{type(model).__name__} is not patched by prefixattn.patch (patch it first: the "
                    "teacher reads the context through the patched attention)")


def max_positions(model: nn.Module) -> int | None:
    """The model's position limit (``max_position_embeddings`` / ``n_positions``), None when it has none."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context_ids(model: nn.Module, input_ids: Any) -> torch.Tensor:
    """The context as a 1-D long tensor of ids in the vocabulary, not empty and within the positions."""
    if isinstance(input_ids, (list, tuple)):
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in input_ids):
            raise TypeError("the context's token ids must be ints")
        input_ids = torch.tensor(list(input_ids), dtype=torch.long)
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"the context must be token ids (a list or a tensor), got {type(input_ids).__name__}")
    if input_ids.dim() == 2 and input_ids.shape[0] == 1:
        input_ids = input_ids[0]
    if input_ids.dim() != 1 or input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise ValueError(f"the context must be a 1-D sequence of token ids, got a {input_ids.dim()}-D "
                         f"{input_ids.dtype} tensor")
    if input_ids.numel() == 0:
        raise ValueError("the context is empty (no tokens)")
    vocab = model.get_input_embeddings().weight.shape[0]
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"the context's token ids span [{lo}, {hi}], outside the model's vocabulary of "
                         f"{vocab} (ids from another tokenizer?)")
    limit = max_positions(model)
    if limit is not None and input_ids.numel() >= limit:
        raise ValueError(f"the context has {input_ids.numel()} tokens; the model has {limit} positions, and "
                         "a conversation must still fit after it")
    return input_ids.long()


def _cache_name(base: nn.Module) -> str:
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


@torch.no_grad()
def prefill_context(model: nn.Module, input_ids: Any, *, chunk_size: int = DEFAULT_CHUNK) -> ContextKV:
    """Run the frozen model (a patched model, its prefix left out) over the context in chunks of
    ``chunk_size`` tokens at positions 0..C-1, keeping every attention layer's keys and values."""
    from transformers.cache_utils import DynamicCache

    owner, state = _state(model)
    ids = check_context_ids(owner, input_ids)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    C = ids.numel()
    device = input_device(owner)
    base = state.base_model
    cache = DynamicCache(config=owner.config)
    was_training = owner.training
    owner.eval()
    state.capture = {}  # the patched attention runs the frozen model and records each layer's K/V
    try:
        for start in range(0, C, chunk_size):
            chunk = ids[start:start + chunk_size].to(device)[None]
            base(input_ids=chunk, use_cache=True, **{_cache_name(base): cache})
        captured = dict(state.capture)
    finally:
        state.capture = None
        state.plan = None
        owner.train(was_training)
    own = sorted(layer for layer in captured if layer not in state.shared_kv)
    windows = [w for w in (getattr(layer, "sliding_window", None) for layer in getattr(cache, "layers", []))
               if isinstance(w, int) and w > 0]
    window = min(windows) if windows else None
    if window is not None and C >= window:
        raise ValueError(f"the context has {C} tokens; the model's sliding window is {window}: a prefix "
                         "stays visible to every query, the plain model's window would drop the context's "
                         "first tokens, so the teacher would not be the model with the context in front")
    for layer in own:
        seen = captured[layer][0].shape[2]
        if seen != C:
            raise ValueError(f"layer {layer} attends over {seen} of the context's {C} tokens (a sliding "
                             "window or a cache that drops tokens): a prefix stays visible to every query, "
                             "so the teacher would not be the model with the context in front")
    shapes = {i: (captured[i][0].shape[1], captured[i][0].shape[3], captured[i][1].shape[3]) for i in own}
    heads = max(h for h, _, _ in shapes.values())
    dim = max(max(dk, dv) for _, dk, dv in shapes.values())
    layer_shapes = tuple(shapes[i] for i in own)
    if all(s == (heads, dim, dim) for s in layer_shapes):
        layer_shapes = ()
    config = PrefixConfig(num_tokens=C, num_kv_heads=heads, head_dim=dim, layers=tuple(own),
                          num_layers=state.prefix.config.num_layers, layer_shapes=layer_shapes)
    dtype = captured[own[0]][0].dtype
    kv = torch.zeros((len(own), 2, 1, heads, C, dim), dtype=dtype, device=device)
    for slot, layer in enumerate(own):
        k, v = captured[layer]
        h, dk, dv = shapes[layer]
        kv[slot, 0, 0, :h, :, :dk] = k[0]
        kv[slot, 1, 0, :h, :, :dv] = v[0]
    return ContextKV(kv=kv, config=config, input_ids=ids.cpu(), window=window)


def _check_matches(context: ContextKV, state: PatchState) -> None:
    if not isinstance(context, ContextKV):
        raise TypeError("context must be a ContextKV (prefill_context's result), got "
                        f"{type(context).__name__}")
    student = state.prefix.config
    if context.config.num_layers != student.num_layers:
        raise ValueError(f"the context was prefilled by a model of {context.config.num_layers} attention "
                         f"layers; this one has {student.num_layers}")
    if state.first_layer not in context.config.layers:
        raise ValueError(f"the context holds no keys and values for layer {state.first_layer}")


@contextlib.contextmanager
def reading_context(model: nn.Module, context: ContextKV) -> Iterator[nn.Module]:
    """Inside, the patched ``model`` reads ``context``'s keys and values as its prefix (frozen; the
    conversation's positions start at C) instead of its own prefix; restored on exit. Run it under
    ``torch.no_grad`` (the teacher): no gradient reaches the context."""
    owner, state = _state(model)
    _check_matches(context, state)
    if state.capture is not None:
        raise RuntimeError("reading_context inside running_bare (or a probe): the model runs without any "
                           "prefix there")
    held = owner._modules.get(MODULE_NAME)
    if not isinstance(held, PrefixKV):
        raise ValueError("the model's prefix is wrapped by PEFT (a LoRA model with modules_to_save): the "
                         "teacher must be the frozen model alone; distil with a plain patched model")
    if state.prefix.config.bank:
        raise ValueError("a bank of prefixes (num_prefixes) cannot read a context: distil into a single "
                         "prefix, then save it into the bank entry (save_prefix / load_prefix)")
    teacher = context.prefix_module()
    owner._modules[MODULE_NAME] = teacher
    state.prefix = teacher
    try:
        yield model
    finally:
        owner._modules[MODULE_NAME] = held
        state.prefix = held
        state.plan = None


@contextlib.contextmanager
def running_bare(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, the patched ``model`` runs as the frozen model without any prefix (positions from 0): the
    baseline without the context. Evaluation only (no KV cache that holds a prefix, no training)."""
    owner, state = _state(model)
    state.capture = {}
    try:
        yield model
    finally:
        state.capture = None
        state.plan = None


def check_fits(model: nn.Module, context: ContextKV, length: int) -> None:
    """A conversation of ``length`` tokens after the context must fit the model's positions."""
    limit = max_positions(model)
    if limit is not None and context.length + length > limit:
        raise ValueError(f"the context ({context.length} tokens) and the conversation ({length} tokens) "
                         f"exceed the model's {limit} positions")
    if context.window is not None and context.length + length > context.window:
        raise ValueError(f"the context ({context.length} tokens) and the conversation ({length} tokens) "
                         f"exceed the model's sliding window of {context.window}: the teacher keeps the "
                         "whole context visible, the plain model would not")


@torch.no_grad()
def teacher_logits(model: nn.Module, context: ContextKV, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The frozen model's logits for ``input_ids`` (B, S) with ``context`` in front, from the kept K/V
    (right padding with ``attention_mask``)."""
    check_fits(model, context, input_ids.shape[-1])
    with reading_context(model, context):
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
