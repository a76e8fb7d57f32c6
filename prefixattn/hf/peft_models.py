"""PEFT models on the transformers side: patching a PEFT PrefixTuning model (the same prefix carried over
to prefixattn), and ``load_peft`` (a PEFT adapter directory into a model, patching it when needed).

The adapter file format itself lives in the prefix layer (``prefixattn.prefix.peft_format``).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn as nn

from ..prefix import (
    check_adapter_for,
    check_against_peft_config,
    check_prefix_id,
    find_prefix,
    peft_format_problems,
    peft_rows_to_kv,
    read_peft_adapter,
)
from .cartridges import kind_of_peft
from .patcher import is_patched, patch_model, unpatch

# PEFT's KV-prefix methods, which patch(peft_model) converts
PEFT_PREFIX_TYPES = ("PREFIX_TUNING", "CARTRIDGE")


def is_peft_prefix_model(model: Any) -> bool:
    """True for a ``peft.PeftModel`` (any subclass); False without importing peft otherwise."""
    if not type(model).__module__.startswith("peft"):
        return False
    try:
        from peft import PeftModel  # optional dependency: only imported when a PEFT object is seen
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _peft_type_name(value: Any) -> str:
    return getattr(value, "value", value)


def patch_peft_model(peft_model: nn.Module, *, dtype: torch.dtype = torch.float32, backend: str = "auto",
                     ignore_attention_dropout: bool = False) -> nn.Module:
    """Patch the base model of a PEFT PrefixTuning or Cartridge model with the same prefix; returns the base
    model.

    A trainable PEFT model with ``prefix_projection`` keeps its embedding + MLP (copied, trainable); any
    other carries over the prefix values themselves (a cartridge's frozen tokens into its frozen part).
    """
    config = peft_model.active_peft_config
    if _peft_type_name(config.peft_type) not in PEFT_PREFIX_TYPES:
        raise ValueError(f"prefixattn.patch takes PEFT prefix-tuning and cartridge models; this one is "
                         f"{_peft_type_name(config.peft_type)}")
    if (config.num_transformer_submodules or 1) != 1:
        raise ValueError("PEFT prefix tuning with num_transformer_submodules != 1 (encoder-decoder) is "
                         "not supported")
    encoder = peft_model.prompt_encoder[peft_model.active_adapter]
    base = peft_model.get_base_model()
    projection = bool(getattr(config, "prefix_projection", False) and not config.inference_mode)
    heads = config.num_attention_heads
    model = patch_model(base, num_prefix_tokens=config.num_virtual_tokens, prefix_projection=projection,
                        projection_hidden_size=config.encoder_hidden_size if projection else None,
                        dtype=dtype, backend=backend, ignore_attention_dropout=ignore_attention_dropout,
                        init="zeros", adapter_shape=(heads, config.token_dim // heads),
                        **kind_of_peft(config.peft_type, config))
    module = find_prefix(model)
    try:
        check_against_peft_config(module.config, config, "the PEFT model")
        problems = peft_format_problems(model)
        if problems:
            raise ValueError("the PEFT model does not match the model: " + "; ".join(problems))
        if projection and len(module.config.layers) != module.config.num_layers:
            raise ValueError("the PEFT model's MLP-reparameterized prefix covers all "
                             f"{module.config.num_layers} layers but PEFT gives only layers "
                             f"{list(module.config.layers)} a prefix; "
                             "patch a merged prefix (PeftModel with inference_mode=True) instead")
    except BaseException:
        unpatch(model)
        raise
    with torch.no_grad():
        if projection:
            module.embedding.weight.copy_(encoder.embedding.weight)
            module.transform.load_state_dict(encoder.transform.state_dict())
        else:
            rows = encoder.embedding.weight[: config.num_virtual_tokens]  # a cartridge's: frozen rows first
            module.set_values(peft_rows_to_kv(rows.detach().to(module.kv.dtype), module.config))
    return model


# patch() arguments that fix the prefix's shape or values: load_peft takes those from the adapter
_SHAPE_KWARGS = frozenset({"num_prefix_tokens", "num_prefixes", "prefix_projection", "projection_hidden_size",
                           "layers", "init", "init_text", "tokenizer", "cartridge", "num_frozen_tokens"})


def load_peft(model: nn.Module, adapter_directory: str | os.PathLike, *, prefix_id: int | None = None,
              **patch_kwargs: Any) -> nn.Module:
    """Load a PEFT prefix-tuning or cartridge adapter (from PEFT or ``save_peft``) into ``model``; returns
    the model to use.

    An unpatched model is patched with the adapter's shape (a CARTRIDGE adapter as a cartridge with its
    ``num_frozen_tokens``) (``patch_kwargs`` such as ``backend`` or
    ``dtype`` pass through); a patched one must match it (for a bank, ``prefix_id`` picks the entry to
    fill). The adapter is validated against the model before anything changes.
    """
    if is_peft_prefix_model(model):
        raise TypeError("load_peft loads an adapter into a transformers model; this is already a PEFT model "
                        "(patch it with prefixattn.patch(peft_model) instead)")
    cfg, emb = read_peft_adapter(adapter_directory)
    if is_patched(model):
        if patch_kwargs:
            raise ValueError(f"the model is already patched; {sorted(patch_kwargs)} only apply when "
                             "load_peft patches an unpatched model")
        module = find_prefix(model)
        check_adapter_for(module, cfg, str(adapter_directory))
    else:
        if prefix_id is not None:
            raise ValueError("prefix_id selects a bank entry of an already patched model")
        shape_kwargs = sorted(_SHAPE_KWARGS & set(patch_kwargs))
        if shape_kwargs:
            raise ValueError("load_peft patches an unpatched model with the adapter's own shape; "
                             f"{shape_kwargs} cannot be set here. To load an adapter into a bank entry, "
                             "patch first (prefixattn.patch(model, num_prefix_tokens=P, num_prefixes=N)), "
                             "then load_peft(model, directory, prefix_id=i)")
        _precheck_unpatched(model, cfg, str(adapter_directory))
        heads = cfg["num_attention_heads"]
        model = patch_model(model, num_prefix_tokens=cfg["num_virtual_tokens"], init="zeros",
                            adapter_shape=(heads, cfg["token_dim"] // heads),
                            **kind_of_peft(cfg["peft_type"], cfg), **patch_kwargs)
        module = find_prefix(model)
        try:
            check_adapter_for(module, cfg, str(adapter_directory))
        except BaseException:
            unpatch(model)  # leave the model as it came
            raise
    check_prefix_id(prefix_id, module.config)
    if module.config.bank and prefix_id is None:
        raise ValueError(f"the model has a bank of {module.config.num_prefixes} prefixes: pass prefix_id to "
                         "choose the entry to fill")
    single = module.config.single_entry()
    module.set_values(peft_rows_to_kv(emb.to(module.kv.dtype), single), prefix_id)
    return model


def _precheck_unpatched(model: nn.Module, cfg: dict[str, Any], where: str) -> None:
    """Cheap config-level check before patching (the probe in patch() gives the exact shapes)."""
    mc = getattr(model, "config", None)
    if mc is None:
        return
    layers = getattr(mc, "num_hidden_layers", None) or getattr(mc, "n_layer", None)
    problems = []
    if layers is not None and layers != cfg["num_layers"]:
        problems.append(f"num_layers: adapter has {cfg['num_layers']}, model has {layers}")
    shapes = infer_head_shapes(mc)
    if shapes is not None:
        hkv, d = shapes
        if cfg["num_attention_heads"] != hkv:
            problems.append(f"num_attention_heads (KV heads): adapter has {cfg['num_attention_heads']}, "
                            f"model has {hkv}")
        if cfg["token_dim"] != hkv * d:
            problems.append(f"token_dim (KV heads x head dim): adapter has {cfg['token_dim']}, "
                            f"model has {hkv * d}")
    if problems:
        raise ValueError(f"PEFT adapter {where!r} does not match the model: " + "; ".join(problems))


def infer_head_shapes(config: Any) -> tuple[int, int] | None:
    """(Hkv, D) from a transformers config, or None if it does not say or the layers differ (Gemma 4's
    per-layer configs; a probe forward decides)."""
    try:
        return _uniform_head_shapes(config)
    except AttributeError:
        return None
    except Exception as e:  # transformers' AmbiguousGlobalPerLayerAttributeError: the layers differ
        if type(e).__name__ == "AmbiguousGlobalPerLayerAttributeError":
            return None
        raise


def _uniform_head_shapes(config: Any) -> tuple[int, int] | None:
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    if heads is None:
        return None
    kv = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if hidden else None)
    if head_dim is None:
        return None
    return int(kv), int(head_dim)
