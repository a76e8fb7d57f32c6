"""Tiny encoders and encoder-decoders built from configs (no hub), their batches, and PEFT twins.

PEFT 0.21.2 looks for ``past_key_values`` in the signature of an encoder's backbone (BertModel, ...) before
its SEQ_CLS / TOKEN_CLS / QUESTION_ANS prefix tuning runs; transformers >= 5.24 names that argument
``cache`` (``past_key_values`` stays a deprecated alias, renamed inside forward), so PEFT refuses these
models. ``restore_old_cache_name`` gives the backbone a forward that takes ``past_key_values`` again and
hands it to the model's own forward under that name (which renames it): the reference PEFT computes is
then exactly what it computes on transformers 5.17, where the backbone takes the old name itself. A shim
of the test reference only; nothing in prefixattn depends on it.
"""

from __future__ import annotations

import copy
import inspect

import torch

P = 3  # prefix tokens of the twins


class _WithOldCacheName:
    """A module's forward that also takes ``past_key_values`` by name (its own signature plus that one)."""

    def __init__(self, module) -> None:
        self.module = module  # deep copies of the module get their own (copy's memo)
        own = inspect.signature(type(module).forward)
        params = [p for name, p in own.parameters.items() if name != "self"]
        where = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
        extra = inspect.Parameter("past_key_values", inspect.Parameter.KEYWORD_ONLY, default=None)
        self.__signature__ = own.replace(parameters=[*params[:where], extra, *params[where:]])

    def __call__(self, *args, past_key_values=None, **kwargs):
        return type(self.module).forward(self.module, *args, past_key_values=past_key_values, **kwargs)


def restore_old_cache_name(model) -> None:
    """Where PEFT looks for ``past_key_values`` (the model's forward, else its first transformers child, the
    backbone) and transformers >= 5.24 names it ``cache``: a forward that takes the old name (see the module
    docstring). A no-op on transformers that still has the old name. Bound to the module, so deep copies
    carry their own."""
    from transformers import PreTrainedModel

    targets = [model] + [m for _, m in model.named_children() if isinstance(m, PreTrainedModel)][:1]
    for target in targets:
        params = inspect.signature(target.forward).parameters
        if "past_key_values" in params:
            return
        if "cache" in params:
            target.forward = _WithOldCacheName(target)
            return


def peft_twin(model, task_type: str, num_virtual_tokens: int = P, seed: int = 1):
    """A PEFT PrefixTuning model of ``task_type`` over a deep copy of ``model`` (random prefix, seeded)."""
    from peft import PrefixTuningConfig, get_peft_model

    base = copy.deepcopy(model)
    if task_type in ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"):  # the task types that check the signature
        restore_old_cache_name(base)
    torch.manual_seed(seed)
    return get_peft_model(base, PrefixTuningConfig(task_type=task_type, num_virtual_tokens=num_virtual_tokens))


def peft_prefix_rows(peft_model, grad: bool = False) -> torch.Tensor:
    """PEFT's prefix (or its gradient) as (num_layers, 2, Hkv, P, D): block l of PEFT's rows."""
    cfg = peft_model.active_peft_config
    weight = peft_model.prompt_encoder["default"].embedding.weight
    rows = (weight.grad if grad else weight.detach())[: cfg.num_virtual_tokens]
    H = cfg.num_attention_heads
    return rows.view(cfg.num_virtual_tokens, cfg.num_layers, 2, H, cfg.token_dim // H).permute(1, 2, 3, 0, 4)


def text_batch(vocab: int, batch: int = 2, length: int = 7, pad: int = 0, padding: str = "right",
               seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids in [3, vocab) and a mask; row 1 padded (right or left) with ``pad``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, min(vocab, 100), (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if padding == "right":
        mask[1, length - 3:] = 0
    elif padding == "left":
        mask[1, :3] = 0
    return ids.masked_fill(mask == 0, pad), mask


def tiny_bart(encoder_layers: int = 2, decoder_layers: int = 2, seed: int = 0, family: str = "bart", **overrides):
    """A tiny BART-like seq2seq LM (eager attention, eval mode, no dropout)."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        family, vocab_size=97, d_model=32, encoder_layers=encoder_layers, decoder_layers=decoder_layers,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
        **overrides)
    return AutoModelForSeq2SeqLM.from_config(config, attn_implementation="eager").eval()


def tiny_encoder(family: str = "bert", head: str = "ForSequenceClassification", seed: int = 0, **overrides):
    """A tiny encoder of ``family`` with ``head`` (a transformers class suffix, "Model" for the bare one)."""
    import transformers
    from transformers import AutoConfig

    torch.manual_seed(seed)
    overrides = {"num_labels": 2 if head == "ForQuestionAnswering" else 3, **overrides}
    config = AutoConfig.for_model(
        family, vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=32, max_position_embeddings=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, pad_token_id=1, **overrides)
    auto = {"ForSequenceClassification": "AutoModelForSequenceClassification",
            "ForTokenClassification": "AutoModelForTokenClassification",
            "ForQuestionAnswering": "AutoModelForQuestionAnswering", "ForMaskedLM": "AutoModelForMaskedLM",
            "Model": "AutoModel"}[head]
    return getattr(transformers, auto).from_config(config, attn_implementation="eager").eval()


def tiny_t5(family: str = "t5", seed: int = 0, **overrides):
    """A tiny T5-family seq2seq LM (t5, mt5, umt5, switch_transformers; eager attention, eval mode, no
    dropout) with few relative-position buckets, so that nearby positions get different biases."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    torch.manual_seed(seed)
    extra = {"num_experts": 2, "expert_capacity": 16, "num_sparse_encoder_layers": 1,
             "num_sparse_decoder_layers": 1, "router_jitter_noise": 0.0} if family == "switch_transformers" else {}
    config = AutoConfig.for_model(
        family, vocab_size=97, d_model=32, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        pad_token_id=1, eos_token_id=2, decoder_start_token_id=0, **extra, **overrides)
    return AutoModelForSeq2SeqLM.from_config(config, attn_implementation="eager").eval()
