"""What a prefix must look like to be served with a model, read from the model directory's config.json
(no weights are loaded), and the models whose vLLM cache cannot hold a prefix, refused with the reason.

vLLM serves a prefix by writing its P keys and values into the paged cache slots of P placeholder
tokens, in every attention layer. That works when every layer is ordinary attention whose cache holds
per-head keys and values of one shape, kept for the whole sequence. It cannot work when

- the cache holds something else (multi-head latent attention caches a compressed latent; state-space
  and linear-attention layers keep a state),
- a sliding window drops old slots (the prefix would fall out of the window; prefixattn keeps it
  visible to every query),
- layers share another layer's cache or differ in shape (Gemma 3n/4),
- there is an encoder or cross-attention (prefixattn's serving covers decoder-only models).

The connector checks vLLM's own cache layout again when the engine starts (``connector.py``); this
check runs first, without vLLM, so ``prefixattn serve --check`` and the common cases fail fast.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt")

# Layer kinds of transformers' ``layer_types`` that are ordinary full attention.
_FULL_ATTENTION_KINDS = {"full_attention", "attention", "global_attention", "global"}


@dataclass(frozen=True)
class ServedModel:
    """The prefix shape a model takes: one (KV heads x head dim) for every one of its layers."""

    model_dir: str
    model_type: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int | None


def _get(cfg: dict[str, Any], *names: str) -> Any:
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    return None


def _text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The decoder's config of a composite (multimodal) config.json, else the config itself."""
    for key in ("text_config", "language_config", "llm_config"):
        inner = cfg.get(key)
        if isinstance(inner, dict) and inner.get("num_hidden_layers"):
            return inner
    return cfg


def layout_problems(cfg: dict[str, Any], max_model_len: int | None = None) -> list[str]:
    """Why vLLM's cache cannot hold a prefix for this config (empty: it can)."""
    out = []
    if cfg.get("is_encoder_decoder"):
        out.append("it is an encoder-decoder model; serving covers decoder-only models")
    if _get(cfg, "kv_lora_rank") is not None:
        out.append("it has multi-head latent attention (kv_lora_rank): vLLM caches a compressed latent per "
                   "token, not per-head keys and values, so there are no slots a prefix's keys and values "
                   "could be written into")
    if _get(cfg, "global_head_dim", "num_global_key_value_heads") is not None:
        out.append("its layers differ in head dim or KV heads (global_head_dim / "
                   "num_global_key_value_heads): a prefix has one shape for every layer of the cache")
    if (cfg.get("num_kv_shared_layers") or 0) > 0:
        out.append("some layers reuse another layer's cache (num_kv_shared_layers)")
    kinds = cfg.get("layer_types")
    if isinstance(kinds, list):
        others = sorted({str(k) for k in kinds} - _FULL_ATTENTION_KINDS)
        if others:
            out.append(f"not every layer is full attention (layer_types has {others}): sliding-window "
                       "layers drop the prefix's cache slots for far queries, and recurrent or "
                       "linear-attention layers keep a state, not slots")
    window = cfg.get("sliding_window")
    if window is not None and cfg.get("use_sliding_window", True) and not isinstance(kinds, list):
        reach = max_model_len or cfg.get("max_position_embeddings")
        if reach is None or int(window) < int(reach):
            out.append(f"it uses a sliding window of {window} tokens, shorter than the context "
                       f"({reach} tokens): vLLM would drop the prefix's slots for queries further than "
                       "the window, while prefixattn keeps the prefix visible to every query "
                       "(pass --max-model-len <= the window to serve it)")
    return out


def read_model_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir)
    if not path.is_dir():
        raise ValueError(f"model directory {str(path)!r} does not exist (a local Hugging Face model "
                         "directory is expected)")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"{str(path)!r} has no config.json; not a Hugging Face model directory")
    if not any(any(path.glob(p)) for p in WEIGHT_PATTERNS):
        raise ValueError(f"{str(path)!r} has a config.json but no weights (*.safetensors, *.bin)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(cfg_path)!r} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{str(cfg_path)!r} is not a JSON object")
    return cfg


def served_model(model_dir: str | Path, max_model_len: int | None = None) -> ServedModel:
    """The prefix shape of the model in ``model_dir``; ValueError with the reasons when vLLM's cache
    cannot hold a prefix for it."""
    full = read_model_config(model_dir)
    cfg = _text_config(full)
    if full is not cfg and full.get("is_encoder_decoder"):
        cfg = {**cfg, "is_encoder_decoder": True}
    problems = layout_problems(cfg, max_model_len)
    if problems:
        raise ValueError(f"the model in {str(model_dir)!r} cannot be served with a prefix: "
                         + "; ".join(problems))
    layers = _get(cfg, "num_hidden_layers", "n_layer", "num_layers")
    heads = _get(cfg, "num_attention_heads", "n_head")
    hidden = _get(cfg, "hidden_size", "n_embd", "d_model")
    if not all(isinstance(x, int) and x > 0 for x in (layers, heads, hidden)):
        raise ValueError(f"{str(model_dir)!r}: config.json does not give the layer count, attention heads "
                         "and hidden size of a decoder")
    kv_heads = _get(cfg, "num_key_value_heads", "multi_query_group_num") or heads
    if cfg.get("multi_query") and cfg.get("num_key_value_heads") is None:
        kv_heads = 1  # GPT-BigCode
    head_dim = _get(cfg, "head_dim") or hidden // heads
    return ServedModel(model_dir=str(model_dir), model_type=str(full.get("model_type", "?")),
                       num_layers=int(layers), num_kv_heads=int(kv_heads), head_dim=int(head_dim),
                       max_position_embeddings=cfg.get("max_position_embeddings"))


def rank_kv_heads(num_kv_heads: int, tp_size: int, tp_rank: int) -> range:
    """The KV heads tensor-parallel rank ``tp_rank`` of ``tp_size`` holds, as vLLM's QKVParallelLinear
    splits them: contiguous slices when there are at least as many heads as ranks, else each head
    replicated on ``tp_size / num_kv_heads`` consecutive ranks."""
    if num_kv_heads >= tp_size:
        if num_kv_heads % tp_size:
            raise ValueError(f"{num_kv_heads} KV heads do not split over {tp_size} tensor-parallel ranks")
        per_rank = num_kv_heads // tp_size
        return range(tp_rank * per_rank, (tp_rank + 1) * per_rank)
    if tp_size % num_kv_heads:
        raise ValueError(f"{tp_size} tensor-parallel ranks do not replicate {num_kv_heads} KV heads evenly")
    head = tp_rank // (tp_size // num_kv_heads)
    return range(head, head + 1)
