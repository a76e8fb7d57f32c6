"""Tiny random models of every tested family, built from configs (no hub, no downloads), and PEFT twins.

Shapes: hidden 64, 4 query heads, 2 KV heads where the family has GQA, head_dim 16, 2 layers, vocab 97.
Dropout is off everywhere so training-mode runs compare exactly.
"""

from __future__ import annotations

import contextlib
import copy
import inspect

import torch

VOCAB = 97

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _config(family: str):
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(**_COMMON, intermediate_size=128, num_key_value_heads=2)
    if family == "mistral":
        return tf.MistralConfig(**_COMMON, intermediate_size=128, num_key_value_heads=2, sliding_window=128)
    if family == "qwen2":
        return tf.Qwen2Config(**_COMMON, intermediate_size=128, num_key_value_heads=2)
    if family == "qwen3":
        return tf.Qwen3Config(**_COMMON, intermediate_size=128, num_key_value_heads=2, head_dim=16)
    if family == "gemma":
        return tf.GemmaConfig(**_COMMON, intermediate_size=128, num_key_value_heads=2, head_dim=16)
    if family == "gemma2":
        return tf.Gemma2Config(**_COMMON, intermediate_size=128, num_key_value_heads=2, head_dim=16,
                               sliding_window=128, attn_logit_softcapping=5.0, final_logit_softcapping=None,
                               query_pre_attn_scalar=16)
    if family == "phi3":
        return tf.Phi3Config(**_COMMON, intermediate_size=128, num_key_value_heads=2)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2,
                             pad_token_id=0)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128, max_position_embeddings=256, rotary_pct=0.5,
                                attention_dropout=0.0, hidden_dropout=0.0, bos_token_id=1, eos_token_id=2,
                                pad_token_id=0)
    if family == "opt":
        return tf.OPTConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            ffn_dim=128, max_position_embeddings=256, word_embed_proj_dim=64, dropout=0.0,
                            attention_dropout=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    raise ValueError(family)


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "gpt_neox", "opt")


def tiny_model(family: str = "llama", seed: int = 0, attn_implementation: str = "eager", **overrides):
    """A tiny random causal LM of ``family`` in eval mode, fp32 (``overrides`` set config fields)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _config(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    config._attn_implementation = attn_implementation
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.eval()


def peft_twin(model, num_virtual_tokens: int = 4, prefix_projection: bool = False, seed: int = 1):
    """A PEFT PrefixTuning model over a deep copy of ``model`` (random prefix, seeded)."""
    from peft import PrefixTuningConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens,
                             prefix_projection=prefix_projection)
    return get_peft_model(copy.deepcopy(model), cfg)


def cache_is_renamed(model) -> bool:
    """transformers >= 5.24 names the forward argument ``cache`` (``past_key_values`` is a deprecated alias)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" in inspect.signature(base.forward).parameters


@contextlib.contextmanager
def peft_generate_fixed(peft_model):
    """PEFT's prefix-tuning generate() as PEFT means it, on the installed transformers.

    PEFT 0.21.2 reads and writes the cache in ``prepare_inputs_for_generation`` under the key
    ``past_key_values``; transformers >= 5.24 passes it as ``cache`` and ignores the old key, so PEFT's own
    generate() decodes without the prefix (the same tokens as the base model; see
    ``test_peft_generate_as_shipped``). The fix, for the reference only: PEFT sees the base model's inputs
    under the old name and hands its prompt cache back under the new one. Nothing else of PEFT's logic
    changes. A no-op on transformers that still uses the old name."""
    if not cache_is_renamed(peft_model):
        yield peft_model
        return
    base_prepare = peft_model.base_model_prepare_inputs_for_generation
    peft_prepare = peft_model.prepare_inputs_for_generation

    def base_with_old_name(*args, **kwargs):
        inputs = base_prepare(*args, **kwargs)
        if "cache" in inputs:
            inputs["past_key_values"] = inputs.pop("cache")
        return inputs

    def peft_with_new_name(*args, **kwargs):
        inputs = peft_prepare(*args, **kwargs)
        if "past_key_values" in inputs:
            inputs["cache"] = inputs.pop("past_key_values")
        return inputs

    peft_model.base_model_prepare_inputs_for_generation = base_with_old_name
    peft_model.prepare_inputs_for_generation = peft_with_new_name
    try:
        yield peft_model
    finally:
        peft_model.base_model_prepare_inputs_for_generation = base_prepare
        del peft_model.prepare_inputs_for_generation  # the class's method again


def peft_generate(peft_model, **kwargs):
    """``peft_model.generate(**kwargs)`` with PEFT's prompt handed over the way the installed transformers
    reads it (``peft_generate_fixed``): the reference the tests compare generate() with."""
    with peft_generate_fixed(peft_model):
        return peft_model.generate(**kwargs)


def generate(model, **kwargs):
    """``model.generate(**kwargs)``; for a PEFT prompt-learning model, the fixed reference (``peft_generate``)."""
    if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
        return peft_generate(model, **kwargs)
    return model.generate(**kwargs)


def batch(batch_size: int = 3, length: int = 7, padding: str = "none", seed: int = 2):
    """Random input_ids and a (B, S) attention mask: no padding, or left/right padding on some rows."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch_size, length), generator=g)
    mask = torch.ones(batch_size, length, dtype=torch.long)
    if padding == "left":
        for b in range(1, batch_size):
            mask[b, : min(b * 2, length - 1)] = 0
    elif padding == "right":
        for b in range(1, batch_size):
            mask[b, length - min(b * 2, length - 1):] = 0
    elif padding != "none":
        raise ValueError(padding)
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def patched_twin(peft_model, backend: str = "torch", **kwargs):
    """prefixattn's model carrying the same prefix as ``peft_model`` (patched from a deep copy)."""
    import prefixattn

    return prefixattn.patch(copy.deepcopy(peft_model), backend=backend, **kwargs)


def peft_prefix_as_kv(peft_model, grad: bool = False):
    """PEFT's prefix embedding (or its gradient) in prefixattn's (L, 2, 1, Hkv, P, D) layout."""
    cfg = peft_model.active_peft_config
    weight = peft_model.prompt_encoder["default"].embedding.weight
    rows = weight.grad if grad else weight.detach()
    L, H = cfg.num_layers, cfg.num_attention_heads
    D = cfg.token_dim // H
    return rows.view(cfg.num_virtual_tokens, L, 2, H, D).permute(1, 2, 3, 0, 4).unsqueeze(2)


def labels_for(ids, mask):
    return ids.masked_fill(mask == 0, -100)
