"""Which transformers model families the patcher supports, and how each numbers its positions.

A family is supported when its attention layers call transformers' ``AttentionInterface`` (so the
patcher can plug in without touching any ``forward``). Families with their own attention code
(Falcon, Bloom, GPT-J, ...) are refused with an error that names the supported ones.

Positions follow PEFT prefix tuning, which passes the prefix as a KV cache of length P: the
sequence is numbered from P. Most families number positions ``arange(S) + past``; OPT numbers them
from the cumulative sum of the attention mask, so its rule is different (``"mask_cumsum"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.nn as nn

from .position_bias import is_t5_attention

PositionRule = Literal["arange", "mask_cumsum"]


@dataclass(frozen=True)
class Family:
    model_type: str
    positions: PositionRule = "arange"
    tested: bool = True


# Families with tests against PEFT prefix tuning (tests/hf/test_patch_peft_parity.py; Gemma 3's text model
# in tests/hf/test_sliding_window.py).
TESTED_FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama"),
        Family("mistral"),
        Family("qwen2"),
        Family("qwen3"),
        Family("gemma"),
        Family("gemma2"),
        Family("gemma3_text"),
        Family("phi3"),
        Family("gpt2"),
        Family("gpt_neox"),
        Family("opt", positions="mask_cumsum"),
    )
}

# Known to keep their own attention code (no AttentionInterface): refused by name.
OWN_ATTENTION_FAMILIES = ("falcon", "bloom", "gptj", "gpt_neo", "codegen", "mpt")


def supported_names() -> str:
    return ", ".join(sorted(TESTED_FAMILIES))


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
        raise ValueError(
            f"{type(model).__name__} ({model_type}) has its own attention code that does not go through "
            f"transformers' AttentionInterface, so prefixattn cannot plug into it. Supported families: "
            f"{supported_names()} (other families whose attention uses the AttentionInterface are "
            "accepted with a warning)"
        )
    reason = unsupported_attention(model)
    if reason is not None:
        raise ValueError(f"{type(model).__name__} ({model_type}) cannot be prefix-tuned by prefixattn: "
                         f"{reason}")
    if model_type in TESTED_FAMILIES:
        return TESTED_FAMILIES[model_type]
    return Family(model_type, positions="arange", tested=False)


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
