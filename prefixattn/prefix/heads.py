"""The task head that trains with the prefix: PEFT's ``modules_to_save`` for its SEQ_CLS, TOKEN_CLS and
QUESTION_ANS models (a classifier on an encoder is random until trained, so it is part of what a run
learns). The patcher records the head's module paths on the ``PrefixKV`` (``PrefixKV.heads``); here its
tensors are gathered for a file and checked and copied back, under two naming schemes:

- prefixattn's file: ``head.<module path>.<parameter>`` next to the prefix tensors;
- PEFT's adapter file: ``base_model.<module path>.<parameter>`` (what PEFT writes for modules_to_save).

Duck-typed: no transformers import.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .module import PrefixKV, active_copy

NATIVE_PREFIX = "head."
PEFT_PREFIX = "base_model."


def head_modules(owner: nn.Module, prefix: PrefixKV) -> dict[str, nn.Module]:
    """module path -> the head module the model runs (PEFT's active copy where PEFT wraps it)."""
    return {path: active_copy(owner.get_submodule(path)) for path in prefix.heads}


def head_tensors(owner: nn.Module, prefix: PrefixKV, key_prefix: str) -> dict[str, torch.Tensor]:
    """The head's parameters and buffers, detached, as ``key_prefix + path + "." + name``."""
    out = {}
    for path, module in head_modules(owner, prefix).items():
        for name, t in module.state_dict().items():
            out[f"{key_prefix}{path}.{name}"] = t.detach()
    return out


def head_problems(owner: nn.Module, prefix: PrefixKV, tensors: dict[str, torch.Tensor],
                  key_prefix: str) -> list[str]:
    """Why ``tensors`` (the head's, under ``key_prefix``) cannot be loaded into the model's head."""
    expected = head_tensors(owner, prefix, key_prefix)
    problems = []
    if set(tensors) != set(expected):
        problems.append(f"head tensors {sorted(tensors)}, the model's task head {list(prefix.heads)} has "
                        f"{sorted(expected)}")
        return problems
    for key, t in tensors.items():
        if tuple(t.shape) != tuple(expected[key].shape):
            problems.append(f"{key} has shape {tuple(t.shape)}, the model's {tuple(expected[key].shape)}")
        elif t.is_floating_point() and not torch.isfinite(t).all():
            problems.append(f"{key} has non-finite values")
    return problems


@torch.no_grad()
def load_head_tensors(owner: nn.Module, prefix: PrefixKV, tensors: dict[str, torch.Tensor],
                      key_prefix: str) -> None:
    """Copy checked head tensors (``head_problems`` is empty) into the model's head."""
    for path, module in head_modules(owner, prefix).items():
        state = module.state_dict(keep_vars=True)
        for name, target in state.items():
            target.copy_(tensors[f"{key_prefix}{path}.{name}"].to(device=target.device, dtype=target.dtype))
