"""``patch()`` / ``unpatch()``: prefix-tune a Hugging Face model through the fused prefix attention.

How it plugs in (no ``forward`` is replaced):

- an attention function and a mask function registered with transformers' ``AttentionInterface`` and
  ``AttentionMaskInterface`` under the name ``"prefixattn"``; the model's attention implementation is
  switched to it (``unpatch`` restores the previous one). The mask function hands the attention
  function the 2-D (B, Sk) padding mask (or None);
- a forward pre-hook on the base model (``model.base_model``) that, once per step, computes the prefix
  (the raw parameter, or the MLP reparameterization), numbers positions from P the way PEFT does,
  and checks ``prefix_ids`` for a bank. The step travels to every layer's attention function in the
  ``prefixattn_step`` keyword argument that decoder layers pass down (so gradient checkpointing
  recomputes with the same step), and is also kept on the patch state as a fallback;
- the attention function finds its layer's prefix by ``module.layer_idx`` and calls
  ``prefixattn.prefix_attention`` with the sequence K/V (the KV cache holds the sequence only; the prefix
  never enters it).

PEFT semantics reproduced: sequence positions start at P (explicit ``position_ids`` get P added, as
PEFT does; generate() derives them from the attention mask, so left padding works); OPT's mask-based
positions count P leading prefix slots; prefix keys are not rotated.

Refused with a clear error: families with their own attention code, encoder-decoders, 4-D attention
masks, static (compileable) caches, a sliding window that would hide part of the prefix
(P + keys > window), nonzero attention dropout in training (unless ``ignore_attention_dropout=True``,
which runs without it).
"""

from __future__ import annotations

import inspect
import sys
import types
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn

from .families import Family, resolve_family
from .ops import BACKENDS, prefix_attention
from .prefix import PrefixConfig, PrefixKV, repeat_to_length

IMPL_NAME = "prefixattn"
STEP_KWARG = "prefixattn_step"
STATE_ATTR = "_prefixattn_state"
MODULE_NAME = "prefixattn_prefix"

InitKind = Literal["random", "zeros", "text"]


# ----------------------------------------------------------------------------------------------
# Per-model state and per-step data
# ----------------------------------------------------------------------------------------------


@dataclass
class PrefixStep:
    """What one forward pass needs: the step's prefix tensor and, for a bank, each row's entry."""

    kv: torch.Tensor | None  # (L, 2, N, Hkv, P, D), None while probing / capturing
    prefix_ids: torch.Tensor | None
    bank: bool

    def layer(self, slot: int, dtype: torch.dtype, device: torch.device):
        kv = self.kv[slot]
        if kv.dtype != dtype or kv.device != device:
            # autograd-tracked cast of the fp32 master; the move serves models split over devices
            # (device_map), whose later layers run away from the input device the prefix lives on
            kv = kv.to(device=device, dtype=dtype)
        if self.bank:
            ids = self.prefix_ids
            return kv[0], kv[1], ids if ids.device == device else ids.to(device)
        return kv[0, 0], kv[1, 0], None


@dataclass
class PatchState:
    family: Family
    backend: str
    base_model: nn.Module
    prefix: PrefixKV | None = None
    ignore_attention_dropout: bool = False
    previous_impl: Any = None
    previous_requires_grad: dict[str, bool] = field(default_factory=dict)
    previous_keys_to_ignore_on_save: Any = None
    tagged_modules: list[nn.Module] = field(default_factory=list)
    step: PrefixStep | None = None
    capture: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None  # probing / init-from-text
    layer_modules: list[nn.Module] = field(default_factory=list)
    seen_step_kwarg: bool = False
    wrapped_prepare: bool = False

    @property
    def num_tokens(self) -> int:
        return 0 if self.prefix is None else self.prefix.config.num_tokens


# ----------------------------------------------------------------------------------------------
# The attention and mask functions registered with transformers
# ----------------------------------------------------------------------------------------------


def prefix_mask_function(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0,
                         kv_offset: int = 0, mask_function: Any = None,
                         attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """AttentionMaskInterface entry: the 2-D (B, kv_length) bool padding mask, or None without padding."""
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
    if bool(mask.all()):
        return None
    return mask


def prefix_attention_function(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, scaling: float | None = None,
                              dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """AttentionInterface entry: (B, Hq, Sq, D) q and (B, Hkv, Sk, D) k/v -> ((B, Sq, Hq, D), None)."""
    state: PatchState | None = getattr(module, STATE_ATTR, None)
    if state is None:
        raise RuntimeError(
            f"{type(module).__name__} runs with attn_implementation={IMPL_NAME!r} but was not patched by "
            "prefixattn.patch (set the model's attention implementation back, or patch this model)"
        )
    layer_idx = getattr(module, "layer_idx", None)
    if not isinstance(layer_idx, int):
        raise RuntimeError(f"{type(module).__name__} has no integer layer_idx; prefixattn routes by "
                           "layer_idx")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            "prefixattn takes a 2-D (batch, keys) padding mask; got a "
            f"{attention_mask.dim()}-D attention mask (custom 4-D masks are not supported)"
        )
    if attention_mask is not None and attention_mask.shape[-1] != key.shape[2]:
        raise ValueError(f"prefixattn: padding mask has {attention_mask.shape[-1]} keys, the layer has "
                         f"{key.shape[2]}")
    if dropout and module.training and not state.ignore_attention_dropout:
        raise ValueError(
            f"{type(module).__name__} asks for attention dropout {dropout} in training, which "
            "prefixattn's fused attention does not implement. Set the config's attention dropout to 0, "
            "or patch with ignore_attention_dropout=True to train without it"
        )
    softcap = kwargs.get("softcap") or 0.0
    causal = bool(getattr(module, "is_causal", True))

    step = kwargs.get(STEP_KWARG)
    if step is not None:
        state.seen_step_kwarg = True
    else:
        step = state.step
    pk = pv = index = None
    backend = state.backend
    if state.capture is not None:  # probing shapes / init from text: the frozen model, no prefix
        state.capture[layer_idx] = (key.detach(), value.detach())
        backend = "torch"
    else:
        if step is None or step.kv is None:
            raise RuntimeError("prefixattn: no prefix for this forward pass; call the patched model (or its "
                               "base model), not a layer directly")
        slot = state.prefix.slot(layer_idx)
        if slot is not None:
            pk, pv, index = step.layer(slot, query.dtype, query.device)

    window = kwargs.get("sliding_window")
    if window is not None and window > 0:
        P = 0 if pk is None else pk.shape[-2]
        if P + key.shape[2] > window:
            raise ValueError(
                f"layer {layer_idx} uses a sliding window of {window} tokens, which would hide part of the "
                f"{P}-token prefix (prefix + keys = {P + key.shape[2]} > {window}); prefixattn does not "
                "implement windowed prefix attention, keep prefix + sequence within the window"
            )

    out = prefix_attention(
        query, key, value, pk, pv, key_padding_mask=attention_mask, causal=causal, scale=scaling,
        prefix_index=index, softcap=float(softcap), backend=backend,
    )
    return out.transpose(1, 2).contiguous(), None


_REGISTERED = False


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPL_NAME, prefix_attention_function)
    AttentionMaskInterface.register(IMPL_NAME, prefix_mask_function)
    _REGISTERED = True


# ----------------------------------------------------------------------------------------------
# The per-step pre-hook on the base model
# ----------------------------------------------------------------------------------------------


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


def check_prefix_ids(prefix_ids: Any, batch: int, config: PrefixConfig, device: torch.device) -> torch.Tensor:
    """Validate a bank's per-row entry ids (before any kernel runs); returns them on ``device``."""
    if not isinstance(prefix_ids, torch.Tensor):
        raise TypeError(f"prefix_ids must be a torch.Tensor of integer ids, got {type(prefix_ids).__name__}")
    if prefix_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"prefix_ids must be int64 (long) or int32, got {prefix_ids.dtype}")
    if prefix_ids.shape != (batch,):
        raise ValueError(f"prefix_ids must have shape (batch,) = ({batch},), got {tuple(prefix_ids.shape)}: "
                         "one id per row of input_ids (generate() repeats them for num_beams / "
                         "num_return_sequences itself)")
    if batch and not torch.compiler.is_compiling():
        lo, hi = int(prefix_ids.min()), int(prefix_ids.max())
        if lo < 0 or hi >= config.num_prefixes:
            raise ValueError(f"prefix_ids out of range: values span [{lo}, {hi}] but the bank has "
                             f"{config.num_prefixes} entries")
    return prefix_ids.to(device=device, dtype=torch.long)


def _positions(state: PatchState, kwargs: dict, batch: int, length: int,
               device: torch.device) -> torch.Tensor:
    P = state.num_tokens
    cache = kwargs.get("past_key_values")
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
    return (torch.arange(length, device=device) + past + P).unsqueeze(0)


def _pre_hook(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook (with kwargs) on the module that runs the layers: the per-step work.

    A plain function that finds the state on the module (not a closure), so deep copies of a patched
    model carry their own state.
    """
    state: PatchState = module.__dict__[STATE_ATTR]
    kwargs = _bind_to_kwargs(module, args, kwargs)
    prefix_ids = kwargs.pop("prefix_ids", None)
    kwargs.pop(STEP_KWARG, None)
    cache = kwargs.get("past_key_values")
    if cache is not None and getattr(cache, "is_compileable", False):
        raise ValueError("prefixattn does not support static (compileable) KV caches; use the default "
                         "DynamicCache")
    if state.capture is not None:  # probing / init from text: the frozen model as is
        step = PrefixStep(None, None, False)
        state.step = step
        kwargs[STEP_KWARG] = step
        return (), kwargs

    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    ref = ids if ids is not None else embeds
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
        prefix_ids = check_prefix_ids(prefix_ids, batch, config, device)
    elif prefix_ids is not None:
        raise ValueError("prefix_ids was given but the model has a single prefix (patch with "
                         "num_prefixes=N for a bank)")

    position_ids = kwargs.get("position_ids")
    if position_ids is not None:
        kwargs["position_ids"] = position_ids + state.num_tokens  # as PEFT does for prefix tuning
    else:
        kwargs["position_ids"] = _positions(state, kwargs, batch, length, device)

    if config.projection and module.training and torch.is_grad_enabled():
        _refuse_reentrant_checkpointing(state)
    step = PrefixStep(state.prefix.compute(), prefix_ids, config.bank)
    state.step = step
    kwargs[STEP_KWARG] = step
    return (), kwargs


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


# ----------------------------------------------------------------------------------------------
# patch / unpatch
# ----------------------------------------------------------------------------------------------


def _get_state(model: nn.Module) -> PatchState | None:
    return model.__dict__.get(STATE_ATTR)


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` was returned by ``prefixattn.patch`` and not unpatched since."""
    return _get_state(model) is not None


def get_prefix_module(model: nn.Module) -> PrefixKV:
    """The model's ``PrefixKV`` (the trainable prefix); TypeError if the model is not patched."""
    inner = getattr(model, "module", None)  # DistributedDataParallel / accelerate wrappers
    if _get_state(model) is None and isinstance(inner, nn.Module) and _get_state(inner) is not None:
        model = inner
    state = _get_state(model)
    if state is None or state.prefix is None:
        raise TypeError(f"{type(model).__name__} is not patched by prefixattn.patch")
    return state.prefix


def _find_layers_owner(model: nn.Module, state: PatchState) -> nn.Module:
    """The module that runs the decoder layers (parent of the ModuleList holding the attention layers):
    LlamaModel, GPT2Model, OPTDecoder (OPTForCausalLM calls its decoder directly), ... Its forward takes
    position_ids; the per-step pre-hook goes there."""
    tagged_ids = {id(m) for m in state.tagged_modules}
    best = None
    for module in model.modules():
        for child in module.children():
            if isinstance(child, nn.ModuleList) and any(
                id(m) in tagged_ids for layer in child for m in layer.modules()
            ):
                best = module
                layers = list(child)
                break
        if best is not None:
            break
    if best is None:
        raise ValueError(f"{type(model).__name__}: could not find the module that runs the attention layers")
    state.layer_modules = layers
    if "position_ids" not in inspect.signature(best.forward).parameters:
        raise ValueError(f"{type(best).__name__}.forward takes no position_ids; prefixattn cannot number "
                         "positions from P for this model")
    return best


def _input_device(model: nn.Module) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and hasattr(emb, "weight"):
        return emb.weight.device
    return next(model.parameters()).device


@torch.no_grad()
def _capture(model: nn.Module, state: PatchState, token_ids: list[int]) -> dict[int, tuple]:
    """Run the frozen model (no prefix) on token_ids; returns {layer_idx: (key, value)} as (1, Hkv, T, D)."""
    was_training = model.training
    model.eval()
    state.capture = {}
    try:
        ids = torch.tensor([token_ids], dtype=torch.long, device=_input_device(model))
        state.base_model(input_ids=ids, use_cache=False)
        return state.capture
    finally:
        state.capture = None
        state.step = None
        model.train(was_training)


def _probe_token(model: nn.Module) -> int:
    cfg = model.config
    pad = getattr(cfg, "pad_token_id", None)
    for tok in (getattr(cfg, "bos_token_id", None), 1, 2, 0):
        if isinstance(tok, int) and tok != pad and tok < cfg.get_text_config().vocab_size:
            return tok
    return 0


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


def _init_from_text(model: nn.Module, state: PatchState, texts: list[Any], tokenizer: Any) -> None:
    prefix = state.prefix
    c = prefix.config
    vocab = model.get_input_embeddings().weight.shape[0]
    values = []
    for text in texts:
        ids = repeat_to_length(_tokenize(text, tokenizer), c.num_tokens)
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"init_text token ids must be in [0, {vocab}), got [{min(ids)}, {max(ids)}]")
        captured = _capture(model, state, ids)
        per_layer = [torch.stack([captured[layer][0][0], captured[layer][1][0]]) for layer in c.layers]
        values.append(torch.stack(per_layer))  # (L, 2, Hkv, P, D)
    kv = torch.stack(values, dim=2)  # (L, 2, N, Hkv, P, D)
    prefix.set_values(kv)


def _check_patch_args(num_prefix_tokens: Any, num_prefixes: Any, dtype: Any, backend: Any, init: Any) -> None:
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 1:
        raise ValueError(f"num_prefix_tokens must be a positive int, got {num_prefix_tokens!r}")
    if num_prefixes is not None and (isinstance(num_prefixes, bool) or not isinstance(num_prefixes, int)
                                     or num_prefixes < 1):
        raise ValueError("num_prefixes must be a positive int (or None for a single prefix), got "
                         f"{num_prefixes!r}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if init not in ("random", "zeros", "text"):
        raise ValueError(f"init must be 'random', 'zeros' or 'text', got {init!r}")


def patch(
    model: nn.Module,
    num_prefix_tokens: int | None = None,
    *,
    prefix_projection: bool = False,
    projection_hidden_size: int | None = None,
    num_prefixes: int | None = None,
    layers: Sequence[int] | None = None,
    init: InitKind = "random",
    init_text: str | Sequence[int] | torch.Tensor | Sequence[Any] | None = None,
    tokenizer: Any = None,
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    ignore_attention_dropout: bool = False,
) -> nn.Module:
    """Prefix-tune a Hugging Face causal LM with the fused prefix attention; returns the model to use.

    Every base parameter is frozen; the prefix is added as ordinary parameters in the submodule
    ``model.prefixattn_prefix`` (so ``model.parameters()`` / optimizers / DDP / Trainer see it).

    Args:
        model: a transformers model whose attention goes through the AttentionInterface (Llama, Mistral,
            Qwen2/3, Gemma 1/2, Phi-3, GPT-2, GPT-NeoX, OPT, ...), or a PEFT ``PeftModel`` with a
            PREFIX_TUNING adapter (the same prefix is carried over; the base model is returned patched).
        num_prefix_tokens: P, the number of virtual tokens per layer.
        prefix_projection: PEFT's reparameterization (embedding + Linear-Tanh-Linear MLP, run once per step).
        projection_hidden_size: the MLP's hidden size (default Hkv*D, as PEFT's encoder_hidden_size).
        num_prefixes: keep a bank of N prefixes; every call then takes ``prefix_ids`` ((batch,) long)
            choosing each row's entry (``model(ids, prefix_ids=...)``,
            ``model.generate(..., prefix_ids=...)``).
        layers: indices of the layers that carry a prefix (default: all).
        init: "random" (N(0, 1), as PEFT's embedding), "zeros", or "text": the keys/values the frozen model
            computes for ``init_text`` (repeated/truncated to P tokens), i.e. the prefix starts out exactly
            as if that text preceded every input. For a bank, ``init_text`` may be a list of N texts.
        tokenizer: needed when init_text is a string.
        dtype: dtype of the prefix parameters (fp32 master by default; cast to the activations' dtype
            in the attention function).
        backend: "auto" | "triton" | "torch", passed to ``prefixattn.prefix_attention``.
        ignore_attention_dropout: train without the model's attention dropout instead of refusing it.
    """
    from .peft import is_peft_prefix_model, patch_peft_model

    if is_peft_prefix_model(model):
        if (num_prefix_tokens is not None or prefix_projection or num_prefixes is not None
                or layers is not None):
            raise ValueError("patching a PEFT model takes the prefix shape from its PrefixTuningConfig; do "
                             "not pass num_prefix_tokens / prefix_projection / num_prefixes / layers")
        return patch_peft_model(model, dtype=dtype, backend=backend,
                                ignore_attention_dropout=ignore_attention_dropout)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError("patch the model before wrapping it in DistributedDataParallel / FSDP")
    if _get_state(model) is not None:
        raise ValueError("this model is already patched by prefixattn (call prefixattn.unpatch first)")
    _check_patch_args(num_prefix_tokens, num_prefixes, dtype, backend, init)
    if init == "text" and init_text is None:
        raise ValueError("init='text' needs init_text (a string with tokenizer=, or token ids)")
    if init != "text" and init_text is not None:
        raise ValueError("init_text is only used with init='text'")
    if init == "text" and prefix_projection:
        raise ValueError("init='text' sets the prefix values directly, which needs prefix_projection=False")

    family = resolve_family(model)
    if not family.tested:
        warnings.warn(f"prefixattn: model family {family.model_type!r} is not in the tested set; it goes "
                      "through the AttentionInterface, so it is patched, but check it against PEFT",
                      stacklevel=2)
    _register()
    state = PatchState(family=family, backend=backend, base_model=model,
                       ignore_attention_dropout=ignore_attention_dropout)
    state.previous_impl = model.config._attn_implementation
    state.previous_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}

    # Attach: tag the attention modules, switch the implementation, hook the base model.
    for module in model.modules():
        if isinstance(getattr(module, "layer_idx", None), int):
            module.__dict__[STATE_ATTR] = state
            state.tagged_modules.append(module)
    model.__dict__[STATE_ATTR] = state
    try:
        base = _find_layers_owner(model, state)
        state.base_model = base
        model.set_attn_implementation(IMPL_NAME)
        if model.config._attn_implementation != IMPL_NAME:
            raise ValueError(f"{type(model).__name__} refused attn_implementation={IMPL_NAME!r}")
        base.__dict__[STATE_ATTR] = state
        base.register_forward_pre_hook(_pre_hook, with_kwargs=True)

        # Probe: one token through the frozen model tells which layers attend, and their (Hkv, D).
        captured = _capture(model, state, [_probe_token(model)])
        if not captured:
            raise ValueError(f"{type(model).__name__}: no attention layer went through the "
                             "AttentionInterface; cannot patch it")
        shapes = {(k.shape[1], k.shape[3]) for k, _ in captured.values()}
        if len(shapes) != 1:
            raise ValueError(f"{type(model).__name__} has layers with different KV shapes {sorted(shapes)}; "
                             "prefixattn needs one (num_kv_heads, head_dim) for all layers")
        (num_kv_heads, head_dim), = shapes
        all_layers = sorted(captured)
        chosen = all_layers if layers is None else _check_layers(layers, all_layers)
        token_dim = num_kv_heads * head_dim
        config = PrefixConfig(
            num_tokens=num_prefix_tokens, num_kv_heads=num_kv_heads, head_dim=head_dim, layers=tuple(chosen),
            num_layers=len(all_layers), num_prefixes=num_prefixes or 1, bank=num_prefixes is not None,
            projection=bool(prefix_projection),
            projection_hidden_size=(projection_hidden_size or token_dim) if prefix_projection else 0,
        )
        for p in model.parameters():
            p.requires_grad_(False)
        prefix = PrefixKV(config, dtype=dtype, device=_input_device(model), init=init)
        model.add_module(MODULE_NAME, prefix)
        state.prefix = prefix
        if init == "text":
            texts = list(init_text) if (num_prefixes and isinstance(init_text, (list, tuple))
                                        and init_text and not isinstance(init_text[0], int)) else None
            if texts is None:
                texts = [init_text] * config.num_prefixes
            elif len(texts) != config.num_prefixes:
                raise ValueError(f"init_text lists {len(texts)} texts for a bank of {config.num_prefixes}")
            _init_from_text(model, state, texts, tokenizer)
        if config.bank:
            _wrap_prepare_inputs(model, state)
        _save_only_the_prefix(model, state)
    except BaseException:
        _detach(model, state)
        raise
    return model


def _check_layers(layers: Sequence[int], all_layers: list[int]) -> list[int]:
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise TypeError(f"layers must be a sequence of layer indices, got {type(layers).__name__}")
    chosen = []
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"layers must hold ints, got {i!r}")
        j = i + len(all_layers) if i < 0 else i
        if j not in all_layers:
            raise ValueError(f"layer {i} does not exist; the model's attention layers are {all_layers}")
        chosen.append(j)
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"layers has duplicates: {list(layers)}")
    if not chosen:
        raise ValueError("layers is empty; at least one layer must carry a prefix")
    return sorted(chosen)


class _PrepareInputsWithPrefixIds:
    """generate() validates its kwargs against ``prepare_inputs_for_generation``'s signature, so this
    instance attribute (removed by unpatch) adds a ``prefix_ids`` parameter; generate then expands the
    ids with the batch (beams, num_return_sequences) and forwards them at every step. It holds the model
    (not a bound method) so that deep copies of the model get their own."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, *args: Any, prefix_ids: torch.Tensor | None = None, **kwargs: Any) -> dict:
        inputs = type(self.model).prepare_inputs_for_generation(self.model, *args, **kwargs)
        if prefix_ids is not None:
            inputs["prefix_ids"] = prefix_ids
        return inputs


def _wrap_prepare_inputs(model: nn.Module, state: PatchState) -> None:
    if getattr(type(model), "prepare_inputs_for_generation", None) is None:
        return
    model.__dict__["prepare_inputs_for_generation"] = _PrepareInputsWithPrefixIds(model)
    state.wrapped_prepare = True


def _save_only_the_prefix(model: nn.Module, state: PatchState) -> None:
    """model.save_pretrained() (and so the HF Trainer's checkpoints) writes the prefix, not the frozen model:
    transformers drops the state-dict keys listed in the instance's ``_keys_to_ignore_on_save``."""
    if not hasattr(model, "_keys_to_ignore_on_save"):
        return
    # (had an instance attribute, its value): restored by unpatch
    state.previous_keys_to_ignore_on_save = ("_keys_to_ignore_on_save" in model.__dict__,
                                             model.__dict__.get("_keys_to_ignore_on_save"))
    frozen = {k for k in model.state_dict() if not k.startswith(MODULE_NAME + ".")}
    model._keys_to_ignore_on_save = set(getattr(model, "_keys_to_ignore_on_save", None) or ()) | frozen



def _remove_hooks(module: nn.Module) -> None:
    for key, fn in list(module._forward_pre_hooks.items()):
        if fn is _pre_hook:
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)


def _detach(model: nn.Module, state: PatchState) -> None:
    _remove_hooks(state.base_model)
    state.base_model.__dict__.pop(STATE_ATTR, None)
    for module in state.tagged_modules:
        module.__dict__.pop(STATE_ATTR, None)
    state.tagged_modules.clear()
    if model.config._attn_implementation == IMPL_NAME and state.previous_impl is not None:
        model.set_attn_implementation(state.previous_impl)
    if MODULE_NAME in model._modules:
        del model._modules[MODULE_NAME]
    if state.wrapped_prepare:
        model.__dict__.pop("prepare_inputs_for_generation", None)
    if state.previous_keys_to_ignore_on_save is not None:
        had, value = state.previous_keys_to_ignore_on_save
        if had:
            model.__dict__["_keys_to_ignore_on_save"] = value
        else:
            model.__dict__.pop("_keys_to_ignore_on_save", None)
    for name, p in model.named_parameters():
        if name in state.previous_requires_grad:
            p.requires_grad_(state.previous_requires_grad[name])
    model.__dict__.pop(STATE_ATTR, None)
    state.step = None


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``patch``: restore the previous attention implementation and requires_grad flags, remove the
    prefix module and hooks. Returns the model."""
    state = _get_state(model)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not patched by prefixattn")
    _detach(model, state)
    return model


class _CallableModule(types.ModuleType):
    """``prefixattn.patch`` names both this module and the function: importing the submodule rebinds the
    package attribute to the module, so the module itself forwards calls to ``patch()``."""

    def __call__(self, *args: Any, **kwargs: Any) -> nn.Module:
        return patch(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
