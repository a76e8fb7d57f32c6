"""A synthetic task on token ids, for tests and examples of prefix tuning (the ``prefixattn train``
command's data, built on the same permutation, is in ``prefixattn/cli/data.py``).

The task ("successor"): a fixed random permutation f of 16 letters; each example starts at
a random letter and follows f (``x, f(x), f(f(x)), ...``). A frozen model cannot know f; a prefix
can learn it (attention over the prefix acts as a lookup table keyed by the current token), so the
loss falls from about ln(vocab) to near zero and next-letter accuracy goes from chance to 100%.

Batches are a pure function of (seed, step): resuming at step n sees exactly the batches an
uninterrupted run would have seen, with no data-loader state to save.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100


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


def generator(seed: int, stream: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + stream * 7_919 + step) % (2**63 - 1))


def permutation(seed: int, letters: int = 16) -> torch.Tensor:
    """The task's fixed random permutation of ``letters`` symbols, a function of the seed."""
    return torch.randperm(letters, generator=generator(seed, 99, 0))


class SuccessorTask:
    """The built-in task (see the module docstring). Letters 'a'..'p' as byte tokens."""

    name = "successor"
    letters = 16

    def __init__(
        self,
        seed: int = 0,
        seq_len: int = 32,
        bos_token_id: int = 256,
        first_token: int = ord("a"),
    ) -> None:
        if seq_len < 3:
            raise ValueError(f"seq_len must be at least 3, got {seq_len}")
        self.seed, self.seq_len, self.bos = seed, seq_len, bos_token_id
        self.alphabet = torch.arange(first_token, first_token + self.letters)
        self.perm = permutation(seed, self.letters)

    def batch(self, step: int, batch_size: int, split: str = "train") -> Batch:
        g = generator(self.seed, 0 if split == "train" else 1, step)
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
