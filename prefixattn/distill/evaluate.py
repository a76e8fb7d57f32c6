"""Held-out evaluation of a distilled prefix: mean KL(teacher || student) over the answer tokens (from the
teacher's recorded top-k, or computed over the context's kept K/V) and greedy agreement (the share of
answer tokens where the student's most likely token is the teacher's), for the model without any prefix,
a given prefix (the initial one, the trained one)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from ..hf.context import ContextKV, running_bare
from .records import collate
from .student import student_loss, teacher_topk


@torch.no_grad()
def evaluate(model: nn.Module, records: list[dict[str, Any]], pad_id: int, *, bare: bool = False,
             context: ContextKV | None = None, batch_size: int = 8, k: int = 20,
             reduce: Callable[[list[float]], list[float]] | None = None) -> dict[str, float]:
    """{"kl": mean per answer token, "agreement": greedy agreement, "tokens": answer tokens} of the patched
    ``model`` (``bare``: without any prefix) on ``records``. ``context``: compute the teacher over it
    instead of using the recorded top-k. ``reduce``: sums the [KL, agreeing tokens, tokens] totals over
    processes that each evaluated their share of the records, before the means are taken."""
    was_training = model.training
    model.eval()
    kl_sum, agree, tokens = 0.0, 0, 0
    device = next(model.parameters()).device
    try:
        for start in range(0, len(records), batch_size):
            batch = {name: t.to(device) for name, t in collate(records[start:start + batch_size],
                                                                pad_id).items()}
            # the teacher first: it reads the context through the prefix, which running_bare turns off
            teacher = None if context is None else teacher_topk(model, context, batch, k)
            with running_bare(model) if bare else contextlib.nullcontext():
                _, kl, same = student_loss(model, batch, teacher=teacher, return_kl=True)
                kl_sum += float(kl.sum())
                agree += int(same.sum())
                tokens += kl.numel()
    finally:
        model.train(was_training)
    if reduce is not None:
        kl_sum, agree, tokens = reduce([kl_sum, float(agree), float(tokens)])
        agree, tokens = round(agree), round(tokens)
    return {"kl": kl_sum / max(tokens, 1), "agreement": agree / max(tokens, 1), "tokens": tokens}
