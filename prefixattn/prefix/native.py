"""prefixattn's own prefix file: ``save_prefix`` / ``load_prefix`` (safetensors, atomic, shapes checked).

The file holds the ``PrefixKV`` state dict (``kv``, or the embedding + MLP of a reparameterized prefix;
a cartridge's frozen tokens as ``frozen_kv``) and, in its metadata, the format name, its version and the
``PrefixConfig`` (a cartridge's kind and frozen count only when set). Version 2 (written only when needed,
so that earlier readers keep reading the rest) adds an encoder-decoder's sites to the config and the task
head that trains with the prefix (``head.<module path>.<name>`` tensors, their module paths in the
metadata's ``heads``). Both versions are read.
"""

from __future__ import annotations

import json
import os
import warnings

import torch
import torch.nn as nn

from .config import PrefixConfig, check_prefix_id
from .files import read_tensors, save_tensors
from .heads import NATIVE_PREFIX, head_problems, head_tensors, load_head_tensors
from .module import PrefixKV, find_prefix_owner

FORMAT_NAME = "prefixattn"
FORMAT_VERSION = "1"  # a decoder-only or encoder-only prefix without a task head
EXTENDED_VERSION = "2"  # an encoder-decoder's sites, or a task head
READ_VERSIONS = (FORMAT_VERSION, EXTENDED_VERSION)


def save_prefix(model: nn.Module, path: str | os.PathLike, *, prefix_id: int | None = None) -> None:
    """Write the model's prefix (only the prefix) to ``path`` as safetensors, atomically.

    With ``prefix_id`` (bank models), writes that single entry, loadable into any entry of a bank with
    the same shapes or into a single-prefix model. The file's metadata records the prefix shapes, and
    ``load_prefix`` checks them against the model.
    """
    owner, module = find_prefix_owner(model)
    config = module.config
    check_prefix_id(prefix_id, config)
    state = dict(module.state_dict())
    if prefix_id is not None:
        state = _entry(state, prefix_id)
        config = config.single_entry()
    extended = config.extended or bool(module.heads)
    metadata = {"format": FORMAT_NAME, "version": EXTENDED_VERSION if extended else FORMAT_VERSION,
                "config": config.to_json()}
    if module.heads:
        state.update(head_tensors(owner, module, NATIVE_PREFIX))
        metadata["heads"] = json.dumps(list(module.heads))
    save_tensors(path, state, metadata)


def _mismatches(file_cfg: PrefixConfig, model_cfg: PrefixConfig, single_entry: bool) -> list[str]:
    out = []
    keys = ["num_tokens", "num_kv_heads", "head_dim", "sites", "layers", "roles", "num_layers",
            "layer_shapes", "projection", "projection_hidden_size", "num_frozen_tokens"]
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
    owner, module = find_prefix_owner(model)
    check_prefix_id(prefix_id, module.config)
    tensors, metadata = read_tensors(path, "prefix file")
    if metadata.get("format") != FORMAT_NAME:
        hint = (" (it looks like a PEFT adapter: use prefixattn.load_peft)" if "prompt_embeddings" in tensors
                else "")
        raise ValueError(f"{str(path)!r} is not a prefixattn prefix file{hint}")
    if metadata.get("version") not in READ_VERSIONS:
        raise ValueError(f"{str(path)!r} has prefix format version {metadata.get('version')!r}; "
                         f"this prefixattn reads versions {', '.join(READ_VERSIONS)}")
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

    head = {k: tensors.pop(k) for k in list(tensors) if k.startswith(NATIVE_PREFIX)}
    problems = _head_problems(owner, module, head, metadata, str(path))
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
    if head:
        load_head_tensors(owner, module, head, NATIVE_PREFIX)


def _entry(state: dict[str, torch.Tensor], prefix_id: int) -> dict[str, torch.Tensor]:
    """One bank entry of a raw prefix's state (``kv``, and ``frozen_kv`` of a cartridge): views of the
    (L, 2, N, ...) tensors at entry ``prefix_id``."""
    return {name: t[:, :, prefix_id : prefix_id + 1] for name, t in state.items()}


def _head_problems(owner: nn.Module, module: PrefixKV, head: dict[str, torch.Tensor],
                   metadata: dict[str, str], where: str) -> list[str]:
    """The file's task head against the model's (checked before anything is loaded)."""
    try:
        names = json.loads(metadata.get("heads", "[]"))
    except json.JSONDecodeError:
        return ["its 'heads' metadata is not JSON"]
    if not head and not names:
        if module.heads:
            warnings.warn(f"prefixattn: {where!r} holds a prefix without the task head {list(module.heads)}; "
                          "the model's head is left as it is", stacklevel=3)
        return []
    if tuple(names) != tuple(module.heads):
        return [f"task head: file has {names}, model has {list(module.heads)}"]
    return head_problems(owner, module, head, NATIVE_PREFIX)
