"""The trainable prefix, and saving/loading it (safetensors, atomic).

``PrefixKV`` holds, for every layer that carries a prefix, P key and P value vectors per KV head:

- raw (default): one parameter ``kv`` of shape (L, 2, N, Hkv, P, D), L the prefixed layers, 2 = key|value,
  N the bank entries (1 without a bank). ``kv[l, 0]`` is layer l's key bank (N, Hkv, P, D), contiguous,
  which the kernel reads in place.
- PEFT-style reparameterization (``projection=True``): an embedding (P, Hkv*D) and a two-layer MLP
  (Linear, Tanh, Linear) to (P, L*2*Hkv*D), exactly PEFT's ``PrefixEncoder``. The MLP runs once per
  step (not once per batch row as in PEFT).

Either way ``PrefixKV.compute()`` gives the (L, 2, N, Hkv, P, D) tensor for the step. Values are kept in
``dtype`` (fp32 master by default) and cast to the activations' dtype inside the attention function.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

FORMAT_NAME = "prefixattn"
FORMAT_VERSION = "1"


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


class PrefixKV(nn.Module):
    """Per-layer prefix keys and values (see the module docstring for the layout)."""

    def __init__(self, config: PrefixConfig, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, init: str = "random") -> None:
        super().__init__()
        self.config = config
        c = config
        L, N, H, P, D = len(c.layers), c.num_prefixes, c.num_kv_heads, c.num_tokens, c.head_dim
        self.layer_slot = {layer: i for i, layer in enumerate(c.layers)}
        if c.projection:
            if c.bank:
                raise ValueError(
                    "prefix_projection=True cannot be combined with a bank of prefixes (num_prefixes): the "
                    "MLP would be shared by every entry; use raw prefixes for a bank"
                )
            self.embedding = nn.Embedding(P, c.token_dim, dtype=dtype, device=device)
            self.transform = nn.Sequential(
                nn.Linear(c.token_dim, c.projection_hidden_size, dtype=dtype, device=device),
                nn.Tanh(),
                nn.Linear(c.projection_hidden_size, L * 2 * c.token_dim, dtype=dtype, device=device),
            )
            if init == "zeros":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.kv = nn.Parameter(torch.empty((L, 2, N, H, P, D), dtype=dtype, device=device))
            if init == "zeros":
                nn.init.zeros_(self.kv)
            else:  # PEFT's nn.Embedding default: N(0, 1)
                nn.init.normal_(self.kv)

    def compute(self) -> torch.Tensor:
        """The prefix of this step, (L, 2, N, Hkv, P, D) in the parameters' dtype."""
        if not self.config.projection:
            return self.kv
        return peft_rows_to_kv(self.transform(self.embedding.weight), self.config)

    def slot(self, layer_idx: int) -> int | None:
        return self.layer_slot.get(layer_idx)

    @torch.no_grad()
    def set_values(self, kv: torch.Tensor, prefix_id: int | None = None) -> None:
        """Overwrite the raw prefix with ``kv`` (L, 2, N or 1, Hkv, P, D); into one bank entry if
        prefix_id."""
        if self.config.projection:
            raise ValueError("this prefix is reparameterized by an MLP (prefix_projection=True); its values "
                             "cannot be set directly")
        target = self.kv if prefix_id is None else self.kv[:, :, prefix_id : prefix_id + 1]
        if kv.shape != target.shape:
            raise ValueError(f"prefix values have shape {tuple(kv.shape)}, expected {tuple(target.shape)}")
        target.copy_(kv.to(device=target.device, dtype=target.dtype))

    def extra_repr(self) -> str:
        c = self.config
        return (f"tokens={c.num_tokens}, layers={len(c.layers)}/{c.num_layers}, kv_heads={c.num_kv_heads}, "
                f"head_dim={c.head_dim}, prefixes={c.num_prefixes if c.bank else 1}, "
                f"projection={c.projection}")


# ----------------------------------------------------------------------------------------------
# PEFT's flat layout: rows (P, L*2*Hkv*D), each row laid out [layer][k|v][Hkv][D].
# ----------------------------------------------------------------------------------------------


def peft_rows_to_kv(rows: torch.Tensor, config: PrefixConfig) -> torch.Tensor:
    """(P, L*2*Hkv*D) PEFT rows -> (L, 2, 1, Hkv, P, D), contiguous."""
    c = config
    L = len(c.layers)
    kv = rows.view(c.num_tokens, L, 2, c.num_kv_heads, c.head_dim).permute(1, 2, 3, 0, 4)
    return kv.unsqueeze(2).contiguous()


def kv_to_peft_rows(kv: torch.Tensor) -> torch.Tensor:
    """(L, 2, Hkv, P, D) -> PEFT rows (P, L*2*Hkv*D)."""
    L, two, H, P, D = kv.shape
    return kv.permute(3, 0, 1, 2, 4).reshape(P, L * two * H * D).contiguous()


# ----------------------------------------------------------------------------------------------
# Atomic safetensors IO
# ----------------------------------------------------------------------------------------------


def atomic_write(path: str | os.PathLike, write: Any) -> None:
    """Call ``write(tmp_path)`` on a temporary file in the same directory, fsync it, then rename it over
    ``path``. On any error the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(clean, tmp, metadata=metadata))


def read_tensors(path: str | os.PathLike,
                 what: str = "file") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file; a clear error when it is missing or corrupt."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise ValueError(f"{what} {str(path)!r} is not a readable safetensors file (corrupt or truncated?): "
                         f"{e}") from e
    return tensors, metadata


# ----------------------------------------------------------------------------------------------
# save_prefix / load_prefix
# ----------------------------------------------------------------------------------------------


def _prefix_module(model: nn.Module) -> PrefixKV:
    from .patch import get_prefix_module

    return get_prefix_module(model)


def _check_prefix_id(prefix_id: int | None, config: PrefixConfig) -> None:
    if prefix_id is None:
        return
    if isinstance(prefix_id, bool) or not isinstance(prefix_id, int):
        raise TypeError(f"prefix_id must be an int, got {type(prefix_id).__name__}")
    if not config.bank:
        raise ValueError("prefix_id selects an entry of a bank of prefixes, but this model has a single "
                         "prefix (patch with num_prefixes=N for a bank)")
    if not 0 <= prefix_id < config.num_prefixes:
        raise ValueError(f"prefix_id {prefix_id} is out of range: the bank has {config.num_prefixes} entries")


def save_prefix(model: nn.Module, path: str | os.PathLike, *, prefix_id: int | None = None) -> None:
    """Write the model's prefix (only the prefix) to ``path`` as safetensors, atomically.

    With ``prefix_id`` (bank models), writes that single entry, loadable into any entry of a bank with
    the same shapes or into a single-prefix model. The file's metadata records the prefix shapes, and
    ``load_prefix`` checks them against the model.
    """
    module = _prefix_module(model)
    config = module.config
    _check_prefix_id(prefix_id, config)
    state = {k: v for k, v in module.state_dict().items()}
    if prefix_id is not None:
        state = {"kv": state["kv"][:, :, prefix_id : prefix_id + 1]}
        config = PrefixConfig(**{**asdict(config), "num_prefixes": 1, "bank": False})
    metadata = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": config.to_json()}
    save_tensors(path, state, metadata)


def _mismatches(file_cfg: PrefixConfig, model_cfg: PrefixConfig, single_entry: bool) -> list[str]:
    out = []
    keys = ["num_tokens", "num_kv_heads", "head_dim", "layers", "num_layers", "projection",
            "projection_hidden_size"]
    if not single_entry:
        keys.append("num_prefixes")
    for key in keys:
        a, b = getattr(file_cfg, key), getattr(model_cfg, key)
        if a != b:
            out.append(f"{key}: file has {list(a) if isinstance(a, tuple) else a}, "
                       f"model has {list(b) if isinstance(b, tuple) else b}")
    return out


def load_prefix(model: nn.Module, path: str | os.PathLike, *, prefix_id: int | None = None) -> None:
    """Load a prefix written by ``save_prefix`` into a patched model.

    Everything is validated (format, shapes against the model, finite values) before any parameter is
    touched, so a bad file leaves the model as it was. With ``prefix_id`` (bank models) a single-entry
    file fills that entry; without it, the file must match the model's prefix (bank size included).
    """
    module = _prefix_module(model)
    _check_prefix_id(prefix_id, module.config)
    tensors, metadata = read_tensors(path, "prefix file")
    if metadata.get("format") != FORMAT_NAME:
        hint = (" (it looks like a PEFT adapter: use prefixattn.load_peft)" if "prompt_embeddings" in tensors
                else "")
        raise ValueError(f"{str(path)!r} is not a prefixattn prefix file{hint}")
    if metadata.get("version") != FORMAT_VERSION:
        raise ValueError(f"{str(path)!r} has prefix format version {metadata.get('version')!r}; "
                         f"this prefixattn reads version {FORMAT_VERSION}")
    try:
        file_cfg = PrefixConfig.from_json(metadata["config"])
    except Exception as e:
        raise ValueError(f"{str(path)!r} has an unreadable prefix config: {e}") from e

    model_cfg = module.config
    # one entry: saved with prefix_id, from a single-prefix model, or a bank of 1
    single = file_cfg.num_prefixes == 1
    if prefix_id is not None and not single:
        raise ValueError(f"{str(path)!r} holds a bank of {file_cfg.num_prefixes} prefixes; prefix_id loads a "
                         "single-entry file (saved with save_prefix(..., prefix_id=i))")
    if prefix_id is None and model_cfg.bank and not file_cfg.bank:
        raise ValueError(f"{str(path)!r} holds a single prefix but the model has a bank of "
                         f"{model_cfg.num_prefixes}: pass prefix_id to choose the entry to fill")
    problems = _mismatches(file_cfg, model_cfg, single_entry=prefix_id is not None)
    if problems:
        raise ValueError(f"prefix file {str(path)!r} does not match the model: " + "; ".join(problems))

    expected = module.state_dict()
    if prefix_id is not None:
        expected = {"kv": expected["kv"][:, :, prefix_id : prefix_id + 1]}
    if set(tensors) != set(expected):
        raise ValueError(f"prefix file {str(path)!r} has tensors {sorted(tensors)}, expected "
                         f"{sorted(expected)}")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ValueError(f"prefix file {str(path)!r}: tensor {name!r} has shape {tuple(t.shape)}, "
                             f"the model expects {tuple(expected[name].shape)}")
        if not t.is_floating_point():
            raise ValueError(f"prefix file {str(path)!r}: tensor {name!r} has dtype {t.dtype}, expected "
                             "floats")
        if not torch.isfinite(t).all():
            raise ValueError(f"prefix file {str(path)!r}: tensor {name!r} has non-finite values")

    with torch.no_grad():
        if prefix_id is not None:
            module.set_values(tensors["kv"], prefix_id)
        else:
            params = dict(module.state_dict(keep_vars=True))
            for name, t in tensors.items():
                params[name].copy_(t.to(device=params[name].device, dtype=params[name].dtype))


def default_projection_hidden(token_dim: int) -> int:
    return token_dim


def infer_head_shapes(config: Any) -> tuple[int, int] | None:
    """(Hkv, D) from a transformers config, or None if it does not say (a probe forward decides)."""
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    if heads is None:
        return None
    kv = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if hidden else None)
    if head_dim is None:
        return None
    return int(kv), int(head_dim)


def repeat_to_length(ids: Sequence[int], n: int) -> list[int]:
    """PEFT's init-from-text rule: repeat the tokens to fill n slots, then truncate."""
    ids = list(ids)
    if not ids:
        raise ValueError("init_text has no tokens")
    return (ids * math.ceil(n / len(ids)))[:n]
