"""The prefix's shape: ``PrefixConfig`` (stored in saved files and checked on load), and the check of a
bank entry id."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class PrefixConfig:
    """Everything that fixes the shapes of a prefix (stored in saved files, checked on load)."""

    num_tokens: int
    num_kv_heads: int
    head_dim: int
    layers: tuple[int, ...]
    num_layers: int  # layers of the model (prefixed or not)
    num_prefixes: int = 1
    bank: bool = False
    projection: bool = False
    projection_hidden_size: int = 0

    @property
    def token_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def single_entry(self) -> PrefixConfig:
        """The config of one entry of this prefix (a bank of 1 is a single prefix)."""
        return PrefixConfig(**{**asdict(self), "num_prefixes": 1, "bank": False})

    def to_json(self) -> str:
        d = asdict(self)
        d["layers"] = list(self.layers)
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PrefixConfig:
        d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError("prefix config is not a JSON object")
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"prefix config has unknown fields {sorted(unknown)}")
        d["layers"] = tuple(int(i) for i in d["layers"])
        return cls(**d)


def check_prefix_id(prefix_id: int | None, config: PrefixConfig) -> None:
    """A ``prefix_id`` argument (one bank entry) must be an int in range, and only for a bank."""
    if prefix_id is None:
        return
    if isinstance(prefix_id, bool) or not isinstance(prefix_id, int):
        raise TypeError(f"prefix_id must be an int, got {type(prefix_id).__name__}")
    if not config.bank:
        raise ValueError("prefix_id selects an entry of a bank of prefixes, but this model has a single "
                         "prefix (patch with num_prefixes=N for a bank)")
    if not 0 <= prefix_id < config.num_prefixes:
        raise ValueError(f"prefix_id {prefix_id} is out of range: the bank has {config.num_prefixes} entries")
