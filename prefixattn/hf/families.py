"""Which transformers model families the patcher supports, and how each numbers its positions.

A family is supported when its attention layers call transformers' ``AttentionInterface`` (so the
patcher can plug in without touching any ``forward``). Families with their own attention code
(Falcon, Bloom, GPT-J, DeBERTa, ...) are refused with an error that names the verified families of the
same kind. Which families are verified, and how, is ``verified_families.py`` (the family sweeps' tables,
which the README's lists are generated from): any other family is patched with a warning.

Positions follow PEFT prefix tuning, which passes the prefix as a KV cache of length P: the
sequence is numbered from P. Most families number positions ``arange(S) + past``; OPT numbers them
from the cumulative sum of the attention mask, so its rule is different (``"mask_cumsum"``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch.nn as nn

from .position_bias import is_t5_attention
from .verified_families import Kind, is_verified, listed_kinds, verified_families

PositionRule = Literal["arange", "mask_cumsum"]

POSITION_RULES: dict[str, PositionRule] = {"opt": "mask_cumsum"}

# Known to keep their own attention code (no AttentionInterface): refused by name.
OWN_ATTENTION_FAMILIES = ("falcon", "bloom", "gptj", "gpt_neo", "codegen", "mpt")

KIND_NAMES: dict[str, str] = {"causal": "causal-LM", "encoder": "encoder", "seq2seq": "encoder-decoder"}


@dataclass(frozen=True)
class Family:
    model_type: str
    positions: PositionRule = "arange"


def _uses_attention_interface(model: nn.Module) -> bool:
    """transformers' own heuristic (PreTrainedModel._can_set_attn_implementation): the modeling file
    routes attention through ``ALL_ATTENTION_FUNCTIONS.get_interface``."""
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    if can_set is None:
        return False
    try:
        return bool(can_set())
    except Exception:
        return False


def _kind_from_config(model: nn.Module) -> Kind:
    """The kind of a model whose attention prefixattn cannot see (``sites.model_kind`` needs attention
    modules that call the interface): from its config and class, for the families a refusal names."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    name = type(model).__name__
    if getattr(config, "is_decoder", False) or "ForCausalLM" in name or "LMHead" in name:
        return "causal"
    return "encoder" if "encoder" in listed_kinds(config.model_type) else "causal"


def _verified_names(kind: Kind) -> str:
    names = verified_families(kind)
    return f"{len(names)} verified {KIND_NAMES[kind]} families: {', '.join(names)}"


def resolve_family(model: nn.Module) -> Family:
    """The family of a transformers model, or a ValueError that says why it cannot be patched."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "model_type"):
        raise TypeError(
            f"prefixattn.patch expects a transformers PreTrainedModel (or a PEFT PrefixTuning model), "
            f"got {type(model).__name__}"
        )
    model_type = config.model_type
    if model_type in OWN_ATTENTION_FAMILIES or not _uses_attention_interface(model):
        kind = _kind_from_config(model)
        raise ValueError(
            f"{type(model).__name__} ({model_type}) has its own attention code that does not go through "
            f"transformers' AttentionInterface, so prefixattn cannot plug into it. Supported: the "
            f"{_verified_names(kind)} (other families whose attention uses the AttentionInterface are "
            "accepted with a warning)"
        )
    reason = unsupported_attention(model)
    if reason is not None:
        raise ValueError(f"{type(model).__name__} ({model_type}) cannot be prefix-tuned by prefixattn: "
                         f"{reason}")
    return Family(model_type, positions=POSITION_RULES.get(model_type, "arange"))


def warn_if_not_verified(model_type: str, kind: Kind, stacklevel: int) -> None:
    """A warning for a family the family sweep has not verified as this kind of model (a family newer
    than the sweep's tables, or one verified only as another kind: a causal LM used as an encoder)."""
    if is_verified(model_type, kind):
        return
    others = [KIND_NAMES[k] for k in listed_kinds(model_type) if is_verified(model_type, k)]
    where = (f"it is verified as {' and '.join(others)} only" if others else
             "the family sweep's tables do not list it (a family newer than them?)")
    warnings.warn(f"prefixattn: {model_type!r} is not among the families verified as {KIND_NAMES[kind]} "
                  f"models ({where}); its attention goes through the AttentionInterface, so it is patched, "
                  "but check it against PEFT", stacklevel=stacklevel + 1)


# Attention layers that go through the AttentionInterface but give its arguments a meaning of their own
# (found by the family sweep, tests/hf/test_family_sweep.py): a prefix there would be silently wrong.
def unsupported_attention(model: nn.Module) -> str | None:
    """Why the model's attention cannot take a prefix, or None."""
    for module in model.modules():
        if not isinstance(getattr(module, "layer_idx", None), int):
            continue
        if isinstance(getattr(module, "indexer", None), nn.Module):
            return ("its sparse attention has a learned key indexer (DeepSeek Sparse Attention style) that "
                    "chooses which sequence keys each query sees; a prefix has no place in that selection")
        if isinstance(getattr(module, "compressor", None), nn.Module):
            return ("its compressed sparse attention (DeepSeek V4 style) attends over compressed key blocks "
                    "of its own; a prefix has no place there")
        if (getattr(module, "has_relative_attention_bias", None) is not None or isinstance(
                getattr(module, "relative_attention_bias", None), nn.Module)) and not is_t5_attention(module):
            return ("its attention adds a learned relative position bias to the scores that is not T5's "
                    "(T5's compute_bias(query_length, key_length, past_seen_tokens), whose columns for the "
                    "prefix prefixattn computes): prefixattn cannot place the prefix in it")
        if hasattr(module, "lambda_q1") and hasattr(module, "lambda_init"):
            return ("differential attention (DiffLlama) calls the attention function on split value heads "
                    "and subtracts two softmaxes; a prefix would enter both with a different meaning")
    return None
