"""PEFT interop: patch a PEFT PrefixTuning model, and read/write PEFT's adapter format.

PEFT's saved prefix-tuning adapter is a directory with

- ``adapter_config.json``: peft_type "PREFIX_TUNING", task_type "CAUSAL_LM", num_virtual_tokens (P),
  num_layers (L), token_dim (Hkv*D), num_attention_heads (Hkv), num_transformer_submodules (1), ...
- ``adapter_model.safetensors``: one tensor ``prompt_embeddings`` of shape (P, L*2*Hkv*D), each row laid
  out [layer][k|v][Hkv][D] (PEFT's ``get_prompt``: view(P, 2L, Hkv, D), permute to (2L, Hkv, P, D),
  split in pairs). With ``prefix_projection`` the MLP is already applied (PEFT saves its output), so
  ``save_peft`` writes ``prefix_projection: false``: the file is the prefix itself.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .prefix import PrefixConfig, atomic_write, kv_to_peft_rows, peft_rows_to_kv, read_tensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"


def is_peft_prefix_model(model: Any) -> bool:
    """True for a ``peft.PeftModel`` (any subclass); False without importing peft otherwise."""
    if not type(model).__module__.startswith("peft"):
        return False
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _peft_type_name(value: Any) -> str:
    return getattr(value, "value", value)


def patch_peft_model(peft_model: nn.Module, *, dtype: torch.dtype = torch.float32, backend: str = "auto",
                     ignore_attention_dropout: bool = False) -> nn.Module:
    """Patch the base model of a PEFT PrefixTuning model with the same prefix; returns the base model.

    A trainable PEFT model with ``prefix_projection`` keeps its embedding + MLP (copied, trainable); any
    other carries over the prefix values themselves.
    """
    from .patch import patch

    config = peft_model.active_peft_config
    if _peft_type_name(config.peft_type) != "PREFIX_TUNING":
        raise ValueError(f"prefixattn.patch takes PEFT prefix-tuning models; this one is "
                         f"{_peft_type_name(config.peft_type)}")
    if (config.num_transformer_submodules or 1) != 1:
        raise ValueError("PEFT prefix tuning with num_transformer_submodules != 1 (encoder-decoder) is "
                         "not supported")
    encoder = peft_model.prompt_encoder[peft_model.active_adapter]
    base = peft_model.get_base_model()
    projection = bool(config.prefix_projection and not config.inference_mode)
    model = patch(base, num_prefix_tokens=config.num_virtual_tokens, prefix_projection=projection,
                  projection_hidden_size=config.encoder_hidden_size if projection else None, dtype=dtype,
                  backend=backend, ignore_attention_dropout=ignore_attention_dropout, init="zeros")
    from .patch import get_prefix_module

    module = get_prefix_module(model)
    _check_against_peft_config(module.config, config, "the PEFT model")
    with torch.no_grad():
        if projection:
            module.embedding.weight.copy_(encoder.embedding.weight)
            module.transform.load_state_dict(encoder.transform.state_dict())
        else:
            rows = encoder.embedding.weight[: config.num_virtual_tokens]
            module.set_values(peft_rows_to_kv(rows.detach().to(module.kv.dtype), module.config))
    return model


def _check_against_peft_config(ours: PrefixConfig, peft_cfg: Any, what: str) -> None:
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


def _peft_config_dict(config: PrefixConfig, base_model: nn.Module) -> dict[str, Any]:
    try:
        from peft import __version__ as peft_version
    except ImportError:
        peft_version = None
    name = getattr(getattr(base_model, "config", None), "_name_or_path", None) or None
    return {
        "task_type": "CAUSAL_LM",
        "peft_type": "PREFIX_TUNING",
        "auto_mapping": None,
        "peft_version": peft_version,
        "base_model_name_or_path": name,
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": config.num_tokens,
        "token_dim": config.token_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": config.num_kv_heads,
        "num_layers": config.num_layers,
        "modules_to_save": None,
        "init_weights": None,
        "encoder_hidden_size": config.token_dim,
        "prefix_projection": False,
    }


def save_peft(model: nn.Module, save_directory: str | os.PathLike, *, prefix_id: int | None = None) -> None:
    """Write the prefix as a PEFT prefix-tuning adapter (loadable with ``peft.PeftModel.from_pretrained``).

    For a bank, ``prefix_id`` picks the entry to export (required). Every layer must carry a prefix
    (PEFT has no per-layer opt-out). Both files are staged as temporary files and renamed into place.
    """
    from .patch import get_prefix_module
    from .prefix import _check_prefix_id

    module = get_prefix_module(model)
    c = module.config
    _check_prefix_id(prefix_id, c)
    if c.bank and prefix_id is None:
        raise ValueError(f"the model has a bank of {c.num_prefixes} prefixes: pass prefix_id to choose the "
                         "entry to export as a PEFT adapter")
    if len(c.layers) != c.num_layers:
        raise ValueError("PEFT prefix tuning puts a prefix on every layer; this model's prefix covers "
                         f"layers {list(c.layers)} of {c.num_layers}, so it cannot be saved in PEFT's format")
    with torch.no_grad():
        kv = module.compute()[:, :, prefix_id or 0].float()  # (L, 2, Hkv, P, D)
    rows = kv_to_peft_rows(kv).cpu()
    base = getattr(model, "module", model)
    cfg = _peft_config_dict(c, base)

    from safetensors.torch import save_file

    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Stage both files, then rename them into place: an error leaves no partial adapter behind.
    staged: list[tuple[str, Path]] = []
    try:
        writers = (
            (WEIGHTS_NAME,
             lambda tmp: save_file({"prompt_embeddings": rows}, tmp, metadata={"format": "pt"})),
            (CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(cfg, indent=2) + "\n")),
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


def read_peft_adapter(directory: str | os.PathLike) -> tuple[dict[str, Any], torch.Tensor]:
    """Validate and read a PEFT prefix-tuning adapter directory: (config dict, prompt_embeddings)."""
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
    if cfg.get("peft_type") != "PREFIX_TUNING":
        raise ValueError(f"{str(directory)!r} is a {cfg.get('peft_type')!r} adapter; load_peft reads "
                         "PREFIX_TUNING")
    if cfg.get("task_type") not in (None, "CAUSAL_LM"):
        raise ValueError(f"{str(directory)!r} is a {cfg.get('task_type')} adapter; load_peft reads CAUSAL_LM")
    if (cfg.get("num_transformer_submodules") or 1) != 1:
        raise ValueError(f"{str(directory)!r} has num_transformer_submodules="
                         f"{cfg.get('num_transformer_submodules')}; only decoder-only (1) is supported")
    for key in ("num_virtual_tokens", "num_layers", "token_dim", "num_attention_heads"):
        if not isinstance(cfg.get(key), int) or cfg[key] < 1:
            raise ValueError(f"{str(cfg_path)!r}: {key} must be a positive int, got {cfg.get(key)!r}")
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        if (directory / PICKLE_WEIGHTS_NAME).is_file():
            raise ValueError(f"{str(directory)!r} holds {PICKLE_WEIGHTS_NAME} (a pickle); prefixattn reads "
                             "only safetensors (re-save it with PEFT's safe_serialization=True)")
        raise FileNotFoundError(f"{str(directory)!r} has no {WEIGHTS_NAME}")
    tensors, _ = read_tensors(weights, "PEFT adapter weights")
    if set(tensors) != {"prompt_embeddings"}:
        raise ValueError(f"{str(weights)!r} has tensors {sorted(tensors)}; a prefix-tuning adapter has "
                         "exactly 'prompt_embeddings'")
    emb = tensors["prompt_embeddings"]
    P, L, token_dim = cfg["num_virtual_tokens"], cfg["num_layers"], cfg["token_dim"]
    expected = (P, L * 2 * token_dim)
    if tuple(emb.shape) != expected:
        raise ValueError(f"{str(weights)!r}: prompt_embeddings has shape {tuple(emb.shape)}, but the config "
                         f"(num_virtual_tokens={P}, num_layers={L}, token_dim={token_dim}) says {expected}")
    if not emb.is_floating_point() or not torch.isfinite(emb).all():
        raise ValueError(f"{str(weights)!r}: prompt_embeddings must hold finite floats")
    return cfg, emb


# patch() arguments that fix the prefix's shape or values: load_peft takes those from the adapter
_SHAPE_KWARGS = frozenset({"num_prefix_tokens", "num_prefixes", "prefix_projection", "projection_hidden_size",
                           "layers", "init", "init_text", "tokenizer"})


def load_peft(model: nn.Module, adapter_directory: str | os.PathLike, *, prefix_id: int | None = None,
              **patch_kwargs: Any) -> nn.Module:
    """Load a PEFT prefix-tuning adapter (from PEFT or ``save_peft``) into ``model``; returns the model
    to use.

    An unpatched model is patched with the adapter's shape (``patch_kwargs`` such as ``backend`` or
    ``dtype`` pass through); a patched one must match it (for a bank, ``prefix_id`` picks the entry to
    fill). The adapter is validated against the model before anything changes.
    """
    from .patch import get_prefix_module, is_patched, patch

    cfg, emb = read_peft_adapter(adapter_directory)
    if is_patched(model):
        if patch_kwargs:
            raise ValueError(f"the model is already patched; {sorted(patch_kwargs)} only apply when "
                             "load_peft patches an unpatched model")
        module = get_prefix_module(model)
        _validate_adapter_for(module.config, cfg, str(adapter_directory))
    else:
        if prefix_id is not None:
            raise ValueError("prefix_id selects a bank entry of an already patched model")
        shape_kwargs = sorted(_SHAPE_KWARGS & set(patch_kwargs))
        if shape_kwargs:
            raise ValueError("load_peft patches an unpatched model with the adapter's own shape; "
                             f"{shape_kwargs} cannot be set here. To load an adapter into a bank entry, "
                             "patch first (prefixattn.patch(model, num_prefix_tokens=P, num_prefixes=N)), "
                             "then load_peft(model, directory, prefix_id=i)")
        _precheck_unpatched(model, cfg, str(adapter_directory))
        model = patch(model, num_prefix_tokens=cfg["num_virtual_tokens"], init="zeros", **patch_kwargs)
        module = get_prefix_module(model)
        try:
            _validate_adapter_for(module.config, cfg, str(adapter_directory))
        except BaseException:
            from .patch import unpatch

            unpatch(model)  # leave the model as it came
            raise
    from .prefix import _check_prefix_id

    _check_prefix_id(prefix_id, module.config)
    if module.config.bank and prefix_id is None:
        raise ValueError(f"the model has a bank of {module.config.num_prefixes} prefixes: pass prefix_id to "
                         "choose the entry to fill")
    single = PrefixConfig(**{**asdict(module.config), "num_prefixes": 1, "bank": False})
    module.set_values(peft_rows_to_kv(emb.to(module.kv.dtype), single), prefix_id)
    return model


def _precheck_unpatched(model: nn.Module, cfg: dict[str, Any], where: str) -> None:
    """Cheap config-level check before patching (the probe in patch() gives the exact shapes)."""
    from .prefix import infer_head_shapes

    mc = getattr(model, "config", None)
    if mc is None:
        return
    layers = getattr(mc, "num_hidden_layers", None) or getattr(mc, "n_layer", None)
    problems = []
    if layers is not None and layers != cfg["num_layers"]:
        problems.append(f"num_layers: adapter has {cfg['num_layers']}, model has {layers}")
    shapes = infer_head_shapes(mc)
    if shapes is not None:
        hkv, d = shapes
        if cfg["num_attention_heads"] != hkv:
            problems.append(f"num_attention_heads (KV heads): adapter has {cfg['num_attention_heads']}, "
                            f"model has {hkv}")
        if cfg["token_dim"] != hkv * d:
            problems.append(f"token_dim (KV heads x head dim): adapter has {cfg['token_dim']}, "
                            f"model has {hkv * d}")
    if problems:
        raise ValueError(f"PEFT adapter {where!r} does not match the model: " + "; ".join(problems))


def _validate_adapter_for(ours: PrefixConfig, cfg: dict[str, Any], where: str) -> None:
    problems = []
    if ours.projection:
        problems.append("the model's prefix is MLP-reparameterized (prefix_projection=True); a PEFT "
                        "adapter holds prefix values")
    if len(ours.layers) != ours.num_layers:
        problems.append(f"the model's prefix covers layers {list(ours.layers)} of {ours.num_layers}; PEFT "
                        "adapters cover all layers")
    for key, value in (("num_virtual_tokens", ours.num_tokens), ("num_layers", ours.num_layers),
                       ("token_dim", ours.token_dim), ("num_attention_heads", ours.num_kv_heads)):
        if cfg[key] != value:
            problems.append(f"{key}: adapter has {cfg[key]}, model has {value}")
    if problems:
        raise ValueError(f"PEFT adapter {where!r} does not match the model: " + "; ".join(problems))
