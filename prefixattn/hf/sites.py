"""Where a model attends, and which prefix each attention module reads.

A model is one of three kinds:

- ``"causal"``: a decoder-only model (Llama, GPT-2, ...): its attention modules carry ``layer_idx`` and
  read the prefix of that layer (the patcher's original routing, unchanged);
- ``"encoder"``: an encoder-only model (BERT, RoBERTa, ...; every attention module is bidirectional): one
  stack of layers, each layer's self-attention its own prefix (P-tuning v2, PEFT's SEQ_CLS / TOKEN_CLS /
  QUESTION_ANS);
- ``"seq2seq"``: an encoder-decoder (BART, Whisper, ...): an encoder stack (self-attention) and a decoder
  stack whose layers hold a causal self-attention and a cross-attention. The three attention modules of a
  decoder layer's position share one ``layer_idx``, so routing is by module and role, never by
  ``layer_idx`` alone.

Every attention module of an encoder or encoder-decoder gets a *probe key* (unique: where the shape probe
records its keys and values) and a *site key* (the prefix entry it reads, or None): ``sites="decoder"``
(PEFT's layout) gives decoder self-attention layer i PEFT's block 2i mod L and nothing else a prefix;
``sites="all"`` gives every module its own entry, ``(role, layer)``.

Attention modules are found as the modules whose ``forward`` calls transformers' attention interface
(``ALL_ATTENTION_FUNCTIONS``; some encoder modules carry no ``layer_idx``), or that carry an int
``layer_idx``.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Literal

import torch.nn as nn

from ..prefix import SiteKey

ModelKind = Literal["causal", "encoder", "seq2seq"]
Role = Literal["self", "encoder", "decoder", "cross"]

SITE_ATTR = "_prefixattn_site"  # on an attention module: its site key, or None (no prefix)
CAUSAL_ATTR = "_prefixattn_causal"  # on an attention module: whether it is causal (its role decides)
PROBE_ATTR = "_prefixattn_probe"  # on an attention module: its key in the shape probe
# forward parameters that carry the batch (the module that runs a stack builds the step plan from them)
INPUT_NAMES = ("input_ids", "inputs_embeds", "input_features", "input_values")

_INTERFACE_NAME = "ALL_ATTENTION_FUNCTIONS"
_calls_interface: dict[type, bool] = {}


def calls_attention_interface(module: nn.Module) -> bool:
    """Whether the module's own ``forward`` looks its attention function up in transformers'
    AttentionInterface (the name appears in its code; decorators unwrapped). Cached per class."""
    cls = type(module)
    if cls not in _calls_interface:
        forward = inspect.unwrap(getattr(cls, "forward", None) or (lambda: None))
        code = getattr(forward, "__code__", None)
        _calls_interface[cls] = code is not None and _INTERFACE_NAME in code.co_names
    return _calls_interface[cls]


def is_attention_module(module: nn.Module) -> bool:
    return isinstance(getattr(module, "layer_idx", None), int) or calls_attention_interface(module)


def is_bidirectional(module: nn.Module) -> bool:
    """An attention module that is not causal: ``is_causal`` False, or (BERT copies such as LayoutLM that
    set neither) no ``is_causal`` and no ``layer_idx``, which every module with a KV cache carries."""
    causal = getattr(module, "is_causal", None)
    if causal is not None:
        return not causal
    return not isinstance(getattr(module, "layer_idx", None), int)


def model_kind(model: nn.Module) -> ModelKind:
    """The model's kind (see the module docstring)."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    attention = [m for m in model.modules() if is_attention_module(m)]
    if not attention:
        raise ValueError(f"{type(model).__name__} has no attention module that calls transformers' "
                         "AttentionInterface (or carries a layer_idx); there is nothing to prefix")
    # a *ForCausalLM that keeps a decoder's modules (BigBird-Pegasus's, whose is_causal is unset) says so
    if all(is_bidirectional(m) for m in attention) and not getattr(config, "is_decoder", False):
        return "encoder"
    return "causal"


@dataclass
class Stack:
    """A stack of layers and the module that runs it (whose forward pre-hook builds the step plan)."""

    role: Literal["encoder", "decoder"]
    owner: nn.Module
    layers: nn.ModuleList


@dataclass
class AttentionSite:
    """One attention module: its role and its layer in its stack."""

    module: nn.Module
    role: Role
    layer: int

    @property
    def probe_key(self) -> SiteKey:
        return self.layer if self.role == "self" else (self.role, self.layer)


@dataclass
class Structure:
    """An encoder's or encoder-decoder's stacks and attention modules (decoder-only models: none)."""

    kind: ModelKind
    stacks: list[Stack] = field(default_factory=list)
    sites: list[AttentionSite] = field(default_factory=list)

    def of_role(self, role: Role) -> list[AttentionSite]:
        return sorted((s for s in self.sites if s.role == role), key=lambda s: s.layer)

    def stack(self, role: str) -> Stack | None:
        """The encoder's or the decoder's stack (None: an encoder whose attention does not go through the
        interface, such as BigBird-Pegasus's block-sparse one)."""
        return next((s for s in self.stacks if s.role == role), None)


def _parents(root: nn.Module) -> dict[int, nn.Module]:
    return {id(child): module for module in root.modules() for child in module.children()}


def _takes(module: nn.Module, names: tuple[str, ...]) -> bool:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return any(name in params for name in names)


def _layer_lists(root: nn.Module) -> list[nn.ModuleList]:
    """The outermost ModuleLists under ``root`` that hold attention modules (stacks of layers)."""
    found: list[nn.ModuleList] = []
    inside: set[int] = set()
    for module in root.modules():
        if id(module) in inside:
            continue
        if isinstance(module, nn.ModuleList) and any(is_attention_module(m) for m in module.modules()):
            found.append(module)
            inside.update(id(m) for m in module.modules())
    return found


def _layer_list(root: nn.Module) -> nn.ModuleList | None:
    lists = _layer_lists(root)
    return lists[0] if lists else None


def _sites_in(layers: nn.ModuleList) -> list[tuple[str, nn.Module, int]]:
    """(name in its layer, attention module, its layer) for every module of a stack that calls the
    attention interface: the module's ``layer_idx``, else the index of the layer that holds it (some
    encoders' modules carry no ``layer_idx``)."""
    out = []
    for index, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if calls_attention_interface(module):
                layer_idx = getattr(module, "layer_idx", None)
                out.append((name, module, layer_idx if isinstance(layer_idx, int) else index))
    return out


# a decoder layer's cross-attention module, by its name in the layer (BART & co. "encoder_attn", BERT
# "crossattention", NLLB-MoE / Seamless "cross_attention", T5 "EncDecAttention"): its ``is_causal`` is not
# reliable (NLLB-MoE's self-attention sets none); the shape probe checks the role
_CROSS_NAME = re.compile(r"cross|encoder_attn|encdec", re.IGNORECASE)


def _decoder_role(name: str, module: nn.Module) -> Role:
    if _CROSS_NAME.search(name):
        return "cross"
    # (UMT5 on transformers 5.17 builds its decoder's "SelfAttention" with is_causal=False)
    cross = getattr(module, "is_causal", True) is False and "self" not in name.lower()
    return "cross" if cross else "decoder"


def mark_decoder_roles(layers: list[nn.Module]) -> list[nn.Module]:
    """A seq2seq model's decoder used alone as a causal LM: its self-attention modules are causal whatever
    their ``is_causal`` says (BigBird-Pegasus's say False and rely on the causal mask); returns the modules
    marked."""
    marked = []
    for layer in layers:
        for name, module in layer.named_modules():
            if calls_attention_interface(module):
                module.__dict__[CAUSAL_ATTR] = _decoder_role(name, module) == "decoder"
                marked.append(module)
    return marked


def encoder_structure(model: nn.Module) -> Structure:
    """An encoder-only model: its stack of layers, run by the nearest module above it whose forward takes
    the inputs (BertModel around BertEncoder), and one self-attention site per layer."""
    parents = _parents(model)
    stacks = []
    for layers in _layer_lists(model):
        owner = parents.get(id(layers))
        while owner is not None and not _takes(owner, INPUT_NAMES):
            owner = parents.get(id(owner))
        if owner is not None:
            stacks.append((not _takes(owner, ("input_ids",)), layers, owner))
    if not stacks:
        raise ValueError(f"{type(model).__name__}: no module above its attention layers takes input_ids or "
                         "inputs_embeds; cannot find the module that runs the encoder")
    # a multimodal encoder: the text stack (its runner takes input_ids), not a vision tower's
    _, layers, owner = min(stacks, key=lambda s: s[0])
    sites = [AttentionSite(m, "self", layer) for _, m, layer in _sites_in(layers)]
    _check_one_per_layer(model, sites)
    return Structure("encoder", [Stack("encoder", owner, layers)], sites)


def seq2seq_structure(model: nn.Module) -> Structure:
    """An encoder-decoder: the encoder's and the decoder's stacks, run by ``get_encoder()`` and
    ``get_decoder()``; decoder modules are self-attention when causal, cross-attention otherwise."""
    name = type(model).__name__
    get_encoder, get_decoder = getattr(model, "get_encoder", None), getattr(model, "get_decoder", None)
    if not callable(get_encoder) or not callable(get_decoder):
        raise ValueError(f"{name}: an encoder-decoder without get_encoder() / get_decoder()")
    encoder, decoder = get_encoder(), get_decoder()
    if not isinstance(encoder, nn.Module) or not isinstance(decoder, nn.Module) or encoder is decoder:
        raise ValueError(f"{name}: get_encoder() / get_decoder() do not give two separate stacks")
    enc_layers, dec_layers = _layer_list(encoder), _layer_list(decoder)
    if dec_layers is None:
        raise ValueError(f"{name}: found no attention layer that goes through transformers' "
                         "AttentionInterface in its decoder")
    if not _takes(decoder, INPUT_NAMES):
        raise ValueError(f"{name}: its decoder's forward takes no input_ids / inputs_embeds")
    sites = [] if enc_layers is None else [AttentionSite(m, "encoder", layer)
                                           for _, m, layer in _sites_in(enc_layers)]
    for attr, module, layer in _sites_in(dec_layers):
        sites.append(AttentionSite(module, _decoder_role(attr, module), layer))
    _check_one_per_layer(model, sites)
    if not [s for s in sites if s.role == "decoder"]:
        raise ValueError(f"{name}: its decoder has no causal self-attention module")
    stacks = [Stack("decoder", decoder, dec_layers)]
    if enc_layers is not None and sites[0].role == "encoder":
        stacks.insert(0, Stack("encoder", encoder, enc_layers))
    return Structure("seq2seq", stacks, sites)


def _check_one_per_layer(model: nn.Module, sites: list[AttentionSite]) -> None:
    seen: dict[SiteKey, nn.Module] = {}
    for site in sites:
        if site.probe_key in seen:
            raise ValueError(f"{type(model).__name__}: layer {site.layer} has more than one {site.role} "
                             "attention module; prefixattn gives each layer one prefix per role")
        seen[site.probe_key] = site.module


def peft_num_layers(config: object) -> int | None:
    """PEFT's ``num_layers`` for a model config (``_prepare_prompt_learning_config``'s order): for an
    encoder-decoder, ``num_hidden_layers`` is the encoder's count (BART's attribute map)."""
    for name in ("num_hidden_layers", "num_layers", "n_layer"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def peft_decoder_block(layer: int, num_layers: int) -> int:
    """PEFT's seq2seq prefix: 2 x num_layers slots of keys/values, doubled and split in fours, so decoder
    self-attention layer i reads key slot 4i mod 2L and value slot 4i+1 mod 2L, i.e. both halves of block
    2i mod L (PEFT's rows are [layer][k|v])."""
    return (2 * layer) % num_layers


def assign_sites(structure: Structure, sites: str,
                 num_layers: int | None) -> dict[SiteKey, list[AttentionSite]]:
    """Tag every attention module with its probe key and site key; returns site key -> the modules that
    read it. ``sites="decoder"``: PEFT's layout (``num_layers``: PEFT's L); ``"all"``: one entry per
    module; for an encoder-only model, each layer its own."""
    readers: dict[SiteKey, list[AttentionSite]] = {}
    for site in structure.sites:
        if structure.kind == "encoder":
            key: SiteKey | None = site.layer
        elif sites == "all":
            key = (site.role, site.layer)
        elif site.role == "decoder":
            key = peft_decoder_block(site.layer, num_layers)
        else:
            key = None
        site.module.__dict__[PROBE_ATTR] = site.probe_key
        site.module.__dict__[SITE_ATTR] = key
        site.module.__dict__[CAUSAL_ATTR] = site.role == "decoder"
        if key is not None:
            readers.setdefault(key, []).append(site)
    return readers


def untag(modules: list[nn.Module]) -> None:
    for module in modules:
        module.__dict__.pop(SITE_ATTR, None)
        module.__dict__.pop(PROBE_ATTR, None)
        module.__dict__.pop(CAUSAL_ATTR, None)
