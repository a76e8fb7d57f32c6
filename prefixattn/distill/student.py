"""The student: a patched model's prefix, initialised from the context's own keys and values, and its loss
against the teacher (the same frozen model reading the whole context's kept K/V) on a batch of
conversations."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..hf.context import ContextKV, check_fits, reading_context
from ..prefix import check_prefix_id, find_prefix
from .objective import TopK, distill_loss, topk_kl, topk_of


@torch.no_grad()
def init_prefix_from_context(model: nn.Module, context: ContextKV, *, prefix_id: int | None = None) -> None:
    """Set the patched ``model``'s prefix (P tokens) to the first P positions of the context's keys and
    values (Cartridges' initialisation; what ``init_prefix_from_cache`` does with a KV cache). P may not
    exceed the context's length."""
    if not isinstance(context, ContextKV):
        raise TypeError("context must be a ContextKV (prefill_context's result), got "
                        f"{type(context).__name__}")
    P = find_prefix(model).config.num_tokens
    if P > context.length:
        raise ValueError(f"the prefix has {P} tokens but the context only {context.length}: the student's P "
                         "may not exceed the context it is initialised from")
    module = find_prefix(model)
    c = module.config
    check_prefix_id(prefix_id, c)
    if c.projection:
        raise ValueError("the prefix is MLP-reparameterized (prefix_projection=True); its values cannot be "
                         "set from a context")
    missing = [layer for layer in c.layers if layer not in context.config.layers]
    if missing:
        raise ValueError(f"the context holds no keys and values for layers {missing}")
    # the prefix's own dtype (not fp32 on the way): a float64 student starts exactly at the context
    dtype = module.kv.dtype
    kv = torch.zeros((len(c.layers), 2, 1 if prefix_id is not None else c.num_prefixes, c.num_kv_heads, P,
                      c.head_dim), dtype=dtype)
    for slot, layer in enumerate(c.layers):
        keys, values = context.layer(layer)  # (1, Hkv, C, D*) of the layer's own shape
        pk, pv = module.layer_views(kv, slot)
        if (pk.shape[1], pk.shape[3], pv.shape[3]) != (keys.shape[1], keys.shape[3], values.shape[3]):
            raise ValueError(f"layer {layer}: the context's keys/values are {tuple(keys.shape[1:])} / "
                             f"{tuple(values.shape[1:])}, the prefix's {tuple(pk.shape[1:])} / "
                             f"{tuple(pv.shape[1:])} "
                             "(prefilled by another model?)")
        pk.copy_(keys[:, :, :P].to(dtype).cpu().expand_as(pk))
        pv.copy_(values[:, :, :P].to(dtype).cpu().expand_as(pv))
    module.set_values(kv, prefix_id)


def response_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, positions) of the logits that predict the response tokens: position t - 1 predicts the token
    at t, for every t whose label is not -100."""
    rows, cols = (labels[:, 1:] != -100).nonzero(as_tuple=True)
    return rows, cols


@torch.no_grad()
def teacher_topk(model: nn.Module, context: ContextKV, batch: dict[str, torch.Tensor], k: int) -> TopK:
    """The teacher's top-k at the batch's response positions, computed now over the kept context K/V."""
    check_fits(model, context, batch["input_ids"].shape[1])
    was_training = model.training
    model.eval()
    try:
        with reading_context(model, context):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           use_cache=False).logits
    finally:
        model.train(was_training)
    rows, cols = response_positions(batch["labels"])
    return topk_of(logits[rows, cols], k)


def batch_teacher(batch: dict[str, torch.Tensor]) -> TopK | None:
    """The recorded top-k carried by a batch (``topk_ids`` / ``topk_logprobs`` at the label positions)."""
    if "topk_ids" not in batch:
        return None
    rows, cols = (batch["labels"][:, 1:] != -100).nonzero(as_tuple=True)
    return TopK(ids=batch["topk_ids"][rows, cols + 1], logprobs=batch["topk_logprobs"][rows, cols + 1])


def student_loss(model: nn.Module, batch: dict[str, torch.Tensor], *, context: ContextKV | None = None,
                 k: int = 20, lm_weight: float = 0.0, return_kl: bool = False,
                 teacher: TopK | None = None, num_items: int | torch.Tensor | None = None) -> Any:
    """The distillation loss of the patched ``model`` (its prefix is the student) on a batch of
    conversations: ``input_ids``, ``attention_mask``, ``labels`` (-100 outside the responses) and either the
    recorded teacher top-k (``topk_ids`` / ``topk_logprobs``, (B, S, k), at each response token's position)
    or a ``context`` whose kept K/V the teacher reads now (or ``teacher``, computed by the caller).
    ``num_items``: the response tokens the loss is averaged over (default: the batch's)."""
    teacher = teacher if teacher is not None else batch_teacher(batch)
    if teacher is None:
        if context is None:
            raise ValueError("the batch carries no teacher top-k and no context was given to compute it")
        teacher = teacher_topk(model, context, batch, k)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   use_cache=False).logits
    rows, cols = response_positions(batch["labels"])
    picked = logits[rows, cols]
    targets = batch["labels"][rows, cols + 1]
    loss = distill_loss(picked, teacher, targets=targets, lm_weight=lm_weight, num_items=num_items)
    if return_kl:
        return loss, topk_kl(picked.detach(), teacher), picked.detach().argmax(-1) == teacher.ids[:, 0].to(
            picked.device)
    return loss
