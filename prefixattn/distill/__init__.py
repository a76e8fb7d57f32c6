"""Distilling a context into a prefix: Cartridges' self-study with context distillation (Eyuboglu et al.
2025), the teacher reading the context's keys and values once.

    objective.py   KL(teacher || student) from the teacher's top-k log-probs (+ a rest bucket), LM mix
    student.py     the student's prefix from the context's K/V, its loss on a batch of conversations
    selfstudy.py   self-study data: chunks, seed prompts, asker and answerer, the teacher's top-k (JSONL)
    records.py     the conversation records (JSONL): reading, checking against the model and the context
    evaluate.py    held-out KL to the teacher and greedy agreement with its answers

The teacher itself (prefill once, read the kept K/V as a frozen prefix) is ``prefixattn.hf.context``.
"""

from __future__ import annotations

from ..hf.context import ContextKV, prefill_context, reading_context, running_bare, teacher_logits
from .objective import DEFAULT_TOP_K, TopK, distill_loss, topk_kl, topk_of
from .student import init_prefix_from_context, student_loss

__all__ = ["DEFAULT_TOP_K", "ContextKV", "TopK", "distill_loss", "init_prefix_from_context",
           "prefill_context", "reading_context", "running_bare", "student_loss", "teacher_logits", "topk_kl",
           "topk_of"]
