"""The prefix next to PEFT tuners (LoRA, ...): which prefix module a step reads, and refusing a prefix
that PEFT froze.

PEFT may put its ``ModulesToSaveWrapper`` around the prefix module (``modules_to_save=["prefixattn_prefix"]``,
which is how ``patch(lora_model)`` registers the prefix so that PEFT's adapter file carries it): the model
must then read the wrapper's copy of the active adapter, never the frozen original, so the prefix is
looked up once per step (in the pre-hook) rather than kept from patch time. ``merge_and_unload`` puts
the trained copy back in the wrapper's place: that is read too.

``get_peft_model(patched_model, LoraConfig(...))`` without modules_to_save freezes the prefix (PEFT marks
only its adapter weights trainable) and its adapter file would not carry it: a training step then
stops with the order that works, instead of training a silently frozen prefix.
"""

from __future__ import annotations

import torch.nn as nn

from ..prefix import MODULE_NAME, PrefixKV, active_copy
from .state import PatchState

ORDER_HINT = (
    "Build the PEFT model first and patch it: model = prefixattn.patch(get_peft_model(base, "
    "LoraConfig(...)), num_prefix_tokens=P) (LoRA weights and prefix both train, and PEFT's "
    "save_pretrained / the Trainer's checkpoints carry both); or pass modules_to_save=['prefixattn_prefix'] "
    "in the LoraConfig"
)


def has_peft_tuner_layers(model: nn.Module) -> bool:
    """Whether PEFT injected tuner layers (LoRA, IA3, ...) into ``model``; duck-typed on PEFT's modules."""
    return any(type(m).__module__.startswith("peft.tuners.") for m in model.modules())


def is_wrapper(module: nn.Module | None) -> bool:
    return module is not None and active_copy(module) is not module


def active_prefix(state: PatchState, training: bool) -> PrefixKV:
    """The prefix module this step reads (the active adapter's copy when PEFT wraps it).

    ``training``: the model is in training mode with gradients enabled; then a prefix that cannot train
    because of PEFT (frozen by ``get_peft_model``, or wrapped with no copy for the active adapter) is a
    ValueError naming the order that works.
    """
    held = state.owner._modules.get(MODULE_NAME) if state.owner is not None else state.prefix
    prefix = active_copy(held)
    if not isinstance(prefix, PrefixKV):
        raise RuntimeError(f"prefixattn: the model's {MODULE_NAME!r} submodule was removed or replaced by "
                           f"{type(held).__name__}; patch the model again (prefixattn.patch)")
    if training and not any(p.requires_grad for p in prefix.parameters()):
        if held is prefix and has_peft_tuner_layers(state.owner):
            raise ValueError(
                "prefixattn: the prefix is frozen: get_peft_model() was applied to a prefixattn-patched "
                "model, and PEFT marks only its own adapter weights trainable (its save_pretrained would not "
                f"save the prefix either). {ORDER_HINT}"
            )
        if prefix is getattr(held, "original_module", None) and not getattr(held, "disable_adapters", False):
            raise ValueError(
                f"prefixattn: PEFT wraps the prefix, but the active adapter {list(held.active_adapters)} has "
                "no copy of it (the prefix was registered for another adapter), so training would read the "
                "frozen original. Patch the PEFT model while the adapter you train is active"
            )
    return prefix
