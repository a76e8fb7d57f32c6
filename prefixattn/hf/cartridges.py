"""Cartridges on the transformers side (PEFT's CARTRIDGE type): the patch options that make a prefix a
cartridge, the kind of a PEFT config or adapter, and initialising a prefix from a KV cache.

A cartridge is a raw prefix (no MLP) of typically hundreds to thousands of tokens, trained directly,
whose first ``num_frozen_tokens`` tokens never train (``prefix.module``: a buffer, so no optimizer,
weight decay included, can move them). It runs through the same op and kernels as any prefix.

``init_prefix_from_cache(model, cache)`` is PEFT's ``initialize_kv_prefix_from_past_key_values``: the
first P cached keys and values of a prefill the caller ran (with the chat template, a system prompt, the
corpus: the caller's choice) become the prefix. ``patch(..., init="text")`` is the other initializer,
the frozen model's own keys and values of a text.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..prefix import check_prefix_id, find_prefix

PEFT_CARTRIDGE = "CARTRIDGE"
PEFT_DEFAULT_FROZEN = 1  # peft.CartridgeConfig's default: the first token, an attention sink


def cartridge_options(cartridge: Any, num_frozen_tokens: Any, num_prefix_tokens: int | None,
                      prefix_projection: bool) -> tuple[bool, int]:
    """(cartridge, frozen token count) from ``patch``'s arguments, checked."""
    if not isinstance(cartridge, bool):
        raise TypeError(f"cartridge must be a bool, got {cartridge!r}")
    if num_frozen_tokens is None:
        return cartridge, PEFT_DEFAULT_FROZEN if cartridge else 0
    if not cartridge:
        raise ValueError("num_frozen_tokens is a cartridge option: pass cartridge=True (a prefix whose first "
                         "tokens are frozen is saved as PEFT's CARTRIDGE type)")
    if isinstance(num_frozen_tokens, bool) or not isinstance(num_frozen_tokens, int):
        raise TypeError(f"num_frozen_tokens must be an int, got {num_frozen_tokens!r}")
    if num_frozen_tokens < 0:
        raise ValueError(f"num_frozen_tokens must be >= 0, got {num_frozen_tokens}")
    if isinstance(num_prefix_tokens, int) and num_frozen_tokens >= num_prefix_tokens:
        # all frozen: the trainable parameter would have zero size (nothing to train, and optimizers
        # and PEFT's CARTRIDGE model choke on it)
        raise ValueError(f"num_frozen_tokens={num_frozen_tokens} leaves nothing to train with "
                         f"num_prefix_tokens={num_prefix_tokens}: freeze fewer than num_prefix_tokens tokens")
    if prefix_projection:
        raise ValueError("a cartridge holds its keys and values directly: it cannot be MLP-reparameterized "
                         "(prefix_projection=True)")
    return cartridge, num_frozen_tokens


def kind_of_peft(peft_type: Any, config: Any) -> dict[str, Any]:
    """``patch_model`` keyword arguments for a PEFT config (object or adapter_config dict) of a PREFIX_TUNING
    or CARTRIDGE adapter: a CARTRIDGE is patched as a cartridge with its frozen count."""
    name = str(getattr(peft_type, "value", peft_type))
    if name != PEFT_CARTRIDGE:
        return {}
    frozen = config.get("num_frozen_tokens") if isinstance(config, dict) else config.num_frozen_tokens
    return {"cartridge": True, "num_frozen_tokens": int(frozen)}


def _cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(keys, values)] per model layer of a transformers Cache (its ``layers``) or a legacy sequence of
    (keys, values) pairs; each (batch, Hkv, T, D)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        pairs = [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in layers]
    elif isinstance(cache, (list, tuple)):
        pairs = [tuple(layer[:2]) if isinstance(layer, (list, tuple)) else (None, None) for layer in cache]
    else:
        raise TypeError("cache must be a transformers Cache (DynamicCache) or a sequence of (keys, values) "
                        f"per layer, got {type(cache).__name__}")
    return pairs


@torch.no_grad()
def init_prefix_from_cache(model: nn.Module, cache: Any, *, prefix_id: int | None = None) -> None:
    """Set a patched model's prefix to the first P keys and values of ``cache`` (PEFT's
    ``initialize_kv_prefix_from_past_key_values``): a batch-1 prefill of the frozen model (an unpatched copy,
    or the patched model under ``prefixattn.unpatch``) holding at least P tokens. Keys are kept as cached,
    i.e. rotated at their positions 0..P-1, as PEFT keeps them. With ``prefix_id`` (a bank) that entry is
    set, otherwise the whole prefix (every entry of a bank). Everything is checked before the prefix
    changes."""
    module = find_prefix(model)
    c = module.config
    check_prefix_id(prefix_id, c)
    if c.projection:
        raise ValueError("the prefix is MLP-reparameterized (prefix_projection=True); its values cannot be "
                         "set from a cache")
    pairs = _cache_layers(cache)
    P = c.num_tokens
    entries = 1 if prefix_id is not None else c.num_prefixes
    kv = torch.zeros((len(c.layers), 2, entries, c.num_kv_heads, P, c.head_dim), dtype=torch.float32)
    for slot, layer in enumerate(c.layers):
        if layer >= len(pairs) or pairs[layer][0] is None or pairs[layer][1] is None:
            raise ValueError(f"the cache has no keys and values for layer {layer} ({len(pairs)} layers "
                             "cached)")
        keys, values = pairs[layer]
        h, dk, dv = c.layer_shape(slot)
        for name, t, d in (("keys", keys, dk), ("values", values, dv)):
            what = f"layer {layer}'s cached {name}"
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"{what} must be a (batch, heads, tokens, dim) tensor")
            if t.shape[0] != 1:
                raise ValueError(f"the cache must come from a batch-1 prefill; {what} have batch "
                                 f"{t.shape[0]}")
            if (t.shape[1], t.shape[3]) != (h, d):
                raise ValueError(f"{what} have {t.shape[1]} heads x dim {t.shape[3]}; the prefix has "
                                 f"{h} x {d}")
            if t.shape[2] < P:
                raise ValueError(f"the cache holds {t.shape[2]} tokens; the prefix needs at least {P}")
            if not torch.isfinite(t[:, :, :P]).all():
                raise ValueError(f"{what} are not finite")
        pk, pv = module.layer_views(kv, slot)
        pk.copy_(keys[0, :, :P].float().cpu().unsqueeze(0).expand_as(pk))
        pv.copy_(values[0, :, :P].float().cpu().unsqueeze(0).expand_as(pv))
    module.set_values(kv, prefix_id)
