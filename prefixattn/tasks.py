"""Data for ``prefixattn train``: the built-in synthetic task, JSONL datasets, and a byte tokenizer.

The built-in task ("successor"): a fixed random permutation f of 16 letters; each example starts at
a random letter and follows f (``x, f(x), f(f(x)), ...``). A frozen model cannot know f; a prefix
can learn it (attention over the prefix acts as a lookup table keyed by the current token), so the
loss falls from about ln(vocab) to near zero and next-letter accuracy goes from chance to 100%.

Batches are a pure function of (seed, step): resuming at step n sees exactly the batches an
uninterrupted run would have seen, with no data-loader state to save.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Protocol

import torch

IGNORE = -100


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, plus BOS=256, EOS=257, PAD=258 (vocabulary of 260)."""

    vocab_size = 260
    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class Tokenizer(Protocol):
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None

    def encode(self, text: str) -> list[int]: ...


class HFTokenizer:
    """A transformers tokenizer behind the same small interface (special tokens added by us)."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.bos_token_id = tok.bos_token_id
        self.eos_token_id = tok.eos_token_id
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if self.pad_token_id is None:
            self.pad_token_id = 0

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, S) long
    labels: torch.Tensor  # (B, S) long, IGNORE where no loss
    attention_mask: torch.Tensor  # (B, S) long, 1 = real token

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.labels.to(device), self.attention_mask.to(device))

    @property
    def target_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())


def _generator(seed: int, stream: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + stream * 7_919 + step) % (2**63 - 1))


class SuccessorTask:
    """The built-in task (see the module docstring). Letters 'a'..'p' as byte tokens."""

    name = "successor"
    letters = 16

    def __init__(
        self,
        seed: int = 0,
        seq_len: int = 32,
        bos_token_id: int = ByteTokenizer.bos_token_id,
        first_token: int = ord("a"),
    ) -> None:
        if seq_len < 3:
            raise ValueError(f"seq_len must be at least 3, got {seq_len}")
        self.seed, self.seq_len, self.bos = seed, seq_len, bos_token_id
        self.alphabet = torch.arange(first_token, first_token + self.letters)
        self.perm = torch.randperm(self.letters, generator=_generator(seed, 99, 0))

    def batch(self, step: int, batch_size: int, split: str = "train") -> Batch:
        g = _generator(self.seed, 0 if split == "train" else 1, step)
        x = torch.randint(0, self.letters, (batch_size,), generator=g)
        seq = [x]
        for _ in range(self.seq_len - 2):
            x = self.perm[x]
            seq.append(x)
        ids = torch.cat([torch.full((batch_size, 1), self.bos), self.alphabet[torch.stack(seq, 1)]], 1)
        labels = ids.clone()
        labels[:, :2] = IGNORE  # BOS and the random first letter are not predictable
        return Batch(ids, labels, torch.ones_like(ids))

    def describe(self) -> str:
        f = "".join(chr(int(self.alphabet[i])) for i in self.perm)
        return f"successor task: next letter under a fixed permutation of a..p (abc..p -> {f})"


class JsonlDataset:
    """{"text": ...} lines (loss on every token) or {"prompt": ..., "completion": ...} lines (loss on
    the completion only). The last 10% of lines (at least one) are held out for evaluation."""

    name = "jsonl"

    def __init__(
        self, path: str | os.PathLike, tokenizer: Tokenizer, max_len: int = 256, seed: int = 0
    ) -> None:
        self.tokenizer, self.max_len, self.seed = tokenizer, max_len, seed
        examples = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                examples.append(self._encode(row, f"{path}:{n}"))
        if len(examples) < 2:
            raise ValueError(
                f"{path}: need at least 2 examples (one is held out for eval), found {len(examples)}"
            )
        n_eval = max(1, len(examples) // 10)
        self.train, self.eval = examples[:-n_eval], examples[-n_eval:]
        self.path = str(path)

    def _encode(self, row: Any, where: str) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        if isinstance(row, dict) and isinstance(row.get("text"), str):
            ids = bos + tok.encode(row["text"]) + eos
            labels = [IGNORE] * len(bos) + ids[len(bos) :]
        elif (
            isinstance(row, dict)
            and isinstance(row.get("prompt"), str)
            and isinstance(row.get("completion"), str)
        ):
            prompt = bos + tok.encode(row["prompt"])
            completion = tok.encode(row["completion"]) + eos
            ids = prompt + completion
            labels = [IGNORE] * len(prompt) + completion
        else:
            raise ValueError(
                f'{where}: each line must be {{"text": str}} or {{"prompt": str, "completion": str}}'
            )
        ids, labels = ids[: self.max_len], labels[: self.max_len]
        if sum(1 for x in labels[1:] if x != IGNORE) == 0:
            raise ValueError(f"{where}: nothing to learn after truncation to {self.max_len} tokens")
        return ids, labels

    def batch(self, step: int, batch_size: int, split: str = "train") -> Batch:
        pool = self.train if split == "train" else self.eval
        g = _generator(self.seed, 0 if split == "train" else 1, step)
        idx = (
            torch.randint(0, len(pool), (batch_size,), generator=g).tolist()
            if split == "train"
            else [(step * batch_size + i) % len(pool) for i in range(batch_size)]
        )
        rows = [pool[i] for i in idx]
        width = max(len(r[0]) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (a, b) in enumerate(rows):  # right padding
            ids[i, : len(a)] = torch.tensor(a)
            labels[i, : len(b)] = torch.tensor(b)
            mask[i, : len(a)] = 1
        return Batch(ids, labels, mask)

    def describe(self) -> str:
        return f"{self.path}: {len(self.train)} train / {len(self.eval)} eval examples"
