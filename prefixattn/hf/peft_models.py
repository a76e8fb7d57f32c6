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
    PEFT_PREFIX,
    check_adapter_for,
    check_against_peft_config,
    check_prefix_id,
    find_prefix,
    find_prefix_owner,
    head_problems,
    load_head_tensors,
    peft_format_problems,
    peft_rows_to_kv,
    read_peft_adapter,
)
from .cartridges import kind_of_peft
from .patcher import is_patched, patch_model, unpatch
from .roles import infer_head_shapes

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
    other carries over the prefix values themselves (a cartridge's frozen tokens into its frozen part). An
    encoder-decoder (SEQ_2_SEQ_LM) gets PEFT's layout (``sites="decoder"``); a SEQ_CLS / TOKEN_CLS /
    QUESTION_ANS model keeps the task head PEFT trains (its modules_to_save copy, which the model runs).
    """
    config = peft_model.active_peft_config
    if _peft_type_name(config.peft_type) not in PEFT_PREFIX_TYPES:
        raise ValueError(f"prefixattn.patch takes PEFT prefix-tuning and cartridge models; this one is "
                         f"{_peft_type_name(config.peft_type)}")
    task = _peft_type_name(config.task_type) or "CAUSAL_LM"
    if (config.num_transformer_submodules or 1) != (2 if task == "SEQ_2_SEQ_LM" else 1):
        raise ValueError(f"a PEFT {task} prefix-tuning model with num_transformer_submodules="
                         f"{config.num_transformer_submodules} is not one PEFT makes")
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
        if module.peft_layout.task_type != task and task != "CAUSAL_LM":
            raise ValueError(f"the PEFT model is a {task} model; PEFT's task type for "
                             f"{type(base).__name__} is {module.peft_layout.task_type}")
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
                           "layers", "init", "init_text", "tokenizer", "sites", "cartridge",
                           "num_frozen_tokens"})


def load_peft(model: nn.Module, adapter_directory: str | os.PathLike, *, prefix_id: int | None = None,
              **patch_kwargs: Any) -> nn.Module:
    """Load a PEFT prefix-tuning or cartridge adapter (from PEFT or ``save_peft``) into ``model``; returns
    the model to use. CAUSAL_LM, SEQ_2_SEQ_LM (PEFT's layout on an encoder-decoder), SEQ_CLS, TOKEN_CLS,
    QUESTION_ANS (the saved task head is loaded too) and FEATURE_EXTRACTION adapters.

    An unpatched model is patched with the adapter's shape (a CARTRIDGE adapter as a cartridge with its
    ``num_frozen_tokens``) (``patch_kwargs`` such as ``backend`` or
    ``dtype`` pass through); a patched one must match it (for a bank, ``prefix_id`` picks the entry to
    fill). The adapter is validated against the model before anything changes.
    """
    if is_peft_prefix_model(model):
        raise TypeError("load_peft loads an adapter into a transformers model; this is already a PEFT model "
                        "(patch it with prefixattn.patch(peft_model) instead)")
    cfg, emb, head = read_peft_adapter(adapter_directory)
    patched_here = not is_patched(model)
    if not patched_here:
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
        if (cfg.get("task_type") or "CAUSAL_LM") == "SEQ_2_SEQ_LM":
            patch_kwargs = {**patch_kwargs, "sites": "decoder"}
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
    owner, module = find_prefix_owner(model)
    problems = head_problems(owner, module, head, PEFT_PREFIX)
    if problems:
        if patched_here:
            unpatch(model)
        raise ValueError(f"PEFT adapter {str(adapter_directory)!r} does not match the model's task head: "
                         + "; ".join(problems))
    single = module.config.single_entry()
    module.set_values(peft_rows_to_kv(emb.to(module.kv.dtype), single), prefix_id)
    load_head_tensors(owner, module, head, PEFT_PREFIX)
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
