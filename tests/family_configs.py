"""A tiny random config for every causal-LM family transformers ships (the family sweep's models).

``tiny_config(model_type)`` builds the family's config class with small sizes: the generic overrides in
``TINY`` are applied to every field the config (and each of its sub-configs: text, vision, audio) has,
then the family's own overrides in ``FAMILY_OVERRIDES`` (layer patterns of hybrids, MoE sizes, ...).
Families that cannot be built into a runnable tiny causal LM are listed in ``CANNOT_BUILD`` with the
reason; the sweep asserts that they still cannot.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

VOCAB = 128

# Field name -> tiny value; set only where the config class has the field.
TINY: dict[str, Any] = {
    # sizes
    "vocab_size": VOCAB, "hidden_size": 64, "n_embd": 64, "d_model": 64, "embed_dim": 64,
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2, "decoder_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "decoder_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16,
    "intermediate_size": 64, "ffn_dim": 64, "n_inner": 64, "decoder_ffn_dim": 64, "ffn_hidden_size": 64,
    "encoder_ffn_dim": 64, "dim_ff": 64, "dff": 64, "d_inner": 64, "intermediate_size_mlp": 64,
    "dense_intermediate_size": 64, "shared_intermediate_size": 64, "shared_experts_intermediate_size": 32,
    "moe_shared_expert_intermediate_size": 32, "block_ff_dim": 64, "o_lora_rank": 16, "index_topk": 8,
    "vocab_size_per_layer_input": VOCAB, "unpadded_vocab_size": VOCAB, "vision_output_dim": 64,
    "projector_input_dim": 64, "projector_output_dim": 64, "out_hidden_size": 64,
    "max_position_embeddings": 256, "n_positions": 256, "n_ctx": 256, "seq_length": 256,
    # mixture of experts
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "expert_intermediate_size": 32,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "top_k_experts": 2, "moe_k": 2, "num_selected_experts": 2,
    "n_shared_experts": 1, "num_shared_experts": 1, "n_group": 1, "topk_group": 1,
    "first_k_dense_replace": 1,
    # latent attention (DeepSeek V2/V3 style)
    "q_lora_rank": 24, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16,
    # state-space / linear-attention layers of hybrids
    "mamba_d_state": 8, "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_n_groups": 1, "mamba_expand": 2,
    "mamba_d_conv": 4, "state_size": 8, "ssm_state_size": 8, "n_groups": 1,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
    "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4,
    # windows far beyond the test sequences (prefix + tokens), so windowed layers see everything
    "sliding_window": 128, "attention_window_size": 128,
    # special tokens inside the tiny vocabulary
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}

_MLA = {"num_key_value_heads": 4}  # latent attention expands one latent to every head: Hkv == Hq
_MAMBA = {"mamba_n_heads": 8, "mamba_d_head": 16}  # n_heads * d_head == expand * hidden_size
_GEMMA4 = {"global_head_dim": 32}  # full-attention layers: a larger head dim than the sliding ones

# Per family: overrides on top of TINY (applied to the text config; a dict value to that sub-config).
FAMILY_OVERRIDES: dict[str, dict[str, Any]] = {
    **{f: _MLA for f in ("axk1", "axk2", "deepseek_v2", "deepseek_v3", "deepseek_v32", "glm4_moe_lite",
                         "glm_moe_dsa", "minicpm3", "youtu", "longcat_flash", "bailing_hybrid", "kimi_linear",
                         "dots3_note", "dots3_note_text", "hy_v4", "sarvam_mla")},
    "bamba": {**_MAMBA, "attn_layer_indices": [1]},
    "falcon_h1": _MAMBA,
    "granitemoehybrid": {**_MAMBA, "layer_types": ["linear_attention", "full_attention"]},
    "codegen": {"rotary_dim": 8},
    # two-sided local windows narrower than the sweep's rows (|i - j| <= 2), so that the window shows
    **{f: {"local_attention": 4} for f in ("modernbert", "modernvbert")},
    **{f: {"sliding_window": 2} for f in ("neomme", "openai_privacy_filter", "ultrabert", "ultravbert")},
    # (its decoder depth defaults to 12 whatever num_layers says; its config maps no head_dim to d_kv)
    "switch_transformers": {"num_decoder_layers": 2, "d_kv": 16},
    "gptj": {"rotary_dim": 8},
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}},
    # a looped model (input layers, recurrent layers run n_recurrent_loops times, output layers); its config
    # interleaves "mlp" blocks and halves these counts: 3 attention layers
    "dory": {"num_hidden_layers": 6, "n_input_layers": 2, "n_recurrent_layers": 2, "n_output_layers": 2,
             "layer_types": ["sliding_attention", "mlp", "full_attention", "mlp", "sliding_attention", "mlp"]},
    "dbrx": {"attn_config": {"kv_n_heads": 2, "rope_theta": 1e4, "clip_qkv": 8.0}},
    "gemma3n_text": {"num_hidden_layers": 4, "num_kv_shared_layers": 2},
    "gemma4": _GEMMA4,
    "gemma4_text": {**_GEMMA4, "attention_k_eq_v": True, "num_global_key_value_heads": 1},
    "gemma4_unified": _GEMMA4,
    "gemma4_unified_text": _GEMMA4,
    "gemma4_assistant": {**_GEMMA4, "hidden_size_per_layer_input": 0},
    "gemma4_unified_assistant": {**_GEMMA4, "num_kv_shared_layers": 0},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    "mamba2": {"num_heads": 8, "head_dim": 16},
    "moshi": {"audio_vocab_size": VOCAB},
    # indexed attention (a learned key indexer; refused): head count and pool sizes that fit the tiny heads
    "kolibri1_1": {"index_num_heads": 2, "index_topk": 8, "index_pool_size": 32, "index_compression": 2,
                   "index_num_local_tokens": 4, "index_num_sink_tokens": 1},
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8,
                       "indexer_compress_ratio": 2},
    "recurrent_gemma": {"num_hidden_layers": 3},
    "phimoe": {"router_jitter_noise": 0.0},  # random in training: one step could not match
    "reformer": {"is_decoder": True},
    "xlstm": {"num_heads": 4},
    "zamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "layers_block_type": None, "num_hidden_layers": 4},
    "zaya": {"num_experts_per_tok": 1},
}
FAMILY_OVERRIDES["qwen4_exp"] = FAMILY_OVERRIDES["qwen4_exp_text"]

# Families whose per-layer lists are not cut down (their first layers already cover every kind).
FULL_LAYER_PATTERN = frozenset({"moss_transcribe_diarize"})

# Families that cannot be built into a runnable tiny causal LM, with the reason (the sweep asserts that
# building still fails, so a family that becomes buildable is noticed).
CANNOT_BUILD: dict[str, str] = {
    "blt": "the byte latent transformer's causal LM reads config.num_hidden_layers, which BltConfig (patcher, "
           "local encoder/decoder and global sub-configs) does not have",
    "dots3_note": "its default per_layer_config names layers 25-41, which a tiny config does not have",
    "falcon_h1": "the Mamba head sizes are validated against a mamba intermediate size the generic overrides "
                 "do not reach",
    "gemma3n": "its vision tower needs the timm library, which is not installed",
    "gemma4_assistant": "a draft (assistant) model: its config validation needs the target model's settings",
    "gemma4_unified_assistant": "a draft (assistant) model that reads the target model's KV cache",
    "longcat_flash": "its latent attention's tiny shapes do not line up (a rope/nope head split the generic "
                     "overrides do not set)",
    "musicgen": "a composite text-encoder + audio-decoder config; the causal LM is the codebook decoder",
    "musicgen_melody": "a composite text-encoder + audio-decoder config; the causal LM is the codebook decoder",
    "reformer": "axial position embeddings must sum to hidden_size; LSH attention of its own",
    "xlstm": "its matrix-memory state shapes do not follow the tiny head count",
    "xmod": "needs set_default_language() before any forward",
    "zamba": "the tiny layer pattern breaks its tied shared-transformer weights",
}


def _fields(config_cls: type) -> set[str]:
    names = {f.name for f in dataclasses.fields(config_cls)} if dataclasses.is_dataclass(config_cls) else set()
    return names | set(getattr(config_cls, "attribute_map", {}) or {})


def _is_dropout(name: str) -> bool:
    return "dropout" in name or "pdrop" in name or name.endswith("_drop") or name == "dropout_rate"


def _tiny_kwargs(config_cls: type, overrides: dict[str, Any]) -> dict[str, Any]:
    fields = _fields(config_cls)
    kwargs = {k: v for k, v in TINY.items() if k in fields}
    defaults = {f.name: f.default for f in dataclasses.fields(config_cls)} if dataclasses.is_dataclass(
        config_cls) else {}
    for name, default in defaults.items():
        if _is_dropout(name) and isinstance(default, float):
            kwargs[name] = 0.0
        # other special token ids (image, audio, ...) must stay inside the tiny vocabulary
        if (name.endswith("_token_id") or name.endswith("_token_index")) and isinstance(default, int) \
                and not isinstance(default, bool) and default >= VOCAB and name not in kwargs:
            kwargs[name] = VOCAB - 1
    for key, value in overrides.items():
        kwargs[key] = value
    return kwargs


def _layer_pattern(config_cls: type, text_key: str | None) -> dict[str, Any]:
    """Per-layer list fields (layer_types, mlp_layer_types, ...) cut down to the fewest layers that keep
    every distinct kind of layer the family's default config has (at least 2 layers)."""
    try:
        default = config_cls()
    except Exception:
        return {}
    text = getattr(default, text_key) if text_key else default
    n = getattr(text, "num_hidden_layers", None)
    if not isinstance(n, int) or not dataclasses.is_dataclass(type(text)):
        return {}
    per_layer = {}
    for f in dataclasses.fields(type(text)):
        try:
            value = getattr(text, f.name)
        except Exception:
            continue
        # a per-layer list of kinds (layer types, rope on/off, dense/sparse MLP), not of per-layer values
        if isinstance(value, (list, tuple)) and len(value) == n and len({str(v) for v in value}) <= 3:
            per_layer[f.name] = list(value)
    if not per_layer:
        return {}
    kinds = [tuple(str(v[i]) for v in per_layer.values()) for i in range(n)]
    keep = sorted({kinds.index(k) for k in kinds})
    i = 0
    while len(keep) < min(2, n):
        if i not in keep:
            keep = sorted(keep + [i])
        i += 1
    out = {name: [value[i] for i in keep] for name, value in per_layer.items()}
    out["num_hidden_layers"] = len(keep)
    return out


def _sub_config_classes(config_cls: type) -> dict[str, tuple[type, dict[str, Any]]]:
    """{key: (config class, its default kwargs)} of a composite config's sub-configs (text, vision, ...)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    out: dict[str, tuple[type, dict[str, Any]]] = {}
    for key, sub in (getattr(config_cls, "sub_configs", None) or {}).items():
        if isinstance(sub, type) and dataclasses.is_dataclass(sub):
            out[key] = (sub, {})
    for key, spec in (getattr(config_cls, "sub_configs_defaults", None) or {}).items():
        sub = spec.config_class
        if not (isinstance(sub, type) and dataclasses.is_dataclass(sub)):
            sub = CONFIG_MAPPING[spec.model_type] if spec.model_type in CONFIG_MAPPING else None
        if sub is not None:
            out[key] = (sub, {"model_type": spec.model_type, **spec.init_kwargs})
    return out


def tiny_config(model_type: str):
    """The tiny config of ``model_type`` (raises whatever the config class raises)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_cls = CONFIG_MAPPING[model_type]
    subs = _sub_config_classes(config_cls)
    text_key = "text_config" if "text_config" in subs else None
    pattern = {} if model_type in FULL_LAYER_PATTERN else _layer_pattern(config_cls, text_key)
    overrides = {**pattern, **FAMILY_OVERRIDES.get(model_type, {})}
    kwargs: dict[str, Any] = {}
    for key, (sub_cls, defaults) in subs.items():
        if key == "text_config":
            sub_over = {k: v for k, v in overrides.items() if not isinstance(v, dict)}
            sub_over.update(overrides.get(key, {}))
        else:
            sub_over = overrides.get(key, {}) if isinstance(overrides.get(key), dict) else {}
        kwargs[key] = {**defaults, **_tiny_kwargs(sub_cls, sub_over)}
    if text_key:
        overrides = {k: v for k, v in overrides.items() if isinstance(v, dict) and k not in subs}
    else:
        overrides = {k: v for k, v in overrides.items() if k not in subs}
    kwargs.update(_tiny_kwargs(config_cls, overrides))
    return config_cls(**kwargs)


def tiny_causal_lm(model_type: str, seed: int = 0):
    """A tiny random causal LM of ``model_type`` (eager attention, fp32, eval mode)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(model_type)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.eval()
