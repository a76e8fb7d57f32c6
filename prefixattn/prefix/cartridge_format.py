"""Composing cartridges by concatenation (Cartridges, Eyuboglu et al. 2025: two cartridges trained apart
answer questions about both corpora when their KV caches are concatenated), for PEFT's CARTRIDGE adapters
and for prefixattn's own prefix files.

``compose_cartridges([a, b, ...], out)`` writes one cartridge whose tokens are a's, then b's, ...:

- PEFT adapter directories: exactly ``peft.tuners.cartridge.utils.compose_cartridge_adapters``: every input
  must be a CARTRIDGE adapter of the same model shape (task_type, token_dim, num_layers,
  num_attention_heads, num_transformer_submodules); ``prompt_embeddings`` are concatenated along the
  tokens; the config is the first adapter's with ``num_virtual_tokens`` the sum and the first adapter's
  ``num_frozen_tokens`` (one attention sink at the front: the later cartridges' frozen tokens train).
- prefixattn prefix files (``save_prefix``): raw single prefixes (no MLP, no bank) of the same layers and
  shapes; the same rule (the first file's kind and frozen count).

Nothing is written unless every input is valid; both files of an adapter are staged and renamed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from .config import PrefixConfig
from .files import read_tensors, save_tensors
from .native import FORMAT_NAME, FORMAT_VERSION
from .peft_format import CONFIG_NAME, read_peft_adapter, write_adapter

# The adapter-config fields PEFT's compose_cartridge_adapters requires to agree
_SAME_MODEL = ("task_type", "token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules")
# The prefix-config fields that fix a model's prefix shape (the tokens are what composition adds up)
_SAME_SHAPE = ("num_kv_heads", "head_dim", "layers", "num_layers", "layer_shapes")


def compose_cartridges(sources: Sequence[str | os.PathLike], output: str | os.PathLike) -> None:
    """Concatenate cartridges (PEFT CARTRIDGE adapter directories, or prefixattn prefix files) into one
    at ``output`` (a directory for adapters, a file for prefix files). See the module docstring."""
    paths = [Path(s) for s in sources]
    if len(paths) < 2:
        raise ValueError(f"compose_cartridges needs at least 2 cartridges, got {len(paths)}")
    dirs = [p.is_dir() for p in paths]
    if all(dirs):
        _compose_adapters(paths, Path(output))
    elif not any(dirs):
        _compose_prefix_files(paths, Path(output))
    else:
        raise ValueError("compose_cartridges takes PEFT adapter directories or prefixattn prefix files, not "
                         f"a mix: {[str(p) for p in paths]}")


def _compose_adapters(paths: list[Path], output: Path) -> None:
    read = [read_peft_adapter(p) for p in paths]
    for p, (cfg, _, _) in zip(paths, read, strict=True):
        if cfg["peft_type"] != "CARTRIDGE":
            raise ValueError(f"adapter {str(p)!r} is not a CARTRIDGE adapter (got {cfg['peft_type']!r})")
    first = read[0][0]
    for p, (cfg, _, _) in zip(paths[1:], read[1:], strict=True):
        for key in _SAME_MODEL:
            if cfg.get(key) != first.get(key):
                raise ValueError(f"adapter {str(p)!r} does not compose with {str(paths[0])!r}: {key} is "
                                 f"{cfg.get(key)!r}, not {first.get(key)!r}")
    rows = torch.cat([emb for _, emb, _ in read], dim=0)
    raw = json.loads((paths[0] / CONFIG_NAME).read_text())  # the first adapter's config as written
    raw.update(num_virtual_tokens=rows.shape[0], num_frozen_tokens=first["num_frozen_tokens"])
    write_adapter(output, {"prompt_embeddings": rows.contiguous()},
                  json.dumps(raw, indent=2, sort_keys=True) + "\n")


def _read_prefix_file(path: Path) -> tuple[PrefixConfig, torch.Tensor]:
    """A prefix file's config and its whole prefix (L, 2, 1, Hkv, P, D), frozen tokens first."""
    tensors, metadata = read_tensors(path, "prefix file")
    if metadata.get("format") != FORMAT_NAME or metadata.get("version") != FORMAT_VERSION:
        raise ValueError(f"{str(path)!r} is not a prefixattn prefix file (format {FORMAT_NAME!r} version "
                         f"{FORMAT_VERSION})")
    try:
        config = PrefixConfig.from_json(metadata["config"])
    except Exception as e:
        raise ValueError(f"{str(path)!r} has an unreadable prefix config: {e}") from e
    if config.projection or config.num_prefixes != 1:
        held = "an MLP-reparameterized prefix" if config.projection else "a bank"
        raise ValueError(f"{str(path)!r} holds {held}; cartridges compose from raw single prefixes "
                         "(save_prefix(..., prefix_id=i) writes one entry of a bank)")
    names = {"kv", "frozen_kv"} if config.num_frozen_tokens else {"kv"}
    if set(tensors) != names:
        raise ValueError(f"{str(path)!r} has tensors {sorted(tensors)}, expected {sorted(names)}")
    parts = [tensors["frozen_kv"], tensors["kv"]] if config.num_frozen_tokens else [tensors["kv"]]
    kv = torch.cat(parts, dim=4)
    L = len(config.layers)
    expected = (L, 2, 1, config.num_kv_heads, config.num_tokens, config.head_dim)
    if tuple(kv.shape) != expected or not kv.is_floating_point() or not torch.isfinite(kv).all():
        raise ValueError(f"{str(path)!r}: the prefix has shape {tuple(kv.shape)} (expected {expected}) or "
                         "values that are not finite floats")
    return config, kv


def _compose_prefix_files(paths: list[Path], output: Path) -> None:
    read = [_read_prefix_file(p) for p in paths]
    first = read[0][0]
    for p, (cfg, _) in zip(paths[1:], read[1:], strict=True):
        for key in _SAME_SHAPE:
            if getattr(cfg, key) != getattr(first, key):
                raise ValueError(f"prefix file {str(p)!r} does not compose with {str(paths[0])!r}: {key} is "
                                 f"{getattr(cfg, key)!r}, not {getattr(first, key)!r}")
    kv = torch.cat([t.to(read[0][1].dtype) for _, t in read], dim=4)
    config = replace(first, num_tokens=kv.shape[4])
    F = config.num_frozen_tokens
    state = {"kv": kv[:, :, :, :, F:]}
    if F:
        state["frozen_kv"] = kv[:, :, :, :, :F]
    metadata = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": config.to_json()}
    save_tensors(output, state, metadata)
