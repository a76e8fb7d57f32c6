"""Patching a transformers model and undoing it: checks of the arguments, attaching (tag the attention
modules, switch the attention implementation, hook the module that runs the layers, add the prefix
module) and detaching, ``unpatch`` and ``is_patched``.

No ``forward`` is replaced: the attention goes through transformers' AttentionInterface
(``attention.py``), the per-step work through a forward pre-hook (``hooks.py``).

Decoder-only models route each attention module to its prefix by ``layer_idx``; encoders and
encoder-decoders by module and role (``sites.py``, ``roles.py``).

Refused with a clear error: families with their own attention code, attention that
gives the interface a meaning of its own (``families.unsupported_attention``: learned sparse-key
indexers, compressed sparse attention, differential attention), score inputs the op does not implement
(a learned position bias other than T5's, per-token sinks), 4-D attention masks, static (compileable)
caches, packed rows with a KV cache, head dims over 256 with ``backend="triton"``, nonzero attention
dropout in training (unless ``ignore_attention_dropout=True``, which runs without it: refused at
``patch()`` for a model in training mode, else at its first training-mode forward; ``attention_dropout``
says what a patched model's training would ask for).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal

import torch
import torch.nn as nn

from ..ops import BACKENDS, MAX_HEAD_DIM
from ..prefix import MODULE_NAME, PeftLayout, PrefixConfig, PrefixKV, active_copy
from . import roles
from .attention import register
from .cartridges import cartridge_options
from .families import resolve_family, warn_if_not_verified
from .generate import unwrap_prepare_inputs, wrap_prepare_inputs
from .hooks import add_pre_hook, remove_pre_hooks
from .positions import find_position_embedding, hook_position_embedding
from .probe import capture, init_from_text, input_device, layers_attending_over_their_cache, probe_token
from .saved import SavePretrainedWithPrefix
from .sites import mark_decoder_roles, model_kind
from .state import IMPL_NAME, STATE_ATTR, PatchState, get_state

InitKind = Literal["random", "zeros", "text"]


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` was returned by ``prefixattn.patch`` and not unpatched since."""
    if get_state(model) is not None:
        return True
    get_base = getattr(type(model), "get_base_model", None)  # a PEFT LoRA model carrying a prefix
    return callable(get_base) and get_state(model.get_base_model()) is not None


def attention_dropout(model: nn.Module) -> float:
    """The largest attention dropout a patched model's layers ask for in training (0.0: none), as patch()
    found it; prefixattn's attention refuses it in training unless ``ignore_attention_dropout=True``."""
    state = get_state(model)
    get_base = getattr(type(model), "get_base_model", None)  # a PEFT model
    if state is None and callable(get_base):
        state = get_state(model.get_base_model())
    if state is None:
        raise ValueError(f"{type(model).__name__} is not patched by prefixattn")
    return state.attention_dropout


def check_patch_args(num_prefix_tokens: Any, num_prefixes: Any, dtype: Any, backend: Any, init: Any) -> None:
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 1:
        raise ValueError(f"num_prefix_tokens must be a positive int, got {num_prefix_tokens!r}")
    if num_prefixes is not None and (isinstance(num_prefixes, bool) or not isinstance(num_prefixes, int)
                                     or num_prefixes < 1):
        raise ValueError("num_prefixes must be a positive int (or None for a single prefix), got "
                         f"{num_prefixes!r}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if init not in ("random", "zeros", "text"):
        raise ValueError(f"init must be 'random', 'zeros' or 'text', got {init!r}")


def _check_layers(layers: Sequence[int], all_layers: list[int]) -> list[int]:
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise TypeError(f"layers must be a sequence of layer indices, got {type(layers).__name__}")
    chosen = []
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"layers must hold ints, got {i!r}")
        j = i + len(all_layers) if i < 0 else i
        if j not in all_layers:
            raise ValueError(f"layer {i} does not exist; the model's attention layers are {all_layers}")
        chosen.append(j)
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"layers has duplicates: {list(layers)}")
    if not chosen:
        raise ValueError("layers is empty; at least one layer must carry a prefix")
    return sorted(chosen)


def _find_layers_owner(model: nn.Module, state: PatchState) -> tuple[nn.Module, nn.Module | None]:
    """The module that runs the decoder layers (parent of the ModuleList holding the attention layers):
    LlamaModel, GPT2Model, OPTDecoder (OPTForCausalLM calls its decoder directly), ... Its forward takes
    position_ids; the per-step pre-hook goes there. Or, for a seq2seq model's decoder used alone
    (BartForCausalLM: BartDecoder numbers positions from the cache length itself), one whose position
    embedding takes a cache length: (owner, that embedding)."""
    tagged_ids = {id(m) for m in state.tagged_modules}
    owners: list[tuple[nn.Module, list[nn.Module]]] = []
    for module in model.modules():
        for child in module.children():
            if isinstance(child, nn.ModuleList) and any(
                id(m) in tagged_ids for layer in child for m in layer.modules()
            ):
                owners.append((module, list(child)))
                break
    if not owners:
        raise ValueError(f"{type(model).__name__}: could not find the module that runs the attention layers")
    # a multimodal model also holds a vision / audio tower's layers: the language model's owner is the
    # one whose forward takes position_ids
    with_positions = [o for o in owners if "position_ids" in inspect.signature(o[0].forward).parameters]
    if not with_positions:
        for owner, layers in owners:
            embedding = find_position_embedding(owner, layers)
            if embedding is not None:
                state.layer_modules = layers
                return owner, embedding
        raise ValueError(f"{type(owners[0][0]).__name__}.forward takes no position_ids; prefixattn cannot "
                         "number positions from P for this model")
    best, state.layer_modules = with_positions[0]
    return best, None


def _shared_kv_layers(captured: dict[int, tuple]) -> dict[int, int]:
    """Layers handed the very key tensor of an earlier layer (KV sharing: Gemma 3n, Gemma 4's last
    layers): layer -> the layer that computed those keys. They attend over its prefix too, as they would
    over PEFT's KV cache, which holds the prefix for the layer that computed the keys."""
    first: dict[tuple, int] = {}
    shared: dict[int, int] = {}
    for layer in sorted(captured):
        k = captured[layer][0]
        where = (k.untyped_storage().data_ptr(), k.storage_offset(), tuple(k.shape), k.stride())
        if where in first:
            shared[layer] = first[where]
        else:
            first[where] = layer
    return shared


def _fits(shape: tuple[int, int, int], heads: int, dim: int) -> bool:
    """PEFT's Gemma 4 rule: a layer of (Hkv, Dk, Dv) reads a prefix stored at heads x dim when it is no
    larger in any of them (it takes the leading heads and dims)."""
    return shape[0] <= heads and max(shape[1:]) <= dim


def _stored_shape(shapes: dict[int, tuple[int, int, int]], chosen: list[int],
                  adapter_shape: tuple[int, int] | None) -> tuple[tuple[int, int], list[int]]:
    """The shape every layer's prefix is stored at and the layers that carry one.

    Without an adapter: the largest KV-head count and head dim among the chosen layers, so every chosen
    layer gets a prefix of its own shape. With a PEFT adapter's (Hkv, D): PEFT's rule for Gemma 4, a
    layer reads the leading heads and dims, and a layer larger than the adapter carries no prefix."""
    if adapter_shape is None:
        return (max(shapes[i][0] for i in chosen), max(max(shapes[i][1:]) for i in chosen)), chosen
    heads, dim = adapter_shape
    fitting = [i for i in chosen if _fits(shapes[i], heads, dim)]
    if not fitting:
        raise ValueError(f"the PEFT prefix ({heads} KV heads x head dim {dim}) does not match the model: no "
                         "attention layer fits it; the layers' (KV heads, key dim, value dim) are "
                         f"{sorted(set(shapes.values()))}")
    skipped = sorted(set(chosen) - set(fitting))
    if skipped:
        warnings.warn(f"prefixattn: layers {skipped} have more KV heads or a larger head dim than the PEFT "
                      f"adapter's {heads} x {dim} and carry no prefix (PEFT skips them too)", stacklevel=4)
    return adapter_shape, fitting


def _peft_layout(shapes: dict[int, tuple[int, int, int]], shared: dict[int, int]) -> PeftLayout:
    """PEFT's layout for a model with these layer shapes (``peft.utils.other._prepare_prompt_learning_config``
    and ``PeftModel.get_prompt``): the prefix is sized for the layer with the largest head dim (its KV
    heads); every layer that fits reads the leading heads and dims, the others get none (Gemma 4). For a
    uniform model: its one shape, every layer."""
    dim = max(dk for _, dk, _ in shapes.values())
    heads = next(h for _, (h, dk, _) in sorted(shapes.items()) if dk == dim)
    layers = tuple(i for i, shape in sorted(shapes.items()) if _fits(shape, heads, dim))
    attention = sorted(set(shapes) | set(shared))
    if attention != list(range(len(attention))):
        # PEFT's adapter has a row block per model layer and its cache an entry per layer index; a model
        # whose attention layers are not layers 0..n-1 (hybrids with state-space / linear layers)
        return PeftLayout(heads, dim, layers, unsupported=(
            f"the model's attention layers are {attention} among layers of other kinds (a hybrid), which "
            "PEFT's prefix tuning cannot run"))
    return PeftLayout(heads, dim, layers)


def _probe_config(model: nn.Module, state: PatchState, num_prefix_tokens: int, num_prefixes: int | None,
                  layers: Sequence[int] | None, prefix_projection: bool, projection_hidden_size: int | None,
                  backend: str, adapter_shape: tuple[int, int] | None = None
                  ) -> tuple[PrefixConfig, PeftLayout]:
    """One token through the frozen model tells which layers attend, their (Hkv, Dk, Dv), and which
    layers share another layer's keys and values; returns the prefix's config and PEFT's layout."""
    captured = capture(model, state, [probe_token(model)], attention_training=True)
    if not captured:
        raise ValueError(f"{type(model).__name__}: no attention layer went through the "
                         "AttentionInterface; cannot patch it")
    state.shared_kv = _shared_kv_layers(captured)
    state.first_layer = min(captured)
    if not state.shared_kv:
        state.cache_layers = layers_attending_over_their_cache(model, state)
    shapes = {i: (k.shape[1], k.shape[3], v.shape[3]) for i, (k, v) in captured.items()
              if i not in state.shared_kv}
    own = sorted(shapes)
    if layers is not None:
        for i in layers:
            if isinstance(i, int) and i in state.shared_kv:
                raise ValueError(f"layer {i} attends over layer {state.shared_kv[i]}'s keys and values (KV "
                                 f"sharing), so it reads that layer's prefix; choose among layers {own}")
    chosen = own if layers is None else _check_layers(layers, own)
    (num_kv_heads, head_dim), chosen = _stored_shape(shapes, chosen, adapter_shape)
    wide = [i for i in chosen if max(shapes[i][1:]) > MAX_HEAD_DIM]
    if wide and backend == "triton":
        raise ValueError(f"layers {wide} have head dim {max(shapes[wide[0]][1:])}; backend='triton' covers "
                         f"head dims up to {MAX_HEAD_DIM} (backend='auto' runs those layers in PyTorch)")
    layer_shapes = tuple(shapes[i] for i in chosen)
    if all(shape == (num_kv_heads, head_dim, head_dim) for shape in layer_shapes):
        layer_shapes = ()
    token_dim = num_kv_heads * head_dim
    config = PrefixConfig(
        num_tokens=num_prefix_tokens, num_kv_heads=num_kv_heads, head_dim=head_dim, layers=tuple(chosen),
        num_layers=len(captured), num_prefixes=num_prefixes or 1, bank=num_prefixes is not None,
        projection=bool(prefix_projection),
        projection_hidden_size=(projection_hidden_size or token_dim) if prefix_projection else 0,
        layer_shapes=layer_shapes,
    )
    return config, _peft_layout(shapes, state.shared_kv)


def _init_texts(init_text: Any, config: PrefixConfig) -> list[Any]:
    texts = list(init_text) if (config.bank and isinstance(init_text, (list, tuple))
                                and init_text and not isinstance(init_text[0], int)) else None
    if texts is None:
        return [init_text] * config.num_prefixes
    if len(texts) != config.num_prefixes:
        raise ValueError(f"init_text lists {len(texts)} texts for a bank of {config.num_prefixes}")
    return texts


def patch_model(
    model: nn.Module,
    num_prefix_tokens: int | None = None,
    *,
    sites: str | None = None,
    prefix_projection: bool = False,
    projection_hidden_size: int | None = None,
    num_prefixes: int | None = None,
    layers: Sequence[int] | None = None,
    init: InitKind = "random",
    init_text: Any = None,
    tokenizer: Any = None,
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    ignore_attention_dropout: bool = False,
    peft_tuner: bool = False,
    adapter_shape: tuple[int, int] | None = None,
    cartridge: bool = False,
    num_frozen_tokens: int | None = None,
) -> nn.Module:
    """``prefixattn.patch`` for a transformers model (not a PEFT model); see ``prefixattn.hf.api.patch``.

    ``peft_tuner=True``: the model is the base of a PEFT tuner (LoRA, ...): the trainable flags PEFT set
    stay as they are (adapter weights trainable, base frozen) and ``save_pretrained`` is left alone (PEFT
    saves the adapter, and a merged model must save in full).

    ``adapter_shape=(Hkv, D)``: the prefix comes from a PEFT adapter of that shape (PEFT's Gemma 4 rule:
    smaller layers read the leading heads and dims, larger ones carry no prefix).

    ``sites``: an encoder-decoder's prefix sites, "decoder" (the default: PEFT's) or "all" (``roles.py``)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError("patch the model before wrapping it in DistributedDataParallel / FSDP")
    if get_state(model) is not None:
        raise ValueError("this model is already patched by prefixattn (call prefixattn.unpatch first)")
    check_patch_args(num_prefix_tokens, num_prefixes, dtype, backend, init)
    cartridge, num_frozen_tokens = cartridge_options(cartridge, num_frozen_tokens, num_prefix_tokens,
                                                     prefix_projection)
    if init == "text" and init_text is None:
        raise ValueError("init='text' needs init_text (a string with tokenizer=, or token ids)")
    if init != "text" and init_text is not None:
        raise ValueError("init_text is only used with init='text'")
    if init == "text" and prefix_projection:
        raise ValueError("init='text' sets the prefix values directly, which needs prefix_projection=False")

    family = resolve_family(model)
    kind = model_kind(model)
    sites = roles.check_sites(sites, kind)
    task, head_names = roles.task_type(model, kind)
    if cartridge and task != "CAUSAL_LM":
        # refused here rather than at save_peft, after a whole training run
        raise ValueError(f"cartridge=True is for causal LMs; {type(model).__name__} is a {task} model, whose "
                         "cartridge could not be saved as a PEFT adapter (prefixattn writes CARTRIDGE "
                         "adapters of causal LMs only, and PEFT's own seq2seq CARTRIDGE model cannot be "
                         "saved back either). Patch it with a prefix (cartridge=False): save_peft writes it "
                         "as PREFIX_TUNING")
    if kind == "seq2seq" and layers is not None:
        raise ValueError("layers= chooses the layers of a decoder-only or encoder model; an encoder-decoder "
                         "carries its prefix where sites= says (PEFT has no per-layer choice either)")
    if kind == "seq2seq" and init == "text":
        raise ValueError("init='text' is for decoder-only and encoder models: an encoder-decoder's decoder "
                         "attends over its encoder, so there is no single text whose keys and values make a "
                         "prefix")
    heads = () if peft_tuner else roles.head_paths(model, head_names)
    if heads and num_prefixes is not None:
        raise ValueError(f"a bank of prefixes (num_prefixes) shares one task head, which trains with every "
                         f"entry ({list(heads)}); prefixattn supports a bank on models without a task head")
    warn_if_not_verified(family.model_type, kind, stacklevel=3)
    register()
    state = PatchState(family=family, backend=backend, base_model=model, owner=model,
                       embeddings=model.get_input_embeddings() if hasattr(model, "get_input_embeddings")
                       else None, ignore_attention_dropout=ignore_attention_dropout, kind=kind, sites=sites)
    state.previous_impl = model.config._attn_implementation
    state.previous_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}

    # Attach: tag the attention modules, switch the implementation, hook the module running the layers.
    model.__dict__[STATE_ATTR] = state
    try:
        if kind == "causal":
            for module in model.modules():
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.__dict__[STATE_ATTR] = state
                    state.tagged_modules.append(module)
            base, embedding = _find_layers_owner(model, state)
            state.base_model = base
            base.__dict__[STATE_ATTR] = state
            add_pre_hook(base, positions="owner" if embedding is None else "embedding")
            state.stack_owners.append(base)
            if embedding is not None:  # a seq2seq model's decoder used alone (BartForCausalLM)
                hook_position_embedding(embedding, state, "decoder")
                state.position_modules.append(embedding)
                state.site_modules.extend(mark_decoder_roles(state.layer_modules))
        else:
            structure = roles.attach(model, state, sites)
        model.set_attn_implementation(IMPL_NAME)
        if model.config._attn_implementation != IMPL_NAME:
            raise ValueError(f"{type(model).__name__} refused attn_implementation={IMPL_NAME!r}")
        _switch_detached_configs(state)
        if kind == "seq2seq":
            roles.check_own_encoder(model, structure, state.previous_impl, IMPL_NAME)

        if kind == "seq2seq":
            config, peft_layout = roles.seq2seq_config(
                model, state, structure, sites, num_prefix_tokens, num_prefixes, prefix_projection,
                projection_hidden_size, backend, adapter_shape)
        else:
            config, peft_layout = _probe_config(model, state, num_prefix_tokens, num_prefixes, layers,
                                                prefix_projection, projection_hidden_size, backend,
                                                adapter_shape)
        peft_layout = replace(peft_layout, task_type=task, modules_to_save=head_names)
        if state.attention_dropout and model.training and not ignore_attention_dropout:
            # a model in training mode (built from a config, or .train()): refused now, not at its first
            # step; patched in eval mode (from_pretrained), the first training-mode forward refuses it
            raise ValueError(f"{type(model).__name__} is in training mode with attention dropout "
                             f"{state.attention_dropout}, which prefixattn's fused attention does not "
                             "implement. Set the config's attention dropout to 0, or patch with "
                             "ignore_attention_dropout=True to train without it")
        config = replace(config, cartridge=cartridge, num_frozen_tokens=num_frozen_tokens)
        if not peft_tuner:
            for p in model.parameters():
                p.requires_grad_(False)
            for path in heads:  # the task head trains with the prefix, as PEFT's modules_to_save
                for p in active_copy(model.get_submodule(path)).parameters():
                    p.requires_grad_(True)
        prefix = PrefixKV(config, dtype=dtype, device=input_device(model), init=init)
        prefix.peft_layout = peft_layout
        prefix.heads = heads
        model.add_module(MODULE_NAME, prefix)
        state.prefix = prefix
        if init == "text":
            init_from_text(model, state, _init_texts(init_text, config), tokenizer)
        if config.bank:
            state.wrapped_prepare = wrap_prepare_inputs(model)
        if not peft_tuner:
            _save_only_the_prefix(model, state)
    except BaseException:
        detach(model, state)
        raise
    return model


def _switch_detached_configs(state: PatchState) -> None:
    """Configs of stacks and attention modules that ``set_attn_implementation`` did not reach (T5's stacks
    hold deep copies of the model's config, which transformers 5.17 leaves as they were): switch them too,
    remembering what they had (``detach`` restores it)."""
    seen: set[int] = set()
    for module in (*state.stack_owners, *state.tagged_modules):
        config = getattr(module, "config", None)
        if config is None or id(config) in seen or not hasattr(config, "_attn_implementation"):
            continue
        seen.add(id(config))
        if config._attn_implementation != IMPL_NAME:
            state.previous_config_impls.append((config, config._attn_implementation))
            config._attn_implementation = IMPL_NAME


def _tensor_names(model: nn.Module) -> set[str]:
    """The names the model's parameters and persistent buffers have in its state dict (tied ones under each
    name), read from the modules: ``model.state_dict()`` is never called on the base model, since a
    quantized model's state dict is not a plain read (bitsandbytes 4-bit on a CPU unpacks and requantizes
    its weights there, which changes the model)."""
    names = set()
    for path, module in model.named_modules(remove_duplicate=False):
        where = f"{path}." if path else ""
        names.update(where + n for n, p in module._parameters.items() if p is not None)
        names.update(where + n for n, b in module._buffers.items()
                     if b is not None and n not in module._non_persistent_buffers_set)
    return names


def _save_only_the_prefix(model: nn.Module, state: PatchState) -> None:
    """model.save_pretrained() (and so the HF Trainer's checkpoints) writes the prefix, not the frozen model:
    the replaced ``save_pretrained`` hands transformers a state dict of the prefix and the task head alone
    (``saved.py``), and the frozen tensors' names go into the instance's ``_keys_to_ignore_on_save`` (the
    Trainer's resume then loads the small file without warning that they are missing)."""
    if not hasattr(model, "_keys_to_ignore_on_save"):
        return
    # (had an instance attribute, its value): restored by unpatch
    state.previous_keys_to_ignore_on_save = ("_keys_to_ignore_on_save" in model.__dict__,
                                             model.__dict__.get("_keys_to_ignore_on_save"))
    kept = (MODULE_NAME, *state.prefix.heads)  # the prefix and the task head that trains with it
    frozen = {k for k in _tensor_names(model) if not any(k.startswith(name + ".") for name in kept)}
    model._keys_to_ignore_on_save = set(getattr(model, "_keys_to_ignore_on_save", None) or ()) | frozen
    # ... and marks the directory, so that from_pretrained loads the trained model, never the base model
    # with random weights (checkpoint.py)
    model.__dict__["save_pretrained"] = SavePretrainedWithPrefix(model, state.backend, kept)


def detach(model: nn.Module, state: PatchState) -> None:
    for owner in {id(m): m for m in (state.base_model, *state.stack_owners)}.values():
        remove_pre_hooks(owner)
        owner.__dict__.pop(STATE_ATTR, None)
    state.stack_owners.clear()
    roles.detach_roles(state)
    for module in state.tagged_modules:
        module.__dict__.pop(STATE_ATTR, None)
    state.tagged_modules.clear()
    if model.config._attn_implementation == IMPL_NAME and state.previous_impl is not None:
        model.set_attn_implementation(state.previous_impl)
    for config, impl in state.previous_config_impls:
        config._attn_implementation = impl
    state.previous_config_impls.clear()
    if MODULE_NAME in model._modules:
        del model._modules[MODULE_NAME]
    if state.wrapped_prepare:
        unwrap_prepare_inputs(model)
    if isinstance(model.__dict__.get("save_pretrained"), SavePretrainedWithPrefix):
        del model.__dict__["save_pretrained"]
    if state.previous_keys_to_ignore_on_save is not None:
        had, value = state.previous_keys_to_ignore_on_save
        if had:
            model.__dict__["_keys_to_ignore_on_save"] = value
        else:
            model.__dict__.pop("_keys_to_ignore_on_save", None)
    for name, p in model.named_parameters():
        if name in state.previous_requires_grad:
            p.requires_grad_(state.previous_requires_grad[name])
    model.__dict__.pop(STATE_ATTR, None)
    state.plan = None


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``patch``: restore the previous attention implementation and requires_grad flags, remove the
    prefix module and hooks. Returns the model."""
    state = get_state(model)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not patched by prefixattn")
    detach(model, state)
    return model
