"""Self-study conversations as JSONL records, and checking them against the model and the context.

One line per conversation::

    {"index": 7, "chunk": 1, "kind": "question", "context": "<digest of the context's ids>",
     "tokenizer": "<digest of the tokenizer's vocabulary>", "prompt": "...", "response": "...",
     "prompt_ids": [...], "response_ids": [...],
     "topk_ids": [[k ids] per response token], "topk_logprobs": [[k log-probs] per response token]}

``prompt_ids`` is the user turn as the model reads it (chat template applied), ``response_ids`` the
answer; ``topk_*`` the teacher's top-k log-probabilities for each answer token (the teacher: the frozen
model with the context in front). A file written for another context, with another tokenizer's ids, or
whose top-k do not match its answers is refused with the line that shows it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

IGNORE = -100
FIELDS = ("index", "chunk", "kind", "context", "tokenizer", "prompt_ids", "response_ids", "topk_ids",
          "topk_logprobs")


def digest_ids(ids: Any) -> str:
    """A short digest of a token sequence (the context a record was made for)."""
    values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    return hashlib.sha256(json.dumps(values).encode()).hexdigest()[:16]


def tokenizer_digest(tokenizer: Any) -> str:
    """A short digest of a tokenizer's vocabulary (ids of another tokenizer are refused by it)."""
    try:
        vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    except (AttributeError, NotImplementedError):
        vocab = [type(tokenizer).__name__, len(tokenizer)]
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def conversation_key(record: dict[str, Any]) -> str:
    """What makes two conversations duplicates: the same chunk, user turn and answer."""
    text = json.dumps([record["chunk"], record["prompt_ids"], record["response_ids"]])
    return hashlib.sha256(text.encode()).hexdigest()


def _ids_ok(values: Any) -> bool:
    return isinstance(values, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in values)


def check_record(record: Any, where: str, *, vocab: int, context: str | None, tokenizer: str | None) -> None:
    """Refuse a record that does not belong to this model, tokenizer and context, or whose top-k do not
    match its answer."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: not a JSON object")
    missing = [f for f in FIELDS if f not in record]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)} (a self-study record: prefixattn distill "
                         "--generate-only writes them)")
    if tokenizer is not None and record["tokenizer"] != tokenizer:
        raise ValueError(f"{where}: written with another tokenizer (vocabulary digest {record['tokenizer']}, "
                         f"this model's is {tokenizer}): its token ids mean other text")
    if context is not None and record["context"] != context:
        raise ValueError(f"{where}: made for another context (digest {record['context']}, this context's is "
                         f"{context})")
    for name in ("prompt_ids", "response_ids"):
        ids = record[name]
        if not _ids_ok(ids) or not ids:
            raise ValueError(f"{where}: {name} must be a non-empty list of token ids")
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"{where}: {name} has ids up to {max(ids)}, outside the model's vocabulary of "
                             f"{vocab} (another tokenizer's ids?)")
    n = len(record["response_ids"])
    tk, tl = record["topk_ids"], record["topk_logprobs"]
    if not isinstance(tk, list) or not isinstance(tl, list) or len(tk) != n or len(tl) != n:
        rows = len(tk) if isinstance(tk, list) else "?"
        raise ValueError(f"{where}: the teacher's top-k has {rows} rows for {n} response tokens: it does "
                         "not match this conversation")
    widths = {len(row) if isinstance(row, list) else -1 for row in tk} | {
        len(row) if isinstance(row, list) else -1 for row in tl}
    if len(widths) != 1 or widths == {-1} or widths == {0}:
        raise ValueError(f"{where}: the teacher's top-k rows must all hold the same k ids and log-probs")
    if not all(_ids_ok(row) and min(row) >= 0 and max(row) < vocab for row in tk):
        raise ValueError(f"{where}: the teacher's top-k ids fall outside the model's vocabulary of {vocab}")
    if not all(all(isinstance(x, (int, float)) and x <= 1e-4 for x in row) for row in tl):
        raise ValueError(f"{where}: the teacher's top-k log-probs must be numbers <= 0")


def read_records(path: str | Path, *, vocab: int, context: str | None = None,
                 tokenizer: str | None = None) -> list[dict[str, Any]]:
    """Every record of a JSONL file, checked (``check_record``); the same k throughout."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    out: list[dict[str, Any]] = []
    ks = set()
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
            check_record(record, f"{path}:{n}", vocab=vocab, context=context, tokenizer=tokenizer)
            ks.add(len(record["topk_ids"][0]))
            out.append(record)
    if not out:
        raise ValueError(f"{path}: no conversations")
    if len(ks) > 1:
        raise ValueError(f"{path}: the records' top-k have different k ({sorted(ks)})")
    return out


def collate(records: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """A right-padded batch: input_ids = user turn + answer, labels = the answer (-100 elsewhere), and the
    teacher's top-k at each answer token's position."""
    rows = [r["prompt_ids"] + r["response_ids"] for r in records]
    S = max(len(r) for r in rows)
    k = len(records[0]["topk_ids"][0])
    B = len(records)
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    mask = torch.zeros((B, S), dtype=torch.long)
    labels = torch.full((B, S), IGNORE, dtype=torch.long)
    topk_ids = torch.zeros((B, S, k), dtype=torch.long)
    topk_logprobs = torch.zeros((B, S, k), dtype=torch.float32)
    for b, (r, row) in enumerate(zip(records, rows, strict=True)):
        p, n = len(r["prompt_ids"]), len(r["response_ids"])
        ids[b, :len(row)] = torch.tensor(row)
        mask[b, :len(row)] = 1
        labels[b, p:p + n] = torch.tensor(r["response_ids"])
        topk_ids[b, p:p + n] = torch.tensor(r["topk_ids"])
        topk_logprobs[b, p:p + n] = torch.tensor(r["topk_logprobs"], dtype=torch.float32)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "topk_ids": topk_ids,
            "topk_logprobs": topk_logprobs}
