"""Running the frozen model to learn about it: the shape probe at patch time (which layers attend, their
(Hkv, D)), and PEFT's init-from-text (the keys/values the frozen model computes for a text).

While ``state.capture`` is a dict, the attention function records each layer's (key, value) there and
attends without a prefix.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from .attention import recording_untagged_calls
from .state import PatchState


def input_device(model: nn.Module) -> torch.device:
    """Where the model's inputs (and so the prefix) live: the input embeddings' device."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and hasattr(emb, "weight"):
        return emb.weight.device
    return next(model.parameters()).device


@torch.no_grad()
def capture(model: nn.Module, state: PatchState, inputs: list[int] | Callable[[], Any],
            attention_training: bool = False) -> dict[Any, tuple]:
    """Run the frozen model (no prefix) on token ids (through the module that runs the layers), or run
    ``inputs()``; returns {probe key: (key, value)} as (1, Hkv, T, D). The probe key is the layer_idx,
    or (role, layer) in an encoder-decoder.

    ``attention_training``: the shape probe's run, with the attention modules alone in training mode (the
    rest of the model in eval mode, every RNG state restored after), so that ``state.attention_dropout``
    records the dropout training will hand the attention function: patch() can refuse it up front."""
    was_training = model.training
    model.eval()
    state.capture = {}
    rng = contextlib.nullcontext()
    if attention_training:
        for module in (*state.tagged_modules, *state.site_modules):
            module.training = True
        device = input_device(model)
        rng = torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else [])
    try:
        with rng, recording_untagged_calls() as untagged:
            if callable(inputs):
                inputs()
            else:
                ids = torch.tensor([inputs], dtype=torch.long, device=input_device(model))
                state.base_model(input_ids=ids, use_cache=False)
        if untagged and state.kind != "causal":
            names = sorted({type(m).__name__ for m in untagged})
            raise ValueError(f"{type(model).__name__}: attention modules {names} call transformers' "
                             "attention interface outside the layer stacks prefixattn found; they would run "
                             "without a prefix")
        return state.capture
    finally:
        state.capture = None
        state.plan = None
        model.train(was_training)


def layers_attending_over_their_cache(model: nn.Module, state: PatchState) -> frozenset[int]:
    """The layers whose attention reads the very tensors its ``DynamicLayer`` holds after the cache's own
    update: where generate() on the torch backend may keep the prefix in the cache (``decode_cache.py``).
    Not: layers that cache another form (latent attention caches its compressed keys), copy or transform
    the cached tensors, use another kind of cache layer, or a model whose probe fails (then none)."""
    import inspect

    from transformers.cache_utils import DynamicCache, DynamicLayer

    base = state.base_model
    try:
        name = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        cache = DynamicCache(config=model.config)
        ids = torch.tensor([[probe_token(model)]], dtype=torch.long, device=input_device(model))
        captured = capture(model, state, lambda: base(input_ids=ids, use_cache=True, **{name: cache}))
    except Exception:  # a model that needs another cache: it keeps the prefix out of its cache
        return frozenset()
    layers = set()
    for i, (k, v) in captured.items():
        layer = cache.layers[i] if isinstance(i, int) and i < len(cache.layers) else None
        if (type(layer) is DynamicLayer and layer.is_initialized and k.shape == layer.keys.shape
                and v.shape == layer.values.shape and k.data_ptr() == layer.keys.data_ptr()
                and v.data_ptr() == layer.values.data_ptr()):
            layers.add(i)
    return frozenset(layers)


def probe_token(model: nn.Module) -> int:
    """A harmless token id for the shape probe (BOS when there is one, never the pad token)."""
    cfg = model.config
    pad = getattr(cfg, "pad_token_id", None)
    for tok in (getattr(cfg, "bos_token_id", None), 1, 2, 0):
        if isinstance(tok, int) and tok != pad and tok < cfg.get_text_config().vocab_size:
            return tok
    return 0


def repeat_to_length(ids: Sequence[int], n: int) -> list[int]:
    """PEFT's init-from-text rule: repeat the tokens to fill n slots, then truncate."""
    ids = list(ids)
    if not ids:
        raise ValueError("init_text has no tokens")
    return (ids * math.ceil(n / len(ids)))[:n]


def _tokenize(init_text: Any, tokenizer: Any) -> list[int]:
    if isinstance(init_text, str):
        if tokenizer is None:
            raise ValueError("init='text' with a string init_text needs tokenizer=")
        ids = tokenizer(init_text, add_special_tokens=False)["input_ids"]
    elif isinstance(init_text, torch.Tensor):
        if init_text.dim() != 1 or init_text.is_floating_point():
            raise ValueError("init_text as a tensor must be a 1-D tensor of token ids")
        ids = init_text.tolist()
    elif isinstance(init_text, Sequence):
        ids = list(init_text)
    else:
        raise TypeError(f"init_text must be a string, a list of token ids or a 1-D tensor, got "
                        f"{type(init_text).__name__}")
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError("init_text must give a non-empty list of integer token ids")
    return ids


def init_from_text(model: nn.Module, state: PatchState, texts: list[Any], tokenizer: Any) -> None:
    """Set every bank entry's prefix to what the frozen model computes for its text (PEFT's rule)."""
    prefix = state.prefix
    c = prefix.config
    vocab = model.get_input_embeddings().weight.shape[0]
    # (L, 2, N, Hkv, P, D); where a layer is smaller than the stored shape (Gemma 4, latent attention),
    # the dims it does not read stay zero
    kv = torch.zeros(prefix.compute().shape, dtype=torch.float32)
    for n, text in enumerate(texts):
        ids = repeat_to_length(_tokenize(text, tokenizer), c.num_tokens)
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"init_text token ids must be in [0, {vocab}), got [{min(ids)}, {max(ids)}]")
        captured = capture(model, state, ids)
        for slot, layer in enumerate(c.layers):
            pk, pv = prefix.layer_views(kv, slot)
            pk[n].copy_(captured[layer][0][0])
            pv[n].copy_(captured[layer][1][0])
    prefix.set_values(kv)
