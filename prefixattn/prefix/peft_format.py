"""PEFT's prefix-tuning adapter FORMAT: writing one (``save_peft``), reading and validating one
(``read_peft_adapter``), and checking an adapter's shape against a prefix. PEFT's CARTRIDGE adapters
(``peft.CartridgeConfig``) use the same files: peft_type "CARTRIDGE", ``num_frozen_tokens`` in the config
(no ``prefix_projection`` / ``encoder_hidden_size``), the same ``prompt_embeddings`` tensor and layout.

PEFT's saved prefix-tuning adapter is a directory with

- ``adapter_config.json``: peft_type "PREFIX_TUNING", task_type ("CAUSAL_LM"; "SEQ_2_SEQ_LM" for
  encoder-decoders; "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION" for encoders),
  num_virtual_tokens (P), num_layers (L), token_dim (Hkv*D), num_attention_heads (Hkv),
  num_transformer_submodules (1; 2 for encoder-decoders), modules_to_save (the task head's names), ...
- ``adapter_model.safetensors``: one tensor ``prompt_embeddings`` of shape (P, L*2*Hkv*D), each row laid
  out [layer][k|v][Hkv][D] (``peft_rows``). For Gemma 4, Hkv x D is its largest layer's shape; smaller
  layers read the leading heads and dims, larger ones get no prefix (``PeftLayout``). With
  ``prefix_projection`` the MLP is already applied (PEFT saves its output), so ``save_peft`` writes
  ``prefix_projection: false``: the file is the prefix itself. Encoder-decoders: decoder self-attention
  layer i reads the keys and values of block 2i mod L (``PrefixConfig.sites == "decoder"``). Task heads
  (PEFT's modules_to_save): ``base_model.<module path>.<name>`` tensors next to the prompt.

Loading an adapter into a model (which may patch it) is the transformers layer's job
(``prefixattn.hf.peft_models.load_peft``).
"""

from __future__ import annotations

import json
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn as nn

from .config import PeftLayout, PrefixConfig, check_prefix_id
from .files import atomic_write, read_tensors
from .heads import PEFT_PREFIX, head_tensors
from .module import PrefixKV, find_prefix_owner
from .peft_rows import kv_to_peft_rows

# PEFT's task types that prefixattn reads and writes
TASK_TYPES = ("CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")

PEFT_TYPES = ("PREFIX_TUNING", "CARTRIDGE")  # the adapters holding a KV prefix, in PEFT's one layout
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"


def check_against_peft_config(ours: PrefixConfig, peft_cfg: Any, what: str) -> None:
    """The layers and KV shape a PEFT config (object or dict; missing fields pass) gives match ``ours``."""
    if isinstance(peft_cfg, dict):
        get = peft_cfg.get
    else:
        get = lambda k: getattr(peft_cfg, k, None)
    problems = []
    for key, value in (("num_layers", ours.num_layers), ("token_dim", ours.token_dim),
                       ("num_attention_heads", ours.num_kv_heads)):
        if get(key) is not None and get(key) != value:
            problems.append(f"{key}: {what} has {get(key)}, the model needs {value}")
    if problems:
        raise ValueError(f"{what} does not match the model: " + "; ".join(problems))


def _peft_version() -> str | None:
    try:
        return version("peft")
    except PackageNotFoundError:
        return None


def _peft_config_dict(config: PrefixConfig, layout: PeftLayout, base_model: nn.Module,
                      peft_type: str) -> dict[str, Any]:
    name = getattr(getattr(base_model, "config", None), "_name_or_path", None) or None
    if peft_type == "CARTRIDGE":  # the fields peft.CartridgeConfig writes
        return {
            "task_type": "CAUSAL_LM",
            "peft_type": "CARTRIDGE",
            "auto_mapping": None,
            "peft_version": _peft_version(),
            "base_model_name_or_path": name,
            "revision": None,
            "inference_mode": True,
            "num_virtual_tokens": config.num_tokens,
            "token_dim": config.token_dim,
            "num_transformer_submodules": 1,
            "num_attention_heads": config.num_kv_heads,
            "num_layers": config.num_layers,
            "modules_to_save": None,
            "num_frozen_tokens": config.num_frozen_tokens,
        }
    return {
        "task_type": layout.task_type,
        "peft_type": "PREFIX_TUNING",
        "auto_mapping": None,
        "peft_version": _peft_version(),
        "base_model_name_or_path": name,
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": config.num_tokens,
        "token_dim": config.token_dim,
        "num_transformer_submodules": layout.submodules,
        "num_attention_heads": config.num_kv_heads,
        "num_layers": config.num_layers,
        "modules_to_save": list(layout.modules_to_save) or None,
        "init_weights": None,
        "encoder_hidden_size": config.token_dim,
        "prefix_projection": False,
    }


def peft_layout(module: PrefixKV) -> PeftLayout:
    """How PEFT lays this prefix's model out (the patcher records it; uniform without it)."""
    return module.peft_layout or PeftLayout.uniform(module.config)


def peft_format_problems(model: nn.Module) -> list[str]:
    """Why the model's prefix cannot be written as a PEFT adapter (empty: ``save_peft`` can write it)."""
    module = find_prefix_owner(model)[1]
    return peft_layout(module).problems(module.config)


def save_peft(model: nn.Module, save_directory: str | os.PathLike, *, prefix_id: int | None = None,
              peft_type: str | None = None) -> None:
    """Write the prefix as a PEFT adapter (loadable with ``peft.PeftModel.from_pretrained``).

    ``peft_type``: "PREFIX_TUNING" or "CARTRIDGE"; by default the prefix's own kind: a cartridge
    (``patch(..., cartridge=True)``, ``load_peft`` of a CARTRIDGE adapter, ``patch(peft_cartridge_model)``)
    is written as CARTRIDGE with its ``num_frozen_tokens``, any other prefix as PREFIX_TUNING. Either kind
    can be written as the other: the values are the same; a cartridge written as PREFIX_TUNING loses its
    frozen count (PEFT then trains every token), a prefix written as CARTRIDGE has the frozen count it was
    patched with (0 unless set). An MLP-reparameterized prefix is written with its MLP applied.

    For a bank, ``prefix_id`` picks the entry to export (required). The prefix must be the one PEFT puts
    on the model: every layer (PEFT has no per-layer opt-out), or for Gemma 4 the layers that fit its
    largest layer's shape; latent attention (which PEFT cannot run) is refused. Both files are staged as
    temporary files and renamed into place.
    """
    owner, module = find_prefix_owner(model)
    c = module.config
    check_prefix_id(prefix_id, c)
    if peft_type is None:
        peft_type = "CARTRIDGE" if c.cartridge else "PREFIX_TUNING"
    if peft_type not in PEFT_TYPES:
        raise ValueError(f"peft_type must be one of {PEFT_TYPES}, got {peft_type!r}")
    if c.bank and prefix_id is None:
        raise ValueError(f"the model has a bank of {c.num_prefixes} prefixes: pass prefix_id to choose the "
                         "entry to export as a PEFT adapter")
    problems = peft_format_problems(model)
    if problems:
        raise ValueError("this prefix cannot be saved in PEFT's adapter format: " + "; ".join(problems)
                         + ". save_prefix writes any prefix")
    with torch.no_grad():
        kv = module.compute()[:, :, prefix_id or 0].float()  # (L, 2, Hkv, P, D)
    layout = peft_layout(module)
    if peft_type == "CARTRIDGE" and layout.task_type != "CAUSAL_LM":
        raise ValueError(f"a {layout.task_type} model's prefix cannot be written as a CARTRIDGE adapter: "
                         "prefixattn writes CARTRIDGE adapters of causal LMs only; use "
                         "peft_type='PREFIX_TUNING'")
    tensors = {"prompt_embeddings": kv_to_peft_rows(kv, c).cpu()}
    tensors.update({k: v.cpu().contiguous() for k, v in head_tensors(owner, module, PEFT_PREFIX).items()})
    cfg = _peft_config_dict(c, layout, owner, peft_type)
    write_adapter(Path(save_directory), tensors, json.dumps(cfg, indent=2) + "\n")


def write_adapter(directory: Path, tensors: dict[str, torch.Tensor], config_text: str) -> None:
    """Write a PEFT adapter directory (weights + config) so that an error leaves no partial adapter:
    both files are staged as temporary files, then renamed into place."""
    directory.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[str, Path]] = []
    try:
        writers = (
            (WEIGHTS_NAME,
             lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata={"format": "pt"})),
            (CONFIG_NAME, lambda tmp: Path(tmp).write_text(config_text)),
        )
        for name, write in writers:
            tmp = directory / f".{name}.staged"
            atomic_write(tmp, write)
            staged.append((name, tmp))
        for name, tmp in staged:
            os.replace(tmp, directory / name)
        staged.clear()
    finally:
        for _, tmp in staged:
            tmp.unlink(missing_ok=True)


def read_peft_adapter(directory: str | os.PathLike
                      ) -> tuple[dict[str, Any], torch.Tensor, dict[str, torch.Tensor]]:
    """Validate and read a PEFT prefix-tuning adapter directory: (config dict, prompt_embeddings, the task
    head's tensors as ``base_model.<module path>.<name>``, empty without one)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"PEFT adapter directory {str(directory)!r} does not exist")
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} has no {CONFIG_NAME}; not a PEFT adapter directory")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(cfg_path)!r} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{str(cfg_path)!r} is not a JSON object")
    if cfg.get("peft_type") not in PEFT_TYPES:
        raise ValueError(f"{str(directory)!r} is a {cfg.get('peft_type')!r} adapter; load_peft reads "
                         "PREFIX_TUNING and CARTRIDGE")
    task = cfg.get("task_type") or "CAUSAL_LM"
    if task not in TASK_TYPES:
        raise ValueError(f"{str(directory)!r} is a {task} adapter; load_peft reads {', '.join(TASK_TYPES)}")
    submodules = cfg.get("num_transformer_submodules") or 1
    if submodules != (2 if task == "SEQ_2_SEQ_LM" else 1):
        raise ValueError(f"{str(directory)!r} has num_transformer_submodules={submodules}, which PEFT does "
                         f"not write for {task} (2 for SEQ_2_SEQ_LM, else 1)")
    for key in ("num_virtual_tokens", "num_layers", "token_dim", "num_attention_heads"):
        if not isinstance(cfg.get(key), int) or cfg[key] < 1:
            raise ValueError(f"{str(cfg_path)!r}: {key} must be a positive int, got {cfg.get(key)!r}")
    if cfg["peft_type"] == "CARTRIDGE":
        frozen = cfg.get("num_frozen_tokens", 1)  # CartridgeConfig's default
        valid = isinstance(frozen, int) and not isinstance(frozen, bool)
        if not valid or not 0 <= frozen <= cfg["num_virtual_tokens"]:
            raise ValueError(f"{str(cfg_path)!r}: num_frozen_tokens must be an int in [0, num_virtual_tokens="
                             f"{cfg['num_virtual_tokens']}], got {frozen!r}")
        cfg["num_frozen_tokens"] = frozen
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        if (directory / PICKLE_WEIGHTS_NAME).is_file():
            raise ValueError(f"{str(directory)!r} holds {PICKLE_WEIGHTS_NAME} (a pickle); prefixattn reads "
                             "only safetensors (re-save it with PEFT's safe_serialization=True)")
        raise FileNotFoundError(f"{str(directory)!r} has no {WEIGHTS_NAME}")
    tensors, _ = read_tensors(weights, "PEFT adapter weights")
    head = {k: tensors.pop(k) for k in list(tensors) if k.startswith(PEFT_PREFIX)}
    if set(tensors) != {"prompt_embeddings"}:
        raise ValueError(f"{str(weights)!r} has tensors {sorted(tensors)}; a prefix-tuning adapter has "
                         "'prompt_embeddings' (and the task head's base_model.* tensors)")
    emb = tensors["prompt_embeddings"]
    P, L, token_dim = cfg["num_virtual_tokens"], cfg["num_layers"], cfg["token_dim"]
    expected = (P, L * 2 * token_dim)
    if tuple(emb.shape) != expected:
        raise ValueError(f"{str(weights)!r}: prompt_embeddings has shape {tuple(emb.shape)}, but the config "
                         f"(num_virtual_tokens={P}, num_layers={L}, token_dim={token_dim}) says {expected}")
    if not emb.is_floating_point() or not torch.isfinite(emb).all():
        raise ValueError(f"{str(weights)!r}: prompt_embeddings must hold finite floats")
    return cfg, emb, head


def check_adapter_for(module: PrefixKV, cfg: dict[str, Any], where: str) -> None:
    """An adapter config (from ``read_peft_adapter``) fits the prefix of ``module`` exactly."""
    ours = module.config
    problems = []
    task, expected_task = cfg.get("task_type") or "CAUSAL_LM", peft_layout(module).task_type
    if task != expected_task and {task, expected_task} != {"CAUSAL_LM", "FEATURE_EXTRACTION"}:
        problems.append(f"it is a {task} adapter, the model takes {expected_task} (PEFT's task type for "
                        "it)")
    if ours.projection:
        problems.append("the model's prefix is MLP-reparameterized (prefix_projection=True); a PEFT "
                        "adapter holds prefix values")
    problems += peft_layout(module).problems(ours)
    for key, value in (("num_virtual_tokens", ours.num_tokens), ("num_layers", ours.num_layers),
                       ("token_dim", ours.token_dim), ("num_attention_heads", ours.num_kv_heads)):
        if cfg[key] != value:
            problems.append(f"{key}: adapter has {cfg[key]}, model has {value}")
    # a CARTRIDGE adapter's frozen tokens stay frozen; a PREFIX_TUNING adapter's values fill any prefix
    if cfg["peft_type"] == "CARTRIDGE" and cfg["num_frozen_tokens"] != ours.num_frozen_tokens:
        problems.append(f"num_frozen_tokens: adapter has {cfg['num_frozen_tokens']}, model has "
                        f"{ours.num_frozen_tokens} (patch with cartridge=True, num_frozen_tokens="
                        f"{cfg['num_frozen_tokens']}, or let load_peft patch an unpatched model)")
    if problems:
        raise ValueError(f"PEFT adapter {where!r} does not match the model: " + "; ".join(problems))
