"""A prefix next to a PEFT tuner (LoRA and the other weight tuners) on one model, which PEFT itself
cannot combine: ``prefixattn.patch(lora_model, num_prefix_tokens=P)``.

The transformers model inside the PeftModel is patched, keeping the flags PEFT set (adapter weights
trainable, base frozen), and the prefix module is registered through PEFT's own ``modules_to_save``
mechanism for the active adapter: PEFT wraps it, trains the active adapter's copy (which the per-step
plan reads, ``adapters.py``), and its adapter file carries it, so ``save_pretrained``, the HF
Trainer's checkpoints and their resumption (``load_adapter``) keep LoRA and prefix together.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from ..prefix import MODULE_NAME
from .adapters import ORDER_HINT
from .patcher import InitKind, detach, patch_model
from .state import get_state

# Tuners that replace the attention forward or route whole layers themselves: the prefix cannot be
# placed under them.
_REFUSED = {
    "ADAPTION_PROMPT": "it replaces the attention forward with its own",
    "XLORA": "it runs the model twice per step through its own classifier hooks",
}


def peft_type_name(config: Any) -> str:
    value = config.peft_type
    return str(getattr(value, "value", value))


def check_tuner_config(config: Any) -> None:
    """Refuse PEFT methods the prefix cannot sit next to, with the reason."""
    name = peft_type_name(config)
    if getattr(config, "is_prompt_learning", False):
        raise ValueError(f"prefixattn.patch cannot add a prefix to a PEFT {name} model: prompt-learning "
                         "methods (prompt tuning, p-tuning, ...) change the inputs themselves. PEFT "
                         "PREFIX_TUNING models are converted by prefixattn.patch(peft_model) without "
                         "arguments")
    if name in _REFUSED or getattr(config, "is_adaption_prompt", False):
        raise ValueError(f"prefixattn.patch cannot add a prefix to a PEFT {name} model: "
                         f"{_REFUSED.get(name, 'it replaces the attention forward')}. Weight tuners such as "
                         "LORA work")


def patch_tuner_model(
    peft_model: nn.Module,
    num_prefix_tokens: int | None,
    *,
    sites: str | None = None,
    prefix_projection: bool = False,
    projection_hidden_size: int | None = None,
    num_prefixes: int | None = None,
    layers: Sequence[int] | None = None,
    init: InitKind = "random",
    init_text: Any = None,
    tokenizer: Any = None,
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    ignore_attention_dropout: bool = False,
    cartridge: bool = False,
    num_frozen_tokens: int | None = None,
) -> nn.Module:
    """Add a trainable prefix to a PEFT tuner model (LoRA, ...); returns the same PeftModel."""
    from peft.utils import _set_trainable  # optional dependency: a PEFT object is in hand

    adapter = peft_model.active_adapter
    if not isinstance(adapter, str):
        raise ValueError(f"the PEFT model has several active adapters {adapter}; activate the one to train "
                         "with the prefix (peft_model.set_adapter(name)) and patch again")
    config = peft_model.peft_config[adapter]
    check_tuner_config(config)
    if not hasattr(config, "modules_to_save"):
        raise ValueError(f"PEFT {peft_type_name(config)} has no modules_to_save, through which the prefix is "
                         "trained and saved with the adapter")
    base = peft_model.get_base_model()
    if get_state(base) is not None:
        raise ValueError("this model is already patched by prefixattn (call prefixattn.unpatch first); a "
                         "model patched before get_peft_model() carries a prefix PEFT does not train. "
                         f"{ORDER_HINT}")
    patch_model(base, num_prefix_tokens, sites=sites, prefix_projection=prefix_projection,
                projection_hidden_size=projection_hidden_size, num_prefixes=num_prefixes, layers=layers,
                init=init, init_text=init_text, tokenizer=tokenizer, dtype=dtype, backend=backend,
                ignore_attention_dropout=ignore_attention_dropout, peft_tuner=True, cartridge=cartridge,
                num_frozen_tokens=num_frozen_tokens)
    previous = config.modules_to_save
    try:
        if MODULE_NAME not in (previous or ()):
            config.modules_to_save = [*(previous or ()), MODULE_NAME]
        wrapped = _set_trainable(peft_model, adapter, [MODULE_NAME], inference_mode=config.inference_mode)
        if not wrapped:
            raise RuntimeError("PEFT did not wrap the prefix module for its adapter")
    except BaseException:
        config.modules_to_save = previous
        detach(base, get_state(base))
        raise
    return peft_model


def unpatch_tuner_model(peft_model: nn.Module) -> nn.Module:
    """Remove the prefix from a PEFT tuner model patched by ``patch_tuner_model``; returns it."""
    base = peft_model.get_base_model()
    state = get_state(base)
    if state is None:
        raise ValueError(f"{type(peft_model).__name__} is not patched by prefixattn")
    detach(base, state)
    for config in peft_model.peft_config.values():
        names = getattr(config, "modules_to_save", None)
        if names and MODULE_NAME in names:
            config.modules_to_save = [n for n in names if n != MODULE_NAME] or None
    return peft_model
