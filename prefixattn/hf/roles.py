"""Attaching to encoders and encoder-decoders: their stacks and sites (``sites.py``), the hooks that number
positions from P (``positions.py``), the shape probe of an encoder-decoder and its prefix's config, and
the task head that trains with the prefix.

PEFT's semantics (what ``sites="decoder"``, the default for encoder-decoders, reproduces): the prefix is on
decoder self-attention only, in PEFT's layout of 2 x L slots with L = ``config.num_hidden_layers`` (the
encoder's layers): decoder layer i reads block 2i mod L, so with an even L several decoder layers share one
block and the others are never read; encoder and cross-attention carry none; decoder positions start at
P. A decoder deeper than L has no slots in PEFT's layout (PEFT crashes): refused. ``sites="all"`` (Li &
Liang): encoder self-attention, decoder self-attention and cross-attention each carry their own prefix in
every layer; positions as with ``"decoder"``.

Encoder-only models (PEFT's SEQ_CLS / TOKEN_CLS / QUESTION_ANS / FEATURE_EXTRACTION): every layer's
bidirectional self-attention carries a prefix; positions start at P; the task head named by PEFT's
``modules_to_save`` (``classifier``/``score``, ``qa_outputs``) trains with the prefix.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn

from ..ops import MAX_HEAD_DIM
from ..prefix import PeftLayout, PrefixConfig
from .hooks import add_pre_hook
from .position_bias import attach_position_bias, detach_position_bias
from .positions import find_position_embedding, hook_position_embedding, unhook_position_embedding
from .probe import capture, input_device, probe_token
from .sites import (
    SITE_ATTR,
    Structure,
    assign_sites,
    encoder_structure,
    peft_decoder_block,
    peft_num_layers,
    seq2seq_structure,
    untag,
)
from .state import STATE_ATTR, PatchState

SITES_OPTIONS = ("decoder", "all")

# PEFT's modules_to_save per task type (PeftModelForSequenceClassification & co.), by the model class's name
_TASK_HEADS = (
    ("ForSequenceClassification", "SEQ_CLS", ("classifier", "score")),
    ("ForTokenClassification", "TOKEN_CLS", ("classifier", "score")),
    ("ForQuestionAnswering", "QUESTION_ANS", ("qa_outputs",)),
)


def task_type(model: nn.Module, kind: str) -> tuple[str, tuple[str, ...]]:
    """PEFT's task type for the model and its modules_to_save names."""
    name = type(model).__name__
    for suffix, task, heads in _TASK_HEADS:
        if name.endswith(suffix):
            if kind == "seq2seq":
                raise ValueError(f"{name}: an encoder-decoder with a {task} head. PEFT's {task} prefix "
                                 "tuning lays its prefix out for a single stack, which has no meaning here; "
                                 "prefixattn prefix-tunes encoder-decoders as sequence-to-sequence models "
                                 "(*ForConditionalGeneration)")
            return task, heads
    if kind == "seq2seq":
        return "SEQ_2_SEQ_LM", ()
    if kind == "encoder":
        return "FEATURE_EXTRACTION", ()
    return "CAUSAL_LM", ()


def head_paths(model: nn.Module, names: tuple[str, ...]) -> tuple[str, ...]:
    """The modules PEFT's ``_set_trainable`` wraps for ``modules_to_save=names``: every module whose path
    ends with one of the names (PEFT's test is ``str.endswith``), outermost only."""
    found: list[str] = []
    for path, _ in model.named_modules():
        if path and any(path.endswith(n) for n in names) and not any(path.startswith(f + ".") for f in found):
            found.append(path)
    return tuple(found)


def check_sites(sites: str | None, kind: str) -> str:
    """The sites option for a model of this kind ("" outside encoder-decoders)."""
    if kind != "seq2seq":
        if sites is not None:
            raise ValueError(f"sites={sites!r} applies to encoder-decoders; this is a "
                             f"{'encoder-only' if kind == 'encoder' else 'decoder-only'} model")
        return ""
    if sites is None:
        return "decoder"
    if sites not in SITES_OPTIONS:
        raise ValueError(f"sites must be 'decoder' (PEFT's: decoder self-attention) or 'all' (encoder "
                         f"self-attention, decoder self-attention and cross-attention), got {sites!r}")
    return sites


def attach(model: nn.Module, state: PatchState, sites: str) -> Structure:
    """Find the stacks and sites, tag the attention modules, hook the stacks and position embeddings."""
    structure = encoder_structure(model) if state.kind == "encoder" else seq2seq_structure(model)
    num_layers = peft_num_layers(model.config) if state.kind == "seq2seq" else None
    if state.kind == "seq2seq" and sites == "decoder":
        decoder = structure.of_role("decoder")
        if num_layers is None:
            raise ValueError(f"{type(model).__name__}: its config has no num_hidden_layers, from which PEFT "
                             "sizes its prefix; patch with sites='all'")
        deepest = max(s.layer for s in decoder) + 1
        if deepest > num_layers:
            raise ValueError(
                f"{type(model).__name__} has {deepest} decoder layers but PEFT's prefix layout has 2 x "
                f"num_hidden_layers = 2 x {num_layers} slots (the encoder's layers), of which decoder layer "
                f"i reads slots 4i and 4i+1 mod {2 * num_layers}: a decoder deeper than the encoder has no "
                "place in it (PEFT crashes with an IndexError). Patch with sites='all' (every layer its own "
                "prefix)")
    if sites == "all" and state.kind == "seq2seq" and structure.stack("encoder") is None:
        raise ValueError(f"{type(model).__name__}: its encoder's attention does not go through transformers' "
                         "AttentionInterface (attention code of its own), so sites='all' cannot prefix it; "
                         "sites='decoder' (PEFT's) leaves the encoder alone and works")
    assign_sites(structure, sites, num_layers)
    by_role: dict[str, list[nn.Module]] = {}
    for site in structure.sites:
        site.module.__dict__[STATE_ATTR] = state
        state.tagged_modules.append(site.module)
        state.site_modules.append(site.module)
        by_role.setdefault(site.role, []).append(site.module)
    prefixed = {site.role for site in structure.sites if site.module.__dict__[SITE_ATTR] is not None}
    state.bias_modules.extend(attach_position_bias(by_role, prefixed, state))  # T5's position bias
    for stack in structure.stacks:
        stack.owner.__dict__[STATE_ATTR] = state
        state.stack_owners.append(stack.owner)
        state.layer_modules.extend(stack.layers)
        if stack.role == "encoder" and state.kind == "seq2seq":
            # its step plan carries no prefix with sites="decoder" (a bank's prefix_ids are not needed)
            add_pre_hook(stack.owner, positions="none", prefixed=sites == "all")
            continue
        embedding = find_position_embedding(stack.owner, stack.layers)
        if embedding is not None:
            add_pre_hook(stack.owner, positions="embedding")
            hook_position_embedding(embedding, state, "decoder" if stack.role == "decoder" else "encoder")
            state.position_modules.append(embedding)
        elif "position_ids" in inspect.signature(stack.owner.forward).parameters:
            add_pre_hook(stack.owner, positions="owner")
        elif any(m in state.bias_modules for m in stack.layers.modules()):
            # T5: no absolute positions; its relative position bias places the prefix (position_bias.py)
            add_pre_hook(stack.owner, positions="none")
        else:
            raise ValueError(f"{type(stack.owner).__name__} numbers its positions without a position "
                             "embedding that takes a cache length, and its forward takes no position_ids; "
                             "prefixattn cannot number positions from P for this model")
    # the decoder's runner (the encoder's in an encoder-only model) is the main one
    state.base_model = state.stack_owners[-1]
    state.shift_explicit_positions = False  # PEFT's encoder task types hand them on unchanged
    return structure


@torch.no_grad()
def check_own_encoder(model: nn.Module, structure: Structure, previous_impl: Any, impl: str) -> None:
    """An encoder-decoder whose encoder attends with code of its own (BigBird-Pegasus, PEGASUS-X) runs it
    unchanged only if that code does not read the masks transformers builds through the mask interface
    (which hands prefixattn's form over): its output on a padded batch must equal the original's."""
    if structure.kind != "seq2seq" or structure.stack("encoder") is not None:
        return
    encoder = model.get_encoder()
    if "input_ids" not in inspect.signature(encoder.forward).parameters:
        raise ValueError(f"{type(model).__name__}: its encoder's attention does not go through transformers' "
                         "AttentionInterface, and prefixattn cannot check that it runs unchanged")
    device = input_device(model)
    token = probe_token(model)
    ids = torch.full((2, 6), token, device=device)
    mask = torch.ones(2, 6, dtype=torch.long, device=device)
    mask[1, 3:] = 0
    was_training = model.training
    model.eval()
    try:
        model.set_attn_implementation(previous_impl)
        expected = encoder(input_ids=ids, attention_mask=mask)[0]
        model.set_attn_implementation(impl)
        got = encoder(input_ids=ids, attention_mask=mask)[0]
    finally:
        model.set_attn_implementation(impl)
        model.train(was_training)
    if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
        raise ValueError(f"{type(model).__name__}: its encoder's attention is code of its own (not "
                         "transformers' AttentionInterface) that reads the attention masks transformers "
                         "builds, which prefixattn's mask function hands over in another form: the encoder "
                         "would run wrong")


def _encoder_probe_inputs(model: nn.Module, encoder: nn.Module) -> dict[str, torch.Tensor]:
    """A tiny input for the encoder of an encoder-decoder (for the shape probe of sites='all')."""
    params = inspect.signature(encoder.forward).parameters
    device = input_device(model)
    config = model.config
    if "input_ids" in params:
        return {"input_ids": torch.tensor([[probe_token(model)] * 3], device=device)}
    dtype = next(encoder.parameters()).dtype
    if "input_features" in params:
        mel, positions = getattr(config, "num_mel_bins", None), getattr(config, "max_source_positions", None)
        if isinstance(mel, int) and isinstance(positions, int):  # Whisper: a fixed 2 x positions frames
            return {"input_features": torch.zeros(1, mel, 2 * positions, device=device, dtype=dtype)}
        feat = getattr(config, "input_feat_per_channel", None)
        if isinstance(feat, int):  # Speech2Text: (batch, frames, features x channels)
            channels = getattr(config, "input_channels", 1) or 1
            return {"input_features": torch.zeros(1, 8, feat * channels, device=device, dtype=dtype)}
    if "input_values" in params:  # raw audio (Moonshine)
        return {"input_values": torch.zeros(1, 4000, device=device, dtype=dtype)}
    raise ValueError(f"{type(model).__name__}: prefixattn cannot build an input for its encoder "
                     f"({type(encoder).__name__}) to probe the encoder's attention shapes, which sites='all' "
                     "needs; sites='decoder' (PEFT's) does not")


def _encoder_width(model: nn.Module, structure: Structure) -> int:
    """The width of the encoder states the decoder's cross-attention reads: its key projection's input
    size, else the config's d_model / hidden_size."""
    for site in structure.of_role("cross"):
        for name, child in site.module.named_children():
            if name in ("k_proj", "key", "k", "to_k") and isinstance(child, nn.Linear):
                return child.in_features
    for config in (model.config, getattr(model.config, "decoder", None)):
        for name in ("d_model", "hidden_size"):
            if isinstance(getattr(config, name, None), int):
                return getattr(config, name)
    raise ValueError(f"{type(model).__name__}: cannot tell the width of its encoder's states")


def probe_seq2seq(model: nn.Module, state: PatchState, structure: Structure, sites: str) -> dict:
    """The keys and values every attention module computes for a tiny input: {probe key: (k, v)}."""
    decoder = structure.stack("decoder").owner
    token = probe_token(model)
    params = inspect.signature(decoder.forward).parameters
    hidden = torch.zeros(1, 3, _encoder_width(model, structure), device=input_device(model),
                         dtype=next(decoder.parameters()).dtype)

    def run_decoder() -> None:
        kwargs = {"input_ids": torch.tensor([[token, token]], device=input_device(model)),
                  "encoder_hidden_states": hidden}
        if "use_cache" in params:
            kwargs["use_cache"] = False
        decoder(**kwargs)

    captured = capture(model, state, run_decoder, attention_training=True)
    for site in structure.sites:  # the roles found by name: self-attention over 2 tokens, cross over 3
        k = captured.get(site.probe_key, (None,))[0]
        if site.role in ("decoder", "cross") and k is not None and k.shape[2] != (2 if site.role == "decoder"
                                                                                  else 3):
            raise ValueError(f"{type(site.module).__name__} of decoder layer {site.layer} was taken for "
                             f"{site.role} attention but attends over {k.shape[2]} keys in the shape probe")
    if sites == "all":
        encoder = structure.stack("encoder").owner
        inputs = _encoder_probe_inputs(model, encoder)
        captured.update(capture(model, state, lambda: encoder(**inputs), attention_training=True))
    return captured


def seq2seq_config(model: nn.Module, state: PatchState, structure: Structure, sites: str,
                   num_prefix_tokens: int, num_prefixes: int | None, prefix_projection: bool,
                   projection_hidden_size: int | None, backend: str,
                   adapter_shape: tuple[int, int] | None) -> tuple[PrefixConfig, PeftLayout]:
    """The prefix's config for an encoder-decoder, and PEFT's layout for it."""
    captured = probe_seq2seq(model, state, structure, sites)
    readers: dict = {}
    for site in structure.sites:
        key = site.module.__dict__[SITE_ATTR]
        if key is None:
            continue
        if site.probe_key not in captured:
            raise ValueError(f"{type(model).__name__}: its {site.role} attention of layer {site.layer} did "
                             "not run in the shape probe")
        k, v = captured[site.probe_key]
        shape = (k.shape[1], k.shape[3], v.shape[3])
        if key in readers and readers[key] != shape:
            raise ValueError(f"decoder layers sharing PEFT's block {key} have different shapes "
                             f"({readers[key]} and {shape}); PEFT's layout cannot hold them")
        readers[key] = shape
    if any(dk != dv for _, dk, dv in readers.values()):
        raise ValueError("an encoder-decoder with key head dim != value head dim is not supported")
    order = {"encoder": 0, "decoder": 1, "cross": 2}
    keys = sorted(readers, key=lambda k: (order[k[0]], k[1]) if isinstance(k, tuple) else (0, k))
    heads = max(readers[k][0] for k in keys)
    dim = max(readers[k][1] for k in keys)
    if adapter_shape is not None and adapter_shape != (heads, dim):
        raise ValueError(f"the PEFT prefix ({adapter_shape[0]} KV heads x head dim {adapter_shape[1]}) does "
                         f"not match the model's decoder self-attention ({heads} x {dim})")
    if dim > MAX_HEAD_DIM and backend == "triton":
        raise ValueError(f"head dim {dim}: backend='triton' covers head dims up to {MAX_HEAD_DIM}")
    layer_shapes = tuple(readers[k] for k in keys)
    if all(shape == (heads, dim, dim) for shape in layer_shapes):
        layer_shapes = ()
    token_dim = heads * dim
    if sites == "all":
        layers, roles, num_layers = tuple(k[1] for k in keys), tuple(k[0] for k in keys), len(keys)
    else:
        layers, roles, num_layers = tuple(keys), (), peft_num_layers(model.config)
    config = PrefixConfig(
        num_tokens=num_prefix_tokens, num_kv_heads=heads, head_dim=dim, layers=layers,
        num_layers=num_layers, num_prefixes=num_prefixes or 1, bank=num_prefixes is not None,
        projection=bool(prefix_projection),
        projection_hidden_size=(projection_hidden_size or token_dim) if prefix_projection else 0,
        layer_shapes=layer_shapes, sites=sites, roles=roles,
    )
    state.first_layer = ("decoder", 0) if sites == "all" else peft_decoder_block(0, num_layers)
    return config, _peft_seq2seq_layout(model, config, (heads, dim), sites)


def _peft_seq2seq_layout(model: nn.Module, config: PrefixConfig, shape: tuple[int, int],
                         sites: str) -> PeftLayout:
    """PEFT's SEQ_2_SEQ_LM layout: its shape comes from the config (num_attention_heads, and token_dim from
    hidden_size / d_model), which must be the decoder self-attention's."""
    peft_shape = infer_head_shapes(model.config)
    layers = tuple(config.layers) if sites == "decoder" else ()
    unsupported = None
    if peft_shape is not None and peft_shape != shape:
        unsupported = (f"PEFT sizes this model's prefix from its config as {peft_shape[0]} heads x head dim "
                       f"{peft_shape[1]}, but its decoder self-attention has {shape[0]} x {shape[1]}")
    return PeftLayout(shape[0], shape[1], layers, unsupported=unsupported, task_type="SEQ_2_SEQ_LM",
                      submodules=2)


def detach_roles(state: PatchState) -> None:
    """Undo ``attach``'s tags and position hooks (the stack owners' pre-hooks go with the patcher's)."""
    untag(state.site_modules)
    state.site_modules.clear()
    detach_position_bias(state.bias_modules)
    state.bias_modules.clear()
    for module in state.position_modules:
        unhook_position_embedding(module)
    state.position_modules.clear()


def infer_head_shapes(config: Any) -> tuple[int, int] | None:
    """(Hkv, D) from a transformers config, or None if it does not say or the layers differ (Gemma 4's
    per-layer configs; a probe forward decides)."""
    try:
        return _uniform_head_shapes(config)
    except AttributeError:
        return None
    except Exception as e:  # transformers' AmbiguousGlobalPerLayerAttributeError: the layers differ
        if type(e).__name__ == "AmbiguousGlobalPerLayerAttributeError":
            return None
        raise


def _uniform_head_shapes(config: Any) -> tuple[int, int] | None:
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    if heads is None:
        return None
    kv = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if hidden else None)
    if head_dim is None:
        return None
    return int(kv), int(head_dim)
