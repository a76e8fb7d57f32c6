"""The prefix's shape: ``PrefixConfig`` (stored in saved files and checked on load), and the check of a
bank entry id."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

LayerShape = tuple[int, int, int]  # (KV heads, key head dim, value head dim) of one layer
SiteKey = int | tuple[str, int]  # a model layer, or (role, layer) in an encoder-decoder with sites="all"

# Where an encoder-decoder carries its prefix (``PrefixConfig.sites``):
#   ""         a decoder-only or encoder-only model: ``layers`` are its attention layers
#   "decoder"  PEFT's seq2seq layout: ``layers`` are blocks of PEFT's 2 x num_layers slots, decoder
#              self-attention layer i reads block 2i mod num_layers (keys and values); encoder and
#              cross-attention carry none
#   "all"      Li & Liang: encoder self-attention, decoder self-attention and cross-attention each carry
#              their own prefix per layer; ``roles`` names each entry's role, ``layers`` its layer
SITES = ("", "decoder", "all")
ROLES = ("encoder", "decoder", "cross")


@dataclass(frozen=True)
class PrefixConfig:
    """Everything that fixes the shapes of a prefix (stored in saved files, checked on load).

    Every prefixed layer's keys and values are stored at one shape, ``num_kv_heads`` x ``head_dim``: PEFT's
    layout, which sizes the prefix for the largest layer. Where layers differ (Gemma 4's global layers
    have a larger head dim and other KV-head counts than its sliding ones; latent attention has a key
    head dim larger than the value head dim), ``layer_shapes`` gives each prefixed layer's own
    (Hkv, Dk, Dv), and the layer reads the leading Hkv heads and the leading Dk (keys) / Dv (values)
    dims, as PEFT slices its Gemma 4 prefix. Empty: every layer is (num_kv_heads, head_dim, head_dim).
    """

    num_tokens: int
    num_kv_heads: int
    head_dim: int
    layers: tuple[int, ...]
    num_layers: int  # layers of the model (prefixed or not)
    num_prefixes: int = 1
    bank: bool = False
    projection: bool = False
    projection_hidden_size: int = 0
    layer_shapes: tuple[LayerShape, ...] = ()  # per entry of ``layers``; () when all are the stored shape
    sites: str = ""  # "" | "decoder" | "all" (encoder-decoders, see SITES)
    roles: tuple[str, ...] = ()  # sites="all": the role of each entry of ``layers``
    # A cartridge (PEFT's CARTRIDGE type: a long KV prefix trained directly, no MLP): save_peft writes it as
    # CARTRIDGE. Its first ``num_frozen_tokens`` tokens never train (the attention sink Cartridges freeze).
    cartridge: bool = False
    num_frozen_tokens: int = 0

    def __post_init__(self) -> None:
        if self.sites not in SITES:
            raise ValueError(f"sites must be one of {SITES}, got {self.sites!r}")
        if (self.sites == "all") != bool(self.roles):
            raise ValueError("roles name every entry's role exactly when sites='all'")
        if self.roles and (len(self.roles) != len(self.layers) or set(self.roles) - set(ROLES)):
            raise ValueError(f"roles must give one of {ROLES} per entry of layers")
        if len(set(self.site_keys())) != len(self.layers):
            raise ValueError(f"layers has duplicates: {list(self.site_keys())}")
        if isinstance(self.num_frozen_tokens, bool) or not isinstance(self.num_frozen_tokens, int):
            raise TypeError(f"num_frozen_tokens must be an int, got {self.num_frozen_tokens!r}")
        if not 0 <= self.num_frozen_tokens <= self.num_tokens:
            raise ValueError(f"num_frozen_tokens must be in [0, num_tokens={self.num_tokens}], got "
                             f"{self.num_frozen_tokens}")
        if self.projection and (self.cartridge or self.num_frozen_tokens):
            raise ValueError("a cartridge (or a prefix with frozen tokens) holds its keys and values "
                             "directly; it cannot be MLP-reparameterized (prefix_projection)")
        if self.layer_shapes and len(self.layer_shapes) != len(self.layers):
            raise ValueError(f"layer_shapes has {len(self.layer_shapes)} entries for {len(self.layers)} "
                             "layers")
        for layer, (h, dk, dv) in zip(self.layers, self.layer_shapes, strict=False):
            if not (1 <= h <= self.num_kv_heads and 1 <= dk <= self.head_dim and 1 <= dv <= self.head_dim):
                raise ValueError(f"layer {layer}'s shape (KV heads {h}, key dim {dk}, value dim {dv}) does "
                                 f"not fit the stored {self.num_kv_heads} x {self.head_dim}")

    def site_keys(self) -> tuple[SiteKey, ...]:
        """The key of each entry of ``layers``: the layer, or (role, layer) with sites="all"."""
        if self.roles:
            return tuple(zip(self.roles, self.layers, strict=True))
        return tuple(self.layers)

    @property
    def token_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_shape(self, slot: int) -> LayerShape:
        """(Hkv, Dk, Dv) of the prefixed layer at ``slot`` (an index into ``layers``)."""
        if self.layer_shapes:
            return self.layer_shapes[slot]
        return (self.num_kv_heads, self.head_dim, self.head_dim)

    @property
    def latent(self) -> bool:
        """Some layer's key head dim differs from its value head dim (multi-head latent attention)."""
        return any(dk != dv for _, dk, dv in self.layer_shapes)

    @property
    def num_trainable_tokens(self) -> int:
        return self.num_tokens - self.num_frozen_tokens

    def single_entry(self) -> PrefixConfig:
        """The config of one entry of this prefix (a bank of 1 is a single prefix)."""
        return PrefixConfig(**{**asdict(self), "num_prefixes": 1, "bank": False})

    def to_json(self) -> str:
        d = asdict(self)
        d["layers"] = list(self.layers)
        if self.layer_shapes:
            d["layer_shapes"] = [list(shape) for shape in self.layer_shapes]
        else:
            del d["layer_shapes"]  # files of uniform prefixes stay what earlier versions wrote and read
        if self.roles:
            d["roles"] = list(self.roles)
        else:
            del d["roles"]
        if not self.sites:
            del d["sites"]  # decoder-only / encoder-only prefixes: the fields earlier versions know
        for key, default in (("cartridge", False), ("num_frozen_tokens", 0)):
            if d[key] == default:
                del d[key]  # plain prefixes: the fields earlier versions know
        return json.dumps(d, sort_keys=True)

    @property
    def extended(self) -> bool:
        """Uses fields that earlier versions of the file format did not have (sites of an
        encoder-decoder)."""
        return bool(self.sites)

    @classmethod
    def from_json(cls, text: str) -> PrefixConfig:
        d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError("prefix config is not a JSON object")
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"prefix config has unknown fields {sorted(unknown)}")
        d["layers"] = tuple(int(i) for i in d["layers"])
        if "layer_shapes" in d:
            d["layer_shapes"] = tuple(tuple(int(x) for x in shape) for shape in d["layer_shapes"])
            if any(len(shape) != 3 for shape in d["layer_shapes"]):
                raise ValueError("prefix config: each layer shape must be [kv_heads, key_dim, value_dim]")
        if "roles" in d:
            d["roles"] = tuple(str(r) for r in d["roles"])
        return cls(**d)


@dataclass(frozen=True)
class PeftLayout:
    """How PEFT's prefix tuning lays a model's prefix out: one (KV heads x head dim) for every layer, and
    the layers that get a prefix. Uniform models: their one shape, every layer. Gemma 4: the shape of its
    largest-head-dim layer, and the layers that fit in it (PEFT slices those, skips larger ones and the
    KV-sharing layers). Encoder-decoders: PEFT's 2 x num_layers slots, of which the decoder's self-attention
    reads the blocks in ``layers`` (``PrefixConfig.sites == "decoder"``). Found by the patcher from the
    model; not stored in files."""

    num_kv_heads: int
    head_dim: int
    layers: tuple[int, ...]
    unsupported: str | None = None  # why PEFT cannot prefix-tune the model at all (a hybrid, ...)
    task_type: str = "CAUSAL_LM"  # PEFT's task type for the model (SEQ_CLS, SEQ_2_SEQ_LM, ...)
    submodules: int = 1  # PEFT's num_transformer_submodules: 2 for encoder-decoders
    modules_to_save: tuple[str, ...] = ()  # PEFT's modules_to_save names for the task type

    @classmethod
    def uniform(cls, config: PrefixConfig) -> PeftLayout:
        return cls(config.num_kv_heads, config.head_dim, tuple(range(config.num_layers)))

    def problems(self, config: PrefixConfig) -> list[str]:
        """Why a prefix of ``config`` is not what PEFT puts on this model (empty: it is)."""
        out = []
        if self.unsupported:
            return [self.unsupported]
        if config.sites == "all":
            return ["the prefix covers encoder self-attention, decoder self-attention and cross-attention "
                    "(sites='all', Li & Liang's setting); PEFT's prefix tuning of an encoder-decoder puts a "
                    "prefix on decoder self-attention only, in a layout that has no place for the others"]
        if (self.submodules == 2) != (config.sites == "decoder"):
            return [f"the prefix was made for {'an encoder-decoder' if config.sites else 'a single stack'}, "
                    f"the model is {'an encoder-decoder' if self.submodules == 2 else 'a single stack'}"]
        if config.latent:
            h, dk, dv = next(s for s in config.layer_shapes if s[1] != s[2])
            out.append(f"the model has latent attention (key head dim {dk} != value head dim {dv}), which "
                       "PEFT's prefix tuning cannot run: its adapter format has one head dim for keys and "
                       "values")
            return out
        if (config.num_kv_heads, config.head_dim) != (self.num_kv_heads, self.head_dim):
            out.append(f"PEFT sizes this model's prefix as {self.num_kv_heads} KV heads x head dim "
                       f"{self.head_dim}, the prefix is stored as {config.num_kv_heads} x {config.head_dim}")
        if tuple(config.layers) != self.layers:
            out.append(f"PEFT puts a prefix on layers {list(self.layers)}, this prefix covers layers "
                       f"{list(config.layers)}")
        return out


def check_prefix_id(prefix_id: int | None, config: PrefixConfig) -> None:
    """A ``prefix_id`` argument (one bank entry) must be an int in range, and only for a bank."""
    if prefix_id is None:
        return
    if isinstance(prefix_id, bool) or not isinstance(prefix_id, int):
        raise TypeError(f"prefix_id must be an int, got {type(prefix_id).__name__}")
    if not config.bank:
        raise ValueError("prefix_id selects an entry of a bank of prefixes, but this model has a single "
                         "prefix (patch with num_prefixes=N for a bank)")
    if not 0 <= prefix_id < config.num_prefixes:
        raise ValueError(f"prefix_id {prefix_id} is out of range: the bank has {config.num_prefixes} entries")
