"""prefixattn's own prefix file: ``save_prefix`` / ``load_prefix`` (safetensors, atomic, shapes checked).

The file holds the ``PrefixKV`` state dict (``kv``, or the embedding + MLP of a reparameterized prefix;
a cartridge's frozen tokens as ``frozen_kv``) and, in its metadata, the format name, its version and the
``PrefixConfig`` (a cartridge's kind and frozen count only when set, so other files are what earlier
versions wrote and read).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from .config import PrefixConfig, check_prefix_id
from .files import read_tensors, save_tensors
from .module import find_prefix

FORMAT_NAME = "prefixattn"
FORMAT_VERSION = "1"


def save_prefix(model: nn.Module, path: str | os.PathLike, *, prefix_id: int | None = None) -> None:
    """Write the model's prefix (only the prefix) to ``path`` as safetensors, atomically.

    With ``prefix_id`` (bank models), writes that single entry, loadable into any entry of a bank with
    the same shapes or into a single-prefix model. The file's metadata records the prefix shapes, and
    ``load_prefix`` checks them against the model.
    """
    module = find_prefix(model)
    config = module.config
    check_prefix_id(prefix_id, config)
    state = dict(module.state_dict())
    if prefix_id is not None:
        state = _entry(state, prefix_id)
        config = config.single_entry()
    metadata = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": config.to_json()}
    save_tensors(path, state, metadata)


def _mismatches(file_cfg: PrefixConfig, model_cfg: PrefixConfig, single_entry: bool) -> list[str]:
    out = []
    keys = ["num_tokens", "num_kv_heads", "head_dim", "layers", "num_layers", "layer_shapes", "projection",
            "projection_hidden_size", "num_frozen_tokens"]
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
    module = find_prefix(model)
    check_prefix_id(prefix_id, module.config)
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
        expected = _entry(expected, prefix_id)
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
        params = dict(module.state_dict(keep_vars=True))
        if prefix_id is not None:
            params = _entry(params, prefix_id)
        for name, t in tensors.items():
            params[name].copy_(t.to(device=params[name].device, dtype=params[name].dtype))


def _entry(state: dict[str, torch.Tensor], prefix_id: int) -> dict[str, torch.Tensor]:
    """One bank entry of a raw prefix's state (``kv``, and ``frozen_kv`` of a cartridge): views of the
    (L, 2, N, ...) tensors at entry ``prefix_id``."""
    return {name: t[:, :, prefix_id : prefix_id + 1] for name, t in state.items()}
