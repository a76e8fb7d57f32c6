"""The objective: the top-k KL with its rest bucket against a float64 statement of the same KL, the full KL
when k is the vocabulary; and the identity check: a student whose prefix IS the context's K/V (P = C) has
loss 0 at step 0 and the teacher's logits."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import VOCAB, tiny_model

import prefixattn
from prefixattn.distill import (
    TopK,
    distill_loss,
    init_prefix_from_context,
    prefill_context,
    student_loss,
    teacher_logits,
    topk_kl,
    topk_of,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference_kl(teacher_logits, student_logits, k):
    """KL over the teacher's top-k ids and one bucket for every other id, in float64, written out."""
    out = []
    for t, s in zip(teacher_logits.double(), student_logits.double(), strict=True):
        pt, ps = t.softmax(-1), s.softmax(-1)
        top = pt.topk(k).indices
        rest = torch.ones_like(pt, dtype=torch.bool)
        rest[top] = False
        a = torch.cat([pt[top], pt[rest].sum()[None]])
        b = torch.cat([ps[top], ps[rest].sum()[None]])
        out.append((a * (a / b).log()).sum())
    return torch.stack(out)


def test_topk_kl_equals_the_bucketed_kl_and_the_full_kl():
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(6, 50, generator=g) * 3, torch.randn(6, 50, generator=g) * 3
    for k in (1, 5, 20):
        got = topk_kl(student, topk_of(teacher, k))
        torch.testing.assert_close(got.double(), _reference_kl(teacher, student, k), rtol=1e-4, atol=1e-6)
    full = torch.nn.functional.kl_div(student.double().log_softmax(-1), teacher.double().log_softmax(-1),
                                      log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(topk_kl(student, topk_of(teacher, 50)).double(), full, rtol=1e-4, atol=1e-6)
    assert torch.all(topk_kl(teacher, topk_of(teacher, 20)).abs() < 1e-6)  # the teacher itself: 0
    assert torch.all(topk_kl(student, topk_of(teacher, 20)) > 0)


def test_lm_mix_and_bad_input():
    g = torch.Generator().manual_seed(1)
    teacher, student = torch.randn(4, 30, generator=g), torch.randn(4, 30, generator=g, requires_grad=True)
    targets = torch.tensor([1, 2, 3, 4])
    kl = distill_loss(student, topk_of(teacher))
    mixed = distill_loss(student, topk_of(teacher), targets=targets, lm_weight=0.5)
    ce = torch.nn.functional.cross_entropy(student, targets)
    torch.testing.assert_close(mixed, kl + 0.5 * ce)
    # one process's part of a global batch of 10 answer tokens: its sums over the 10, not its own mean
    part = distill_loss(student, topk_of(teacher), targets=targets, lm_weight=0.5, num_items=10)
    torch.testing.assert_close(part, mixed * 4 / 10)
    mixed.backward()
    assert student.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="outside the student's vocabulary"):
        topk_kl(student, TopK(ids=torch.full((4, 3), 40), logprobs=torch.full((4, 3), -2.0)))
    with pytest.raises(ValueError, match="do not match the teacher's top-k at 3 positions"):
        topk_kl(student, topk_of(teacher[:3]))
    with pytest.raises(ValueError, match="lm_weight"):
        distill_loss(student, topk_of(teacher), lm_weight=-1.0)
    with pytest.raises(ValueError, match="needs the targets"):
        distill_loss(student, topk_of(teacher), lm_weight=1.0)


@pytest.mark.parametrize("family", ("llama", "gpt2"))
def test_identity_student_from_the_whole_context_has_loss_zero(family):
    base = tiny_model(family).double()
    C = 9
    context = torch.randint(3, VOCAB, (C,), generator=torch.Generator().manual_seed(2))
    student = prefixattn.patch(copy.deepcopy(base), num_prefix_tokens=C, backend="torch", dtype=torch.float64)
    kept = prefill_context(student, context, chunk_size=4)
    init_prefix_from_context(student, kept)
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :3] = -100  # the first three tokens are the user's turn
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids, attention_mask=mask).logits,
                                   teacher_logits(student, kept, ids, mask), rtol=1e-9, atol=1e-9)
    loss = student_loss(student, batch, context=kept, k=20)
    assert abs(loss.item()) < 1e-9
    loss.backward()  # the prefix gets a (zero) gradient: the student is trainable at the identity
    assert prefixattn.prefix.find_prefix(student).kv.grad.abs().max() < 1e-8
    # a smaller prefix from the first P tokens is not the teacher: the loss is positive
    small = prefixattn.patch(copy.deepcopy(base), num_prefix_tokens=4, backend="torch")
    init_prefix_from_context(small, kept)
    assert student_loss(small, batch, context=kept).item() > 1e-4
    too_long = prefixattn.patch(copy.deepcopy(base), num_prefix_tokens=C + 1, backend="torch")
    with pytest.raises(ValueError, match="may not exceed the context"):
        init_prefix_from_context(too_long, kept)
