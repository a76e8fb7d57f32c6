"""The attention and mask functions registered with transformers under the name ``"prefixattn"``.

The mask function hands the attention function the 2-D (B, Sk) padding mask (or None without padding).
The attention function runs once per layer: it looks its layer's prefix up in the step plan (built once
per step by the pre-hook, ``hooks.py``) and calls ``prefixattn.prefix_attention`` with the sequence K/V
(the KV cache holds the sequence only, except for generate() on the torch backend, where
``decode_cache.py`` keeps each row's prefix in front of it, as PEFT does, and a decode step is one SDPA
call). It does no host sync (the plan
checked a bank's ids, so the op skips its own check: ``check_index=False``) and no copy of the prefix
unless a layer runs in another dtype or on another device than the plan expected.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ..documents import Documents
from ..ops import prefix_attention
from ..weights import attention_weights
from .decode_cache import decode_over_cache
from .position_bias import is_t5_attention, layer_score_bias
from .sites import CAUSAL_ATTR, PROBE_ATTR, SITE_ATTR
from .state import IMPL_NAME, STATE_ATTR, STEP_KWARG, PatchState


def prefix_mask_function(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0,
                         kv_offset: int = 0, mask_function: Any = None,
                         attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """AttentionMaskInterface entry: the (B, kv_length) bool padding mask, or None without padding.

    It is handed out as a (B, 1, q_length, kv_length) view with stride 0 over the queries (no memory),
    because some models slice the mask's query dim (Gemma 4 before its KV-sharing layers); the attention
    function takes row 0 back. Runs once per step (per mask kind), not per layer: its one host read (any
    padding?) lets unpadded batches skip the mask altogether (not under torch.compile: no data-dependent
    branch in a graph)."""
    if attention_mask is None:
        return None
    mask = attention_mask[:, -kv_length:]
    if mask.shape[1] < kv_length:
        raise ValueError(
            f"prefixattn: the attention mask covers {mask.shape[1]} keys but the layer has {kv_length}; "
            "static (pre-allocated) caches are not supported, use the default dynamic cache"
        )
    if mask.dtype != torch.bool:
        mask = mask.bool()
    # unpadded batches skip the mask (one host read per step); a compiled graph cannot branch on data, so
    # under torch.compile the mask always goes to the op
    if not torch.compiler.is_compiling() and bool(mask.all()):
        return None
    return mask[:, None, None, :].expand(mask.shape[0], 1, q_length, kv_length)


def padding_mask(attention_mask: torch.Tensor | None, extended: bool = False) -> torch.Tensor | None:
    """The (B, Sk) padding mask from what a layer hands the attention function: the view
    ``prefix_mask_function`` made (possibly sliced over the queries) or a 2-D mask. ``extended``: also the
    additive (B, 1, 1, Sk) mask ``(1 - mask) * dtype.min`` that a T5-family stack builds itself (Switch
    Transformers' encoder): 0 is a real key. Anything else is a mask of the model's own (the pre-hook
    refuses a caller's 4-D mask before)."""
    if attention_mask is None or attention_mask.dim() == 2:
        return attention_mask
    if (attention_mask.dim() == 4 and attention_mask.dtype == torch.bool and attention_mask.shape[1] == 1
            and (attention_mask.stride(2) == 0 or attention_mask.shape[2] == 1)):
        return attention_mask[:, 0, 0, :]
    if (extended and attention_mask.dim() == 4 and attention_mask.is_floating_point()
            and attention_mask.shape[1:3] == (1, 1)):
        return attention_mask[:, 0, 0, :] == 0
    raise ValueError(
        "prefixattn takes a (batch, keys) padding mask; the layer got a "
        f"{attention_mask.dim()}-D attention mask of its own (custom 4-D masks are not supported)"
    )


def _unpatched_documents(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                         kwargs: dict[str, Any]) -> Documents | None:
    """Packed rows of a model that was not patched (no per-step plan): from the layer's own inputs, the
    way transformers' other attention functions read them."""
    if query.shape[2] != key.shape[2] or attention_mask is not None:
        return None  # a KV cache or a padding mask: not packed
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        return Documents.from_cu_seqlens(cu.to(query.device), query.shape[0], query.shape[2])
    position_ids = kwargs.get("position_ids")
    if position_ids is None or query.shape[2] < 2:
        return None
    return Documents.from_position_ids(position_ids.expand(query.shape[0], -1).to(query.device))


# Keywords a layer may hand the attention function that change the scores and that prefixattn does not
# implement (Inkling's learned relative position bias, Inkling 2's per-token sink logits): refused, never
# ignored. Any other floating (.., Sq, Sk) tensor is taken for a score bias too. T5-style attention's
# ``position_bias`` is taken (position_bias.py).
# (Other tensors pass through the interface untouched: labels, token type ids, ...)
UNSUPPORTED_KWARGS = frozenset({"position_bias", "sinks", "attention_bias", "attn_bias", "alibi", "bias",
                                "relative_position_bias", "score_mod"})
HANDLED_KWARGS = frozenset({"position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "s_aux", "cache_position"})


def unhandled_inputs(kwargs: dict[str, Any], query_length: int, key_length: int,
                     handled: frozenset[str] = HANDLED_KWARGS) -> list[str]:
    """Names of the keywords of an attention call that would change the scores and that prefixattn does
    not implement."""
    out = []
    for name, x in kwargs.items():
        if x is None or name in handled:
            continue
        bias_like = (isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() == 4
                     and tuple(x.shape[-2:]) == (query_length, key_length))
        if name in UNSUPPORTED_KWARGS or bias_like:
            out.append(name)
    return sorted(out)


def _mask_half_width(module: nn.Module) -> int | None:
    """The half-width of a bidirectional layer's own sliding-window mask: transformers'
    ``create_bidirectional_sliding_window_mask`` shows key j when ``|i - j| <= config.sliding_window``
    (the layer's config; per layer where the config is: NeoMME)."""
    config = getattr(module, "config", None)
    try:
        half = getattr(config, "sliding_window", None)
    except Exception:  # AmbiguousGlobalPerLayerAttributeError: a per-layer config
        layers, layer_idx = getattr(config, "per_layer_config", None), getattr(module, "layer_idx", None)
        half = None if layers is None or not isinstance(layer_idx, int) else layers[layer_idx].sliding_window
    return half if isinstance(half, int) else None


def two_sided_window(module: nn.Module, window: int) -> int:
    """The op's W (key j visible when ``|i - j| < W``) for a bidirectional layer that hands over
    ``sliding_window=window``. ModernBERT-style layers hand over their mask's half-width + 1 (flash
    attention's inclusive bound): W is that. A layer whose kwarg disagrees with its own mask (T5Gemma's
    encoder hands over the half-width: its eager mask shows |i - j| <= W, its flash path |i - j| < W) is
    refused, as is one whose mask prefixattn cannot read."""
    half = _mask_half_width(module)
    if half is None or window != half + 1:
        raise ValueError(
            f"prefixattn: {type(module).__name__} hands the attention function a two-sided sliding window "
            f"of {window}, but its own bidirectional mask shows |i - j| <= {half} (config.sliding_window), "
            f"which {'is not the same window' if half is not None else 'prefixattn cannot read'}; prefixattn "
            "takes two-sided windows that follow ModernBERT's convention (sliding_window = "
            "config.sliding_window + 1)")
    return window


# while the shape probe of an encoder or encoder-decoder runs: the modules that called this function without
# being tagged (attention the stack discovery missed would run without its prefix, silently)
_untagged_calls: list[nn.Module] | None = None


@contextlib.contextmanager
def recording_untagged_calls() -> Iterator[list[nn.Module]]:
    global _untagged_calls
    _untagged_calls = calls = []
    try:
        yield calls
    finally:
        _untagged_calls = None


# what a decode step over a cache that holds the prefix may carry and still be one plain SDPA call
_DECODE_KWARGS = frozenset({"position_ids", "cache_position", "is_causal", STEP_KWARG})


def _plain_decode_step(module: nn.Module, query: torch.Tensor, key: torch.Tensor, dropout: float, step: Any,
                       kwargs: dict[str, Any]) -> bool:
    """A decode step (one query row: it sees every cached key, causal or not) with nothing that changes
    the scores: no window, softcap, sinks, bias (any tensor keyword but positions), no dropout, weights
    or autocast. (Runs per layer per generated token: a plain loop, no generator.)"""
    if (query.shape[2] != 1 or query.dtype != key.dtype or step.output_attentions or step.autocast
            or step.documents is not None or (dropout and module.training)):
        return False
    for name, x in kwargs.items():
        if x is None or name in _DECODE_KWARGS:
            continue
        if isinstance(x, torch.Tensor) or (x and name in _SCORE_SCALARS):
            return False
    return True


_SCORE_SCALARS = frozenset({"sliding_window", "softcap"})


def prefix_attention_function(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, scaling: float | None = None,
                              dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """AttentionInterface entry: (B, Hq, Sq, D) q and (B, Hkv, Sk, D) k/v -> ((B, Sq, Hq, D), None).

    A module of a model that was not patched (loaded with ``attn_implementation="prefixattn"``, as TRL
    rebuilds the reference model of DPO / GRPO from a patched model's path) has no prefix: it runs the
    model's own attention, the frozen base model."""
    state: PatchState | None = module.__dict__.get(STATE_ATTR)
    layer_idx = getattr(module, "layer_idx", None)
    # encoders and encoder-decoders: the site the module was given (None: no prefix), by role and layer;
    # decoder-only models: its layer_idx
    has_site = SITE_ATTR in module.__dict__
    site = module.__dict__[SITE_ATTR] if has_site else layer_idx
    if state is not None and not has_site and not isinstance(layer_idx, int):
        raise RuntimeError(f"{type(module).__name__} has no integer layer_idx; prefixattn routes by "
                           "layer_idx")
    # generate() on the torch backend: a cache that holds this layer's prefix in front of the sequence
    # (decode_cache.py) hands over [prefix; seq]; the prefix rows are split off as views
    step = kwargs.get(STEP_KWARG) or (state.plan if state is not None else None)
    held = step.cached.get(site) if step is not None and step.cached and site is not None else None
    if held is not None:
        if key is not held.keys:
            raise RuntimeError(
                f"prefixattn: {type(module).__name__} (layer {site}) did not attend over its KV cache's "
                "keys, which hold its prefix; this model cannot keep the prefix in the cache")
        if _plain_decode_step(module, query, key, dropout, step, kwargs):
            # one query row sees every cached key but padding: one SDPA call, as PEFT's decode step
            out = decode_over_cache(query, key, value, held.prefix_len, padding_mask(attention_mask),
                                    scaling)
            return out.transpose(1, 2).contiguous(), None
        cached_pk, cached_pv = key[:, :, :held.prefix_len], value[:, :, :held.prefix_len]
        key, value = key[:, :, held.prefix_len:], value[:, :, held.prefix_len:]
    t5 = is_t5_attention(module)
    attention_mask = padding_mask(attention_mask, extended=t5)
    if attention_mask is not None and attention_mask.shape[-1] != key.shape[2]:
        raise ValueError(f"prefixattn: padding mask has {attention_mask.shape[-1]} keys, the layer has "
                         f"{key.shape[2]}")
    if dropout and module.training and state is not None and state.capture is not None:
        # patch()'s shape probe, with the attention modules in training mode: what training will ask for
        state.attention_dropout = max(state.attention_dropout, float(dropout))
    elif dropout and module.training and not (state is not None and state.ignore_attention_dropout):
        raise ValueError(
            f"{type(module).__name__} asks for attention dropout {dropout} in training, which "
            "prefixattn's fused attention does not implement. Set the config's attention dropout to 0, "
            "or patch with ignore_attention_dropout=True to train without it"
        )

    unhandled = unhandled_inputs(kwargs, query.shape[2], key.shape[2],
                                 HANDLED_KWARGS | {"position_bias"} if t5 else HANDLED_KWARGS)
    if unhandled:
        raise ValueError(f"{type(module).__name__} hands the attention function {unhandled}, attention "
                         "inputs prefixattn does not implement (a learned position bias, per-token sinks, "
                         "...); ignoring them would be silently wrong")
    # with causal=False the op's window is two-sided (key j visible when |i - j| < W), which is what
    # transformers' bidirectional sliding-window layers ask for (ModernBERT: |i - j| <= window // 2, handed
    # over as sliding_window = window // 2 + 1)
    window = kwargs.get("sliding_window")
    causal = bool(module.__dict__.get(CAUSAL_ATTR, getattr(module, "is_causal", True)))
    if window and not causal:
        window = two_sided_window(module, int(window))
    plan = kwargs.get(STEP_KWARG)
    backend = "auto" if state is None else state.backend
    pk = pv = index = documents = None
    if state is None and _untagged_calls is not None:
        _untagged_calls.append(module)
    if state is None or (site is None and plan is None):
        # an unpatched model, or a module with no prefix in a stack without a step plan (the encoder of
        # an encoder-decoder whose prefix is on the decoder): the model's own attention
        documents = _unpatched_documents(query, key, attention_mask, kwargs)
    elif state.capture is not None:  # probing shapes / init from text: the frozen model, no prefix
        state.capture[module.__dict__.get(PROBE_ATTR, layer_idx)] = (key.detach(), value.detach())
        backend = "torch"
    else:
        if plan is None:  # a layer that does not pass its kwargs on: the step's plan from the state
            plan = state.plan
        if plan is None or plan.capture:
            raise RuntimeError("prefixattn: no prefix for this forward pass; call the patched model (or its "
                               "base model), not a layer directly")
        if held is not None:
            pk, pv = cached_pk, cached_pv  # already each row's, in the cache's dtype
        elif site is not None:
            pk, pv, index = plan.layer(site)
        documents = plan.documents
        if pk is not None and (pk.device != query.device or (pk.dtype != query.dtype and not plan.autocast)):
            # a layer away from the plan's device (device_map splits) or dtype: move/cast here. Under
            # autocast the op casts q, k, v itself and the plan's prefix is already in the autocast dtype
            dtype = pk.dtype if plan.autocast else query.dtype
            pk, pv = pk.to(device=query.device, dtype=dtype), pv.to(device=query.device, dtype=dtype)
        if index is not None and index.device != query.device:
            index = index.to(query.device)
        if documents is not None and documents.device != query.device:
            documents = Documents(documents.start.to(query.device), documents.end.to(query.device))

    softcap = float(kwargs.get("softcap") or 0.0)
    window = int(window) if window else None
    score_bias = layer_score_bias(module, kwargs.get("position_bias"), 0 if pk is None else pk.shape[-2],
                                  key.shape[2]) if t5 else None
    # learned attention sinks (gpt-oss, granite_swa, flint): transformers passes them as ``s_aux``
    out = prefix_attention(
        query, key, value, pk, pv, key_padding_mask=attention_mask, causal=causal, scale=scaling,
        prefix_index=index, softcap=softcap, sliding_window=window, documents=documents,
        sinks=kwargs.get("s_aux"), score_bias=score_bias, check_index=False, backend=backend,
    )
    weights = None
    if plan is not None and plan.output_attentions:  # (unpatched: transformers refuses output_attentions)
        weights = attention_weights(
            query, key, pk, scale=query.shape[-1] ** -0.5 if scaling is None else scaling, causal=causal,
            key_padding_mask=attention_mask, prefix_index=index, softcap=softcap, sliding_window=window,
            doc_start=None if documents is None else documents.start,
            doc_end=None if documents is None else documents.end, sinks=kwargs.get("s_aux"),
            score_bias=score_bias)
    # the triton backend's output is (B, Sq, Hq, D) in memory: the transpose is then free
    return out.transpose(1, 2).contiguous(), weights


def register() -> None:
    """Register both functions with transformers (idempotent)."""
    AttentionInterface.register(IMPL_NAME, prefix_attention_function)
    AttentionMaskInterface.register(IMPL_NAME, prefix_mask_function)
