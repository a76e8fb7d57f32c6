"""The context-distillation objective (Cartridges, Eyuboglu et al. 2025): KL(teacher || student) over a
conversation's response tokens, from the teacher's top-k log-probabilities.

The teacher's distribution at a position is kept as its k most likely tokens (ids and log-probs; k = 20
by default, as the paper stores them) plus one "rest" bucket holding the remaining mass,
1 - sum(exp(top-k)). The student's distribution is reduced the same way (its log-probs at the teacher's k
ids, and the log of its remaining mass), so the loss is an exact KL between two distributions over k + 1
outcomes: zero exactly when the student matches the teacher on the top-k (and so on the rest's total),
never negative. With k = vocabulary size it is the full KL.

``TopK`` is what is recorded per response token; ``topk_of(logits, k)`` makes one from logits;
``distill_loss`` is the objective, optionally mixed with the language-model loss on the same tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DEFAULT_TOP_K = 20


@dataclass(frozen=True)
class TopK:
    """The teacher's top-k at N positions: ``ids`` (N, k) long, ``logprobs`` (N, k) float (log-softmax
    values, not renormalised: their mass is below 1, the rest is the rest bucket)."""

    ids: torch.Tensor
    logprobs: torch.Tensor

    def __post_init__(self) -> None:
        if self.ids.shape != self.logprobs.shape or self.ids.dim() != 2:
            raise ValueError(f"top-k ids {tuple(self.ids.shape)} and log-probs "
                             f"{tuple(self.logprobs.shape)} must both be (positions, k)")
        if self.ids.dtype not in (torch.int64, torch.int32) or not self.logprobs.is_floating_point():
            raise TypeError("top-k ids must be integers and log-probs floats")

    @property
    def k(self) -> int:
        return self.ids.shape[1]


def topk_of(logits: torch.Tensor, k: int = DEFAULT_TOP_K) -> TopK:
    """The top-k of (N, V) logits, log-probs in fp32."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    logp = torch.log_softmax(logits.float(), dim=-1)
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return TopK(ids=ids, logprobs=values)


def _log_rest(logprobs: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(exp(logprobs))) per row, stably (log1p(-exp(logsumexp)))."""
    total = torch.logsumexp(logprobs, dim=-1).clamp(max=0.0)
    # log(1 - e^t) for t <= 0: log(-expm1(t)) near 0, log1p(-e^t) far from it
    return torch.where(total > -math.log(2), torch.log(-torch.expm1(total)), torch.log1p(-torch.exp(total)))


def topk_kl(student_logits: torch.Tensor, teacher: TopK) -> torch.Tensor:
    """Per-position KL(teacher || student) over the teacher's top-k and the rest bucket: (N,), in fp32.
    ``student_logits`` (N, V)."""
    if student_logits.dim() != 2 or student_logits.shape[0] != teacher.ids.shape[0]:
        raise ValueError(f"student logits {tuple(student_logits.shape)} do not match the teacher's top-k at "
                         f"{teacher.ids.shape[0]} positions")
    vocab = student_logits.shape[-1]
    if teacher.ids.numel() and (int(teacher.ids.min()) < 0 or int(teacher.ids.max()) >= vocab):
        raise ValueError(f"the teacher's top-k ids are outside the student's vocabulary of {vocab} (a top-k "
                         "file from another model or tokenizer?)")
    s_logp = torch.log_softmax(student_logits.float(), dim=-1)
    s_top = s_logp.gather(-1, teacher.ids.long().to(s_logp.device))
    t_top = teacher.logprobs.float().to(s_logp.device)
    t_rest, s_rest = _log_rest(t_top), _log_rest(s_top)
    kl_top = (t_top.exp() * (t_top - s_top)).sum(-1)
    # where the teacher's top-k hold all its mass (k = vocabulary), the rest bucket contributes nothing
    kl_rest = torch.where(torch.isfinite(t_rest), t_rest.exp() * (t_rest - s_rest), torch.zeros_like(t_rest))
    return kl_top + kl_rest


def distill_loss(student_logits: torch.Tensor, teacher: TopK, *, targets: torch.Tensor | None = None,
                 lm_weight: float = 0.0, num_items: int | torch.Tensor | None = None) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) from the teacher's top-k, plus ``lm_weight`` times the
    language-model loss (cross-entropy of ``targets``, (N,) ids: the conversation's own next tokens).
    ``student_logits`` (N, V) are the student's logits at the response positions (the logits that predict
    each response token). ``num_items``: divide the sums by it instead of N (the response tokens of the
    whole global batch, when this is one process's part of it)."""
    if not (lm_weight >= 0.0 and math.isfinite(lm_weight)):
        raise ValueError(f"lm_weight must be >= 0, got {lm_weight}")
    total = topk_kl(student_logits, teacher).sum()
    if lm_weight:
        if targets is None:
            raise ValueError("lm_weight > 0 needs the targets (the response tokens)")
        total = total + lm_weight * F.cross_entropy(student_logits.float(), targets.to(student_logits.device),
                                                    reduction="sum")
    count = student_logits.shape[0] if num_items is None else num_items
    return total / count
