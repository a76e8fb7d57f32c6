"""``prefixattn.patch``: one entry point for a transformers model or a PEFT PrefixTuning model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from .patcher import InitKind, patch_model
from .patcher import unpatch as unpatch_model
from .peft_models import PEFT_PREFIX_TYPES, is_peft_prefix_model, patch_peft_model
from .peft_tuners import check_tuner_config, patch_tuner_model, peft_type_name, unpatch_tuner_model


def patch(
    model: nn.Module,
    num_prefix_tokens: int | None = None,
    *,
    sites: str | None = None,
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
    cartridge: bool = False,
    num_frozen_tokens: int | None = None,
) -> nn.Module:
    """Prefix-tune a Hugging Face model (a causal LM, an encoder with or without a task head, an
    encoder-decoder) with the fused prefix attention; returns the model to use.

    Every base parameter is frozen; the prefix is added as ordinary parameters in the submodule
    ``model.prefixattn_prefix`` (so ``model.parameters()`` / optimizers / DDP / Trainer see it).

    Args:
        model: a transformers model whose attention goes through the AttentionInterface (Llama, Mistral,
            Qwen2/3, Gemma 1/2, Phi-3, GPT-2, GPT-NeoX, OPT, ...); a PEFT ``PeftModel`` with a
            PREFIX_TUNING or CARTRIDGE adapter (the same prefix is carried over, a cartridge's frozen
            tokens stay frozen; the base model is returned patched);
            or a PEFT LoRA (or other weight-tuner) ``PeftModel``: a trainable prefix is added next to the
            adapter, which stays trainable as PEFT set it, and the PeftModel is returned (its
            save_pretrained, the Trainer's checkpoints and merge_and_unload keep the prefix).
        num_prefix_tokens: P, the number of virtual tokens per layer.
        sites: encoder-decoders only. "decoder" (the default, PEFT's): decoder self-attention carries the
            prefix, in PEFT's layout (decoder layer i reads block 2i mod L of PEFT's L = num_hidden_layers
            blocks, so some layers share one); "all" (Li & Liang): encoder self-attention, decoder
            self-attention and cross-attention each carry their own prefix in every layer. An encoder's
            task head (PEFT's modules_to_save: classifier / score / qa_outputs) trains with the prefix.
        prefix_projection: PEFT's reparameterization (embedding + Linear-Tanh-Linear MLP, run once per step).
        projection_hidden_size: the MLP's hidden size (default Hkv*D, as PEFT's encoder_hidden_size).
        num_prefixes: keep a bank of N prefixes; every call then takes ``prefix_ids`` ((batch,) long)
            choosing each row's entry (``model(ids, prefix_ids=...)``,
            ``model.generate(..., prefix_ids=...)``).
        layers: indices of the layers that carry a prefix (default: all). Sequence positions are numbered
            from P when the first layer carries one (as PEFT does: from the KV cache's length), else from 0.
        init: "random" (N(0, 1), as PEFT's embedding), "zeros", or "text": the keys/values the frozen model
            computes for ``init_text`` (repeated/truncated to P tokens), i.e. the prefix starts out exactly
            as if that text preceded every input. For a bank, ``init_text`` may be a list of N texts.
        tokenizer: needed when init_text is a string.
        dtype: dtype of the prefix parameters (fp32 master by default; cast once per step to the compute
            dtype).
        backend: "auto" | "triton" | "torch", passed to ``prefixattn.prefix_attention``.
        ignore_attention_dropout: train without the model's attention dropout instead of refusing it.
        cartridge: make the prefix a cartridge (PEFT's CARTRIDGE type: a raw prefix, often thousands of
            tokens, whose first ``num_frozen_tokens`` never train; ``save_peft`` writes it as CARTRIDGE).
            Causal LMs only.
        num_frozen_tokens: a cartridge's frozen leading tokens (default 1, PEFT's: an attention sink),
            fewer than ``num_prefix_tokens``.
            They get no gradient and no optimizer step (weight decay included): bitwise unchanged.
    """
    if is_peft_prefix_model(model) and peft_type_name(model.active_peft_config) not in PEFT_PREFIX_TYPES:
        check_tuner_config(model.active_peft_config)
        return patch_tuner_model(model, num_prefix_tokens, sites=sites, prefix_projection=prefix_projection,
                                 projection_hidden_size=projection_hidden_size, num_prefixes=num_prefixes,
                                 layers=layers, init=init, init_text=init_text, tokenizer=tokenizer,
                                 dtype=dtype, backend=backend,
                                 ignore_attention_dropout=ignore_attention_dropout, cartridge=cartridge,
                                 num_frozen_tokens=num_frozen_tokens)
    if is_peft_prefix_model(model):
        if (num_prefix_tokens is not None or prefix_projection or num_prefixes is not None
                or layers is not None or sites is not None or cartridge or num_frozen_tokens is not None):
            raise ValueError("patching a PEFT model takes the prefix shape from its PrefixTuningConfig / "
                             "CartridgeConfig; do not pass num_prefix_tokens / prefix_projection / "
                             "num_prefixes / layers / sites / cartridge / num_frozen_tokens")
        return patch_peft_model(model, dtype=dtype, backend=backend,
                                ignore_attention_dropout=ignore_attention_dropout)
    return patch_model(model, num_prefix_tokens, sites=sites, prefix_projection=prefix_projection,
                       projection_hidden_size=projection_hidden_size, num_prefixes=num_prefixes,
                       layers=layers, init=init, init_text=init_text, tokenizer=tokenizer, dtype=dtype,
                       backend=backend, ignore_attention_dropout=ignore_attention_dropout,
                       cartridge=cartridge, num_frozen_tokens=num_frozen_tokens)


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``patch``: restore the previous attention implementation and requires_grad flags, remove the
    prefix module and hooks (for a LoRA PeftModel, also its modules_to_save entry). Returns the model."""
    if is_peft_prefix_model(model):
        return unpatch_tuner_model(model)
    return unpatch_model(model)
