"""The table of served prefixes that every part of the server reads: the launcher writes it into a run
directory (``manifest.json`` + ``prefixes.safetensors``), the KV connector (scheduler and workers) and the
HTTP middleware read it back. No vLLM here.

Block sharing. vLLM's prefix cache hashes a block by its token ids, the blocks before it and the request's
``cache_salt``. Every request for a prefix carries P placeholder tokens whose cache slots hold the prefix's
keys and values, so two prefixes of the same length would hash alike and one request would be handed the
other prefix's blocks. Each prefix therefore gets the salt ``prefixattn:<digest of its keys and values>``
(a user's own salt is appended to it), base-model requests never carry that reserved salt, and prefixes of
equal content (the same file under two names) share their blocks, as they may.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..prefix.files import atomic_write, read_tensors, save_tensors
from .adapters import ServedPrefix
from .model_layout import ServedModel

RESERVED_SALT = "prefixattn:"
MANIFEST_NAME = "manifest.json"
KV_FILE_NAME = "prefixes.safetensors"
ENV_MANIFEST = "PREFIXATTN_SERVE_MANIFEST"  # how the HTTP middleware finds the table
ENV_OWNED_RUN_DIR = "PREFIXATTN_SERVE_OWNED_RUN_DIR"  # a run directory the server removes when it stops
MANIFEST_VERSION = 1


def digest(kv: torch.Tensor) -> str:
    """A name for a prefix's content: sha256 of its fp32 keys and values and their shape."""
    h = hashlib.sha256(repr(tuple(kv.shape)).encode())
    h.update(kv.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class TableEntry:
    name: str
    num_tokens: int
    digest: str
    source: str
    tensor: str  # its key in prefixes.safetensors

    @property
    def salt(self) -> str:
        return RESERVED_SALT + self.digest

    def cache_salt(self, user_salt: str | None) -> str:
        """The cache_salt a request for this prefix carries (the user's own salt kept after ours)."""
        return self.salt if not user_salt else f"{self.salt}:{user_salt}"

    def owns_salt(self, cache_salt: str | None) -> bool:
        return cache_salt == self.salt or (cache_salt or "").startswith(self.salt + ":")


@dataclass(frozen=True)
class PrefixTable:
    base_name: str
    model_dir: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    placeholder_token_id: int
    entries: dict[str, TableEntry] = field(default_factory=dict)
    run_dir: str = ""

    @property
    def served_names(self) -> list[str]:
        return [self.base_name, *self.entries]

    @classmethod
    def write(cls, run_dir: str | os.PathLike, model: ServedModel, base_name: str,
              prefixes: list[ServedPrefix], placeholder_token_id: int = 0) -> PrefixTable:
        """Write the run directory (tensors first, the manifest last) and return its table."""
        run = Path(run_dir)
        run.mkdir(parents=True, exist_ok=True)
        tensors = {f"prefix.{i}": p.kv for i, p in enumerate(prefixes)}
        entries = {p.name: TableEntry(p.name, p.num_tokens, digest(p.kv), p.source, f"prefix.{i}")
                   for i, p in enumerate(prefixes)}
        save_tensors(run / KV_FILE_NAME, tensors, {"format": "prefixattn-serve"})
        table = cls(base_name=base_name, model_dir=str(model.model_dir), num_layers=model.num_layers,
                    num_kv_heads=model.num_kv_heads, head_dim=model.head_dim,
                    placeholder_token_id=placeholder_token_id, entries=entries, run_dir=str(run))
        data = {"version": MANIFEST_VERSION, **asdict(table)}
        data["entries"] = [asdict(e) for e in entries.values()]
        del data["run_dir"]
        atomic_write(run / MANIFEST_NAME, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1)))
        return table

    @classmethod
    def read(cls, manifest: str | os.PathLike) -> PrefixTable:
        path = Path(manifest)
        if path.is_dir():
            path = path / MANIFEST_NAME
        data = json.loads(path.read_text())
        if data.pop("version", None) != MANIFEST_VERSION:
            raise ValueError(f"{str(path)!r} is not a prefixattn serve manifest of version "
                             f"{MANIFEST_VERSION}")
        entries = {e["name"]: TableEntry(**e) for e in data.pop("entries")}
        return cls(**data, entries=entries, run_dir=str(path.parent))

    def load_kv(self) -> dict[str, torch.Tensor]:
        """name -> (L, 2, Hkv, P, D) fp32, each checked against the manifest (shape and digest)."""
        tensors, _ = read_tensors(Path(self.run_dir) / KV_FILE_NAME, "served prefixes")
        out = {}
        for e in self.entries.values():
            kv = tensors[e.tensor]
            shape = (self.num_layers, 2, self.num_kv_heads, e.num_tokens, self.head_dim)
            if tuple(kv.shape) != shape or digest(kv) != e.digest:
                raise ValueError(f"served prefix {e.name!r}: {KV_FILE_NAME} does not hold what the manifest "
                                 "says (shape or content changed)")
            out[e.name] = kv
        return out
