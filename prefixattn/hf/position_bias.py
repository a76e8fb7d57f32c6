"""T5's learned relative position bias with a prefix (T5, mT5, UMT5, Switch Transformers, LongT5's decoder,
Pop2Piano, ...).

T5-style attention adds a learned bias to its scores and hands it to the attention function as
``position_bias`` (1, H, Sq, Sk): ``compute_bias(Sq, Sk, past_seen_tokens=past)`` looks up a per-head table
at buckets of the relative position ``j - (past + i)`` (bidirectional buckets in the encoder, causal ones
in the decoder). Layer 0 of each stack owns the table and computes the bias once; the other layers reuse it
(UMT5: every layer owns a table of its own). Cross-attention owns none: T5 hands it zeros.

PEFT's prefix is a KV cache of length P, so its prefix sits at positions 0..P-1 and query i at
P + past + i: its bias is ``compute_bias(Sq, P + Sk, past_seen_tokens=P + past)``. The first P columns
are the prefix's; the others equal the bias without a prefix (the relative positions are the same).

prefixattn makes the model compute exactly that: ``compute_bias`` of every module that owns a table, in a
role whose attention carries a prefix, is replaced on the instance by one that counts the prefix in (P
more keys, P more past tokens). The bias every layer receives then has the prefix's columns already, in
the layout of the op's ``score_bias`` (column p: prefix slot p; P + j: key j), computed once per step per
table: once per stack for T5, once per layer for UMT5; no per-layer concatenation.

``sites="all"``: the encoder's prefix is placed the same way, before the sequence (buckets of p - P - i,
bidirectional), and decoder self-attention's as PEFT places it. Cross-attention's prefix gets bias 0, as
cross-attention has no position bias in T5 (its bias is all zeros, which the attention function drops
rather than add). Roles without a prefix (the encoder with ``sites="decoder"``) keep their bias as it is.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn

# on a T5-style attention module whose position bias is zeros by construction (no module of its role owns
# a table: cross-attention): the attention function drops it
ZERO_BIAS_ATTR = "_prefixattn_zero_bias"
_WRAPPER_NAME = "compute_bias"


def is_t5_attention(module: nn.Module) -> bool:
    """A T5-style attention module: it may own a bias table (``has_relative_attention_bias``) and computes
    its bias with ``compute_bias(query_length, key_length, device, past_seen_tokens)``."""
    if not isinstance(getattr(module, "has_relative_attention_bias", None), bool):
        return False
    compute = getattr(type(module), _WRAPPER_NAME, None)
    if not callable(compute):
        return False
    try:
        params = inspect.signature(compute).parameters
    except (TypeError, ValueError):
        return False
    return all(name in params for name in ("query_length", "key_length", "past_seen_tokens"))


class ComputeBiasWithPrefix:
    """A T5-style module's ``compute_bias`` with the prefix counted in (see the module docstring). An object
    rather than a closure, so that a deep copy of the model computes with its own copy of the module."""

    def __init__(self, module: nn.Module, state: Any) -> None:
        self.module = module
        self.state = state  # the PatchState

    def __call__(self, query_length: int, key_length: int, device: Any = None,
                 past_seen_tokens: Any = 0) -> torch.Tensor:
        module, state = self.module, self.state
        # the shape probe runs the frozen model without its prefix
        prefix = 0 if state.capture is not None else state.num_tokens
        return type(module).compute_bias(module, query_length, prefix + key_length, device=device,
                                         past_seen_tokens=prefix + past_seen_tokens)


def attach_position_bias(modules_by_role: dict[str, list[nn.Module]], prefixed_roles: set[str],
                         state: Any) -> list[nn.Module]:
    """Make the T5-style attention of every role in ``prefixed_roles`` compute its bias with the prefix's
    columns, and mark the roles whose bias is zeros (no module owns a table). Returns the modules changed
    (``detach_position_bias`` undoes it)."""
    changed = []
    for role, modules in modules_by_role.items():
        t5 = [m for m in modules if is_t5_attention(m)]
        if not t5:
            continue
        owners = [m for m in t5 if m.has_relative_attention_bias]
        if not owners:  # cross-attention: T5 hands over zeros
            for m in t5:
                m.__dict__[ZERO_BIAS_ATTR] = True
                changed.append(m)
        elif role in prefixed_roles:
            for m in owners:
                m.__dict__[_WRAPPER_NAME] = ComputeBiasWithPrefix(m, state)
                changed.append(m)
    return changed


def detach_position_bias(modules: list[nn.Module]) -> None:
    for module in modules:
        module.__dict__.pop(ZERO_BIAS_ATTR, None)
        if isinstance(module.__dict__.get(_WRAPPER_NAME), ComputeBiasWithPrefix):
            del module.__dict__[_WRAPPER_NAME]


def layer_score_bias(module: nn.Module, position_bias: torch.Tensor | None, prefix_length: int,
                     key_length: int) -> torch.Tensor | None:
    """The op's ``score_bias`` for one attention call of a T5-style module: its ``position_bias`` as it came
    (with the prefix's columns when the module's role carries a prefix), or None where it is zeros."""
    if position_bias is None or module.__dict__.get(ZERO_BIAS_ATTR):
        return None
    if position_bias.shape[-1] != prefix_length + key_length:
        raise RuntimeError(
            f"prefixattn: {type(module).__name__} got a position bias over {position_bias.shape[-1]} keys, "
            f"but it attends over {prefix_length} prefix slots and {key_length} keys; the module that "
            "computes its bias was not prepared for the prefix")
    if position_bias.requires_grad and position_bias.is_leaf:
        # a constant that asks for a gradient only to pass through gradient checkpointing (T5's zeros)
        position_bias = position_bias.detach()
    return position_bias
