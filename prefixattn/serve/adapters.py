"""The prefixes ``prefixattn serve`` serves, read from ``NAME=PATH`` arguments and checked against the model.

PATH is one of

- a PEFT prefix-tuning adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``: what
  PEFT's ``save_pretrained`` and ``prefixattn.save_peft`` write; an MLP reparameterization is already
  baked into the saved rows);
- a prefixattn prefix file (``prefixattn.save_prefix``), raw or MLP-reparameterized (the MLP is run
  once here); a bank of N prefixes is served as N names, ``NAME/0`` ... ``NAME/N-1``;
- a directory holding ``prefix.safetensors`` (the output directory of ``prefixattn train``).

Each served prefix becomes its keys and values, (L, 2, Hkv, P, D) in fp32, for every layer of the model.
Everything is validated here, before vLLM starts: a bad path, a file of another format, a shape that does
not fit the model, a prefix on only some layers, non-finite values: each a ValueError naming the
adapter and the problem.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..prefix import PrefixConfig, PrefixKV, peft_rows_to_kv, read_peft_adapter
from ..prefix.files import read_tensors
from ..prefix.native import EXTENDED_VERSION, FORMAT_NAME, FORMAT_VERSION
from ..prefix.peft_format import CONFIG_NAME
from .model_layout import ServedModel

PREFIX_FILE_IN_DIR = "prefix.safetensors"  # what `prefixattn train` writes into its output directory
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")


@dataclass(frozen=True)
class ServedPrefix:
    name: str
    source: str  # where it was read from, for messages and /v1/models
    kv: torch.Tensor  # (L, 2, Hkv, P, D) fp32, contiguous, every layer of the model
    made_for: str | None = None  # the base model the adapter names (PEFT's base_model_name_or_path)

    @property
    def num_tokens(self) -> int:
        return int(self.kv.shape[3])


def parse_prefix_arg(text: str) -> tuple[str, str]:
    """``NAME=PATH`` -> (name, path), with a clear error for anything else."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--prefix {text!r}: expected NAME=PATH (a PEFT adapter directory or a prefixattn "
                         "prefix file)")
    check_name(name)
    return name, path


def check_name(name: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"prefix name {name!r}: use 1-128 characters from letters, digits and ._:/@+- "
                         "(starting with a letter or digit)")


def _check_values(kv: torch.Tensor, what: str = "the prefix") -> torch.Tensor:
    if not kv.is_floating_point() or not torch.isfinite(kv).all():
        raise ValueError(f"{what} holds non-finite values")
    return kv.float().contiguous()


def _read_peft(directory: Path, model: ServedModel) -> tuple[torch.Tensor, str | None]:
    cfg, rows, _ = read_peft_adapter(directory)
    if (cfg.get("task_type") or "CAUSAL_LM") != "CAUSAL_LM":
        raise ValueError(f"PEFT adapter {str(directory)!r} is a {cfg['task_type']} adapter; prefixattn serve "
                         "serves CAUSAL_LM adapters")
    P, L, token_dim, heads = (cfg["num_virtual_tokens"], cfg["num_layers"], cfg["token_dim"],
                              cfg["num_attention_heads"])
    if token_dim % heads:
        raise ValueError(f"PEFT adapter {str(directory)!r}: token_dim {token_dim} is not a multiple of "
                         f"num_attention_heads {heads}")
    problems = []
    if L != model.num_layers:
        problems.append(f"num_layers: adapter has {L}, model has {model.num_layers}")
    if (heads, token_dim // heads) != (model.num_kv_heads, model.head_dim):
        problems.append(f"KV heads x head dim: adapter has {heads} x {token_dim // heads}, model has "
                        f"{model.num_kv_heads} x {model.head_dim}")
    if problems:
        raise ValueError(f"PEFT adapter {str(directory)!r} does not fit the model: " + "; ".join(problems))
    shape = PrefixConfig(num_tokens=P, num_kv_heads=heads, head_dim=token_dim // heads,
                         layers=tuple(range(L)), num_layers=L)
    made_for = cfg.get("base_model_name_or_path")
    return peft_rows_to_kv(rows, shape)[:, :, 0], made_for if isinstance(made_for, str) else None


def _read_prefix_file(path: Path, model: ServedModel) -> torch.Tensor:
    """A prefixattn prefix file -> (N, L, 2, Hkv, P, D)."""
    tensors, metadata = read_tensors(path, "prefix file")
    if metadata.get("format") != FORMAT_NAME:
        hint = " (it holds PEFT's prompt_embeddings: pass the adapter's directory)" if (
            "prompt_embeddings" in tensors) else ""
        raise ValueError(f"{str(path)!r} is not a prefixattn prefix file{hint}")
    if metadata.get("version") == EXTENDED_VERSION:
        raise ValueError(f"{str(path)!r} holds an encoder-decoder's prefix or a task head (prefix format "
                         "version 2); prefixattn serve serves causal LMs' prefixes")
    if metadata.get("version") != FORMAT_VERSION:
        raise ValueError(f"{str(path)!r} has prefix format version {metadata.get('version')!r}; this "
                         f"prefixattn reads version {FORMAT_VERSION}")
    try:
        cfg = PrefixConfig.from_json(metadata["config"])
    except Exception as e:
        raise ValueError(f"{str(path)!r} has an unreadable prefix config: {e}") from e
    problems = []
    if cfg.num_layers != model.num_layers:
        problems.append(f"the prefix was made for a model of {cfg.num_layers} layers, this one has "
                        f"{model.num_layers}")
    elif tuple(cfg.layers) != tuple(range(model.num_layers)):
        problems.append(f"it covers layers {list(cfg.layers)} only: vLLM holds the prefix's slots in "
                        "every layer's cache, so a prefix must cover every layer")
    if cfg.latent:
        problems.append("it was made for latent attention (key head dim != value head dim), which vLLM's "
                        "cache cannot hold")
    elif cfg.layer_shapes and any(s != (cfg.num_kv_heads, cfg.head_dim, cfg.head_dim)
                                  for s in cfg.layer_shapes):
        problems.append("its layers differ in shape, which vLLM's cache cannot hold")
    if (cfg.num_kv_heads, cfg.head_dim) != (model.num_kv_heads, model.head_dim):
        problems.append(f"KV heads x head dim: file has {cfg.num_kv_heads} x {cfg.head_dim}, model has "
                        f"{model.num_kv_heads} x {model.head_dim}")
    if problems:
        raise ValueError(f"prefix file {str(path)!r} does not fit the model: " + "; ".join(problems))
    module = PrefixKV(cfg, init="zeros")
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expected:
        raise ValueError(f"prefix file {str(path)!r} has tensors {got}, its config says {expected}")
    for name, t in tensors.items():
        _check_values(t, f"prefix file {str(path)!r}, tensor {name!r},")
    module.load_state_dict({k: v.float() for k, v in tensors.items()})
    with torch.no_grad():
        kv = module.compute()  # (L, 2, N, Hkv, P, D), the MLP run once if there is one
    return kv.detach().permute(2, 0, 1, 3, 4, 5)


def read_prefixes(name: str, path: str | Path, model: ServedModel) -> list[ServedPrefix]:
    """The prefix(es) at ``path``, served as ``name`` (a bank: ``name/0`` ...)."""
    where = f"--prefix {name}={path}"
    try:
        return _read_prefixes(name, Path(path), model)
    except FileNotFoundError as e:
        raise ValueError(f"{where}: {e}") from e
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e


def _read_prefixes(name: str, p: Path, model: ServedModel) -> list[ServedPrefix]:
    if p.is_dir():
        if (p / CONFIG_NAME).is_file():
            kv, made_for = _read_peft(p, model)
            return [ServedPrefix(name, str(p), _check_values(kv), made_for)]
        if (p / PREFIX_FILE_IN_DIR).is_file():
            p = p / PREFIX_FILE_IN_DIR
        else:
            raise ValueError(f"the directory holds neither a PEFT adapter ({CONFIG_NAME}) nor a "
                             f"prefixattn prefix file ({PREFIX_FILE_IN_DIR})")
    elif not p.exists():
        raise ValueError("no such file or directory")
    bank = _read_prefix_file(p, model)
    if bank.shape[0] == 1:
        return [ServedPrefix(name, str(p), _check_values(bank[0]))]
    return [ServedPrefix(f"{name}/{i}", f"{p}#{i}", _check_values(bank[i], f"entry {i}"))
            for i in range(bank.shape[0])]


def names_another_model(made_for: str | None, model_dir: str | Path, config: dict) -> bool:
    """Whether an adapter's recorded base model (PEFT's ``base_model_name_or_path``) is another model than
    the one served: not the same directory, not the name the model's config records, and not a local
    copy of a hub id (the same last path component)."""
    if not made_for:
        return False
    here = Path(model_dir).resolve()
    if made_for in (str(model_dir), config.get("_name_or_path")):
        return False
    if Path(made_for).exists() and Path(made_for).resolve() == here:
        return False
    return made_for.rstrip("/").rsplit("/", 1)[-1].lower() != here.name.lower()


def read_all(specs: list[str], model: ServedModel, base_name: str) -> list[ServedPrefix]:
    """Every ``NAME=PATH`` spec read and checked; names must be unique and differ from the base model's."""
    if not specs:
        raise ValueError("give at least one --prefix NAME=PATH (to serve the base model alone, run vLLM "
                         "itself)")
    out: list[ServedPrefix] = []
    for spec in specs:
        name, path = parse_prefix_arg(spec)
        out.extend(read_prefixes(name, path, model))
    seen: set[str] = set()
    for prefix in out:
        if prefix.name == base_name:
            raise ValueError(f"prefix name {prefix.name!r} is the base model's served name")
        if prefix.name in seen:
            raise ValueError(f"prefix name {prefix.name!r} is given twice")
        seen.add(prefix.name)
    return out
