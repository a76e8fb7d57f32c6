"""Loading a patched model's ``save_pretrained`` directory (written by ``saved.py``) back as the trained
model: ``AutoModelForCausalLM.from_pretrained(dir)`` (and the Auto classes of encoders and
encoder-decoders: ``AUTO_CLASSES``) knows ``model_type="prefixattn"`` once ``prefixattn.hf`` is imported
(``register_auto_classes``), and through the directory's loader module with ``trust_remote_code=True`` in
a process that has not imported it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch.nn as nn
import transformers
from transformers import AutoConfig

from ..prefix import PrefixConfig, load_prefix
from ..prefix.files import read_tensors
from .patcher import patch_model
from .saved import AUTO_CLASSES, MODEL_TYPE, PREFIX_FILE, PrefixattnCheckpointConfig, loader_class_name


def _how_to_load(directory: str, reason: str) -> str:
    return (f"{directory!r} was saved by a prefixattn-patched model: it holds the trained prefix, not the "
            f"base model's weights, and {reason}. Load it with AutoModelForCausalLM.from_pretrained("
            f"{directory!r}, base_model='path/to/the/base/model'), or load the base model yourself and call "
            f"prefixattn.hf.load_prefix_into(model, {directory!r})")


def _prefix_config(path: Path) -> PrefixConfig:
    _, metadata = read_tensors(path, "prefix file")
    if "config" not in metadata:
        raise ValueError(f"{str(path)!r} is not a prefixattn prefix file")
    return PrefixConfig.from_json(metadata["config"])


def load_prefix_into(model: nn.Module, directory: str | os.PathLike, backend: str = "auto") -> nn.Module:
    """Patch an unpatched base model with the shape of ``directory``'s prefix and load it; returns the
    model. (``directory``: a patched model's save_pretrained output, or a prefix file.)"""
    path = Path(directory)
    if path.is_dir():
        path = path / PREFIX_FILE
    cfg = _prefix_config(path)
    where = {"sites": cfg.sites} if cfg.sites else {"layers": list(cfg.layers)}  # an encoder-decoder's sites
    model = patch_model(model, num_prefix_tokens=cfg.num_tokens, **where,
                        num_prefixes=cfg.num_prefixes if cfg.bank else None, prefix_projection=cfg.projection,
                        projection_hidden_size=cfg.projection_hidden_size or None, init="zeros",
                        backend=backend, cartridge=cfg.cartridge,
                        num_frozen_tokens=cfg.num_frozen_tokens if cfg.cartridge else None)
    load_prefix(model, path)
    return model


class PrefixattnCheckpointModel:
    """The AutoModelForCausalLM entry of ``model_type="prefixattn"``: ``from_pretrained`` returns the
    patched base model with the trained prefix (not an instance of this class). One subclass per Auto class
    (``AUTO_CLASSES``) loads the base model with that Auto class."""

    config_class = PrefixattnCheckpointConfig
    auto_class = "AutoModelForCausalLM"

    @classmethod
    def register_for_auto_class(cls, auto_class: Any = None) -> None:
        """transformers calls this on a class loaded as custom code; nothing to record here."""

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *model_args: Any,
                        config: PrefixattnCheckpointConfig | None = None, base_model: str | None = None,
                        backend: str | None = None, **kwargs: Any) -> nn.Module:
        directory = str(directory)
        if not os.path.isdir(directory):
            raise ValueError(f"{directory!r}: a prefixattn checkpoint is a local directory")
        if config is None:
            config = PrefixattnCheckpointConfig.from_pretrained(directory)
        for name in ("_from_auto", "adapter_kwargs", "revision", "subfolder", "code_revision"):
            kwargs.pop(name, None)  # these belong to this directory's loading, not the base model's
        base_path = base_model or config.base_model_name_or_path
        if not base_path:
            raise ValueError(_how_to_load(directory, "the model it was saved from had no path (it was built "
                                                     "from a config)"))
        try:
            base = getattr(transformers, cls.auto_class).from_pretrained(base_path, *model_args, **kwargs)
        except (OSError, ValueError) as e:  # a missing path, a directory without a model
            raise ValueError(_how_to_load(directory, f"its base model {base_path!r} cannot be loaded "
                                                     f"({e})")) from e
        recorded = config.base_config.get("model_type")
        if recorded and base.config.model_type != recorded:
            raise ValueError(_how_to_load(directory, f"it was trained on a {recorded!r} model but "
                                                     f"{base_path!r} is a {base.config.model_type!r} model"))
        return load_prefix_into(base, directory, backend=backend or config.backend)


# the entry of each Auto class (the loader module of a saved directory imports them by these names)
CHECKPOINT_MODELS: dict[str, type] = {"AutoModelForCausalLM": PrefixattnCheckpointModel}
for _auto in AUTO_CLASSES[1:]:
    CHECKPOINT_MODELS[_auto] = type(loader_class_name(_auto), (PrefixattnCheckpointModel,),
                                    {"auto_class": _auto, "__module__": __name__})
    globals()[loader_class_name(_auto)] = CHECKPOINT_MODELS[_auto]


def register_auto_classes() -> None:
    """``AutoConfig`` and ``AUTO_CLASSES`` know ``model_type="prefixattn"`` (idempotent)."""
    AutoConfig.register(MODEL_TYPE, PrefixattnCheckpointConfig, exist_ok=True)
    for auto, model_class in CHECKPOINT_MODELS.items():
        getattr(transformers, auto).register(PrefixattnCheckpointConfig, model_class, exist_ok=True)
