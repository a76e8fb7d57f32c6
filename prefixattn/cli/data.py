"""Data for ``prefixattn train``: the built-in synthetic task, JSONL files, and their collators.

The built-in task ("successor"): a fixed random permutation f of 16 letters; each example starts at
a random letter and follows f (``x, f(x), f(f(x)), ...``). A frozen model cannot know f; a prefix
can learn it (attention over the prefix acts as a lookup table keyed by the current token), so the
loss falls from about ln(vocab) to near zero and next-letter accuracy goes from chance to 100%.
Example i is a pure function of (seed, i) and the examples are read in order (``ordered``), so global
step s always trains on examples [s * G, (s + 1) * G) (G the global batch), whatever the number of
processes, and a resumed run sees exactly the data of an uninterrupted one.

JSONL lines are ``{"text": ...}`` (loss on every token) or ``{"prompt": ..., "completion": ...}``
(loss on the completion only); every line is checked, with its line number, before training starts.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from ..tasks import IGNORE, generator, permutation


class SuccessorTask:
    """The built-in task's examples (see the module docstring); ``split`` "train" or "eval"."""

    name = "successor"
    letters = 16
    ordered = True  # read in index order: the examples are already random

    def __init__(self, tokenizer: Any, *, size: int, seed: int = 0, seq_len: int = 32,
                 split: str = "train") -> None:
        if seq_len < 3:
            raise ValueError(f"--seq-len must be at least 3 for the built-in task, got {seq_len}")
        ids = [tokenizer.convert_tokens_to_ids(chr(ord("a") + i)) for i in range(self.letters)]
        if any(not isinstance(i, int) or i == tokenizer.unk_token_id for i in ids):
            raise ValueError("the tokenizer has no single tokens for the letters a..p (the built-in task)")
        self.alphabet = torch.tensor(ids)
        self.size, self.seed, self.seq_len = size, seed, seq_len
        self.stream = 0 if split == "train" else 1
        self.perm = permutation(seed, self.letters)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        if not 0 <= i < self.size:
            raise IndexError(i)
        g = generator(self.seed, self.stream, i)
        x = int(torch.randint(0, self.letters, (), generator=g))
        seq = [x]
        for _ in range(self.seq_len - 1):
            x = int(self.perm[x])
            seq.append(x)
        ids = self.alphabet[torch.tensor(seq)].tolist()
        return {"input_ids": ids, "labels": [IGNORE, *ids[1:]]}  # the random first letter is not learnable

    def describe(self) -> str:
        f = "".join(chr(ord("a") + int(i)) for i in self.perm)
        return f"successor task: next letter under a fixed permutation of a..p (abc..p -> {f})"

    def corpus(self) -> str:
        """The task's facts as a document (the demo's cartridge corpus): each letter, then its successor."""
        return " ".join(chr(ord("a") + x) + chr(ord("a") + int(self.perm[x])) for x in range(self.letters))


class Examples:
    """Tokenized examples held in memory (a JSONL file's train or eval part)."""

    ordered = False

    def __init__(self, rows: list[dict[str, list[int]]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.rows[i]


def read_jsonl(path: str | os.PathLike, tokenizer: Any, max_len: int,
               encode: Any = None) -> tuple[Examples, Examples]:
    """(train, eval) examples of a JSONL file; the last 10% (at least one) are held out. Every line is
    checked first: a ValueError names the file, the line and the problem. ``encode(row, tokenizer,
    max_len, where)``: a line as an example (default: a causal LM's, ``encode_row``; encoder-decoders and
    classifiers: ``kinds.py``)."""
    encode = encode or encode_row
    path = str(path)
    if not os.path.isfile(path):
        raise ValueError(f"--data {path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            rows.append(encode(row, tokenizer, max_len, f"{path}:{n}"))
    if not rows:
        raise ValueError(f"--data {path}: the file is empty (no JSON lines)")
    if len(rows) < 2:
        raise ValueError(f"--data {path}: need at least 2 examples (one is held out for eval), found 1")
    n_eval = max(1, len(rows) // 10)
    return Examples(rows[:-n_eval]), Examples(rows[-n_eval:])


def encode_row(row: Any, tokenizer: Any, max_len: int, where: str) -> dict[str, list[int]]:
    """One JSONL object as input_ids and labels (IGNORE where there is no loss)."""
    shape = '{"text": str} or {"prompt": str, "completion": str}'
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object ({shape}), got {type(row).__name__}")
    if "text" in row:
        fields = ("text",)
    elif "prompt" in row or "completion" in row:
        fields = ("prompt", "completion")
        for name in fields:
            if name not in row:
                raise ValueError(f"{where}: missing field {name!r} (lines are {shape})")
    else:
        found = ", ".join(repr(k) for k in row) or "none"
        raise ValueError(f"{where}: missing field 'text' or 'prompt'/'completion' (fields: {found}); "
                         f"lines are {shape}")
    for name in fields:
        if not isinstance(row[name], str):
            raise ValueError(f"{where}: field {name!r} must be a string, got {type(row[name]).__name__}")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if fields == ("text",):
        ids = bos + tokenizer.encode(row["text"], add_special_tokens=False) + eos
        labels = [IGNORE] * len(bos) + ids[len(bos):]
    else:
        prompt = bos + tokenizer.encode(row["prompt"], add_special_tokens=False)
        completion = tokenizer.encode(row["completion"], add_special_tokens=False) + eos
        ids, labels = prompt + completion, [IGNORE] * len(prompt) + completion
    ids, labels = ids[:max_len], labels[:max_len]
    if not any(x != IGNORE for x in labels[1:]):
        raise ValueError(f"{where}: nothing to learn (no completion tokens within --max-len {max_len})")
    return {"input_ids": ids, "labels": labels}


class PadCollator:
    """Right-pads a list of examples into input_ids / labels / attention_mask tensors."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad = pad_token_id

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def collator(packing: bool, pad_token_id: int) -> Any:
    """Padding-free rows (one flattened row, position_ids restarting per example: transformers'
    DataCollatorWithFlattening) with ``packing``, else right padding."""
    if packing:
        from transformers import DataCollatorWithFlattening

        return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE)
    return PadCollator(pad_token_id)
