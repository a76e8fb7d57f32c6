"""What ``save_pretrained`` writes for a patched model (loading it back: ``checkpoint.py``).

A patched model saves only its prefix into ``model.safetensors`` (transformers is handed the prefix's
state dict alone, never the frozen model's): the HF Trainer's checkpoints stay small, and its resume loads
that file into the patched model. Read as the base model by ``AutoModelForCausalLM.from_pretrained(dir)``,
the same file would give a randomly initialised model without an error. So the directory says what it is:

    config.json                model_type "prefixattn": the base model's config and path, the backend
    prefix.safetensors         the prefix (``prefixattn.save_prefix``: shapes in its metadata)
    prefixattn_checkpoint.py   imports the loader (checkpoint.py): transformers' custom-code hook
    model.safetensors          the prefix again, under the model's parameter names (the Trainer's resume)

``AutoModelForCausalLM.from_pretrained(dir)`` then loads the trained model: the base from its recorded path
(or ``base_model=``), patched, with the prefix. In a process that has not imported ``prefixattn.hf``,
transformers refuses the unknown model type and asks for ``trust_remote_code=True``, which runs the two
lines and loads the same way. Never the base model alone, silently.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch.nn as nn
from transformers import PreTrainedConfig

from ..prefix import save_prefix
from ..prefix.files import atomic_write

MODEL_TYPE = "prefixattn"
PREFIX_FILE = "prefix.safetensors"
LOADER_MODULE = "prefixattn_checkpoint"
# the Auto classes that load such a directory as the trained model (the first: the original one)
AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModelForSpeechSeq2Seq",
                "AutoModelForSequenceClassification", "AutoModelForTokenClassification",
                "AutoModelForQuestionAnswering", "AutoModelForMaskedLM", "AutoModel")


def loader_class_name(auto_class: str) -> str:
    """The loader's entry for an Auto class: PrefixattnCheckpointModel (causal LMs),
    PrefixattnCheckpointForSeq2SeqLM, ..."""
    suffix = auto_class.removeprefix("AutoModel")
    if suffix == "ForCausalLM":
        return "PrefixattnCheckpointModel"
    return f"PrefixattnCheckpoint{suffix or 'Base'}"


_LOADER_SOURCE = '''"""A prefixattn-patched model saved with save_pretrained(): the base model's path and
config, and the trained prefix. Load it with AutoModelForCausalLM.from_pretrained(this_dir) (or the Auto
class of the base model: AutoModelForSeq2SeqLM, AutoModelForSequenceClassification, ...; prefixattn
installed; pass trust_remote_code=True unless prefixattn.hf is imported), or base_model="path" where the
base model moved."""
from prefixattn.hf.checkpoint import (  # noqa: F401
    PrefixattnCheckpointConfig,
{imports})
'''.replace("{imports}", "".join(f"    {loader_class_name(a)},\n" for a in AUTO_CLASSES))


class PrefixattnCheckpointConfig(PreTrainedConfig):
    """config.json of a patched model's save_pretrained directory (see the module docstring)."""

    model_type = MODEL_TYPE

    def __init__(self, base_config: dict | None = None, base_model_name_or_path: str | None = None,
                 prefix_file: str = PREFIX_FILE, backend: str = "auto", **kwargs: Any) -> None:
        self.base_config = dict(base_config or {})
        self.base_model_name_or_path = base_model_name_or_path or None
        self.prefix_file = prefix_file
        self.backend = backend
        super().__init__(**kwargs)


def mark_directory(model: nn.Module, directory: str | os.PathLike, backend: str) -> None:
    """After transformers' save_pretrained: the prefix file, the loader hook, and config.json rewritten as
    a ``prefixattn`` checkpoint config (written last, atomically)."""
    directory = Path(directory)
    save_prefix(model, directory / PREFIX_FILE)
    atomic_write(directory / f"{LOADER_MODULE}.py", lambda tmp: Path(tmp).write_text(_LOADER_SOURCE))
    base_config = model.config.to_dict()
    config = PrefixattnCheckpointConfig(
        base_config=base_config, base_model_name_or_path=getattr(model.config, "_name_or_path", None),
        backend=backend,
        auto_map={"AutoConfig": f"{LOADER_MODULE}.PrefixattnCheckpointConfig",
                  **{auto: f"{LOADER_MODULE}.{loader_class_name(auto)}" for auto in AUTO_CLASSES}},
    )
    text = json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"
    atomic_write(directory / "config.json", lambda tmp: Path(tmp).write_text(text))


@contextlib.contextmanager
def _quantizer_hidden(model: nn.Module) -> Iterator[None]:
    """transformers' save_pretrained replaces the state dict it is handed by its quantizer's, which for
    bitsandbytes is None, i.e. ``model.state_dict()`` of the whole model (transformers 5.25): with the
    quantizer out of sight it writes the state dict it is given. The tensors written are the prefix's and the
    head's, none of them quantized, so nothing the quantizer adds to a save applies to them."""
    quantizer = model.__dict__.get("hf_quantizer")
    if quantizer is None:
        yield
        return
    model.__dict__["hf_quantizer"] = None
    try:
        yield
    finally:
        model.__dict__["hf_quantizer"] = quantizer


class SavePretrainedWithPrefix:
    """``model.save_pretrained`` of a patched model: transformers' own, handed the state dict of the kept
    modules (the prefix, the task head) alone, then ``mark_directory``. transformers would otherwise call
    ``model.state_dict()`` on the whole model, frozen base included, which is not a plain read for every
    base: bitsandbytes 4-bit on a CPU unpacks and requantizes its weights there (and so changes the model).
    A state dict the caller passes (the Trainer's, under FSDP or DeepSpeed) is cut down to the kept modules.
    It holds the model (not a bound method) so that deep copies of the model get their own."""

    def __init__(self, model: nn.Module, backend: str, kept: tuple[str, ...]) -> None:
        self.model = model
        self.backend = backend
        self.kept = kept

    def _kept_state(self, given: dict[str, Any] | None) -> dict[str, Any]:
        if given is not None:
            return {k: v for k, v in given.items() if any(k.startswith(name + ".") for name in self.kept)}
        state: dict[str, Any] = {}
        for name in self.kept:
            state.update(self.model.get_submodule(name).state_dict(prefix=name + "."))
        return state

    def __call__(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        save = type(self.model).save_pretrained
        bound = inspect.signature(save).bind(self.model, save_directory, *args, **kwargs)
        bound.arguments["state_dict"] = self._kept_state(bound.arguments.get("state_dict"))
        with _quantizer_hidden(self.model):
            out = save(*bound.args, **bound.kwargs)
        if bound.arguments.get("is_main_process", True):
            mark_directory(self.model, save_directory, self.backend)
        return out
