"""The trainable prefix as an ``nn.Module`` (``PrefixKV``), and finding it in a model.

``PrefixKV`` holds, for every layer that carries a prefix, P key and P value vectors per KV head:

- raw (default): one parameter ``kv`` of shape (L, 2, N, Hkv, P, D), L the prefixed layers, 2 = key|value,
  N the bank entries (1 without a bank). ``kv[l, 0]`` is layer l's key bank (N, Hkv, P, D), contiguous,
  which the kernel reads in place.
- raw with frozen leading tokens (a cartridge's attention sink, ``num_frozen_tokens`` = F > 0): the
  buffer ``frozen_kv`` (L, 2, N, Hkv, F, D) and the parameter ``kv`` (L, 2, N, Hkv, P - F, D). A buffer,
  not a parameter: no optimizer sees it, so weight decay cannot move it either, and ``requires_grad_``
  (PEFT's modules_to_save does that to its copy) cannot unfreeze it; it is in the state dict, so files
  and checkpoints carry it. ``compute`` joins the two once per step, in the compute dtype.
- PEFT-style reparameterization (``projection=True``): an embedding (P, Hkv*D) and a two-layer MLP
  (Linear, Tanh, Linear) to (P, L*2*Hkv*D), exactly PEFT's ``PrefixEncoder``. The MLP runs once per
  step (not once per batch row as in PEFT).

Either way ``PrefixKV.compute()`` gives the (L, 2, N, Hkv, P, D) tensor for the step, and
``layer_views`` a layer's keys and values in it: the leading heads and dims of its own shape where layers
differ (``PrefixConfig.layer_shapes``: Gemma 4, latent attention), views the kernels read in place.
Values are kept in ``dtype`` (fp32 master by default); the patcher casts them once per step to the
compute dtype.

A patched model carries its prefix as the submodule named ``MODULE_NAME``, so ``model.parameters()``,
optimizers, DDP and the Trainer see it, and ``find_prefix`` finds it without knowing about the patcher.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .config import PeftLayout, PrefixConfig, SiteKey
from .peft_rows import peft_rows_to_kv

MODULE_NAME = "prefixattn_prefix"

# Wrappers that hold the model they wrap in an attribute: DDP / accelerate (.module), torch.compile
# (._orig_mod).
_WRAPPED_ATTRS = ("module", "_orig_mod")


class PrefixKV(nn.Module):
    """Per-layer prefix keys and values (see the module docstring for the layout)."""

    def __init__(self, config: PrefixConfig, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, init: str = "random") -> None:
        super().__init__()
        self.config = config
        self.peft_layout: PeftLayout | None = None  # set by the patcher: PEFT's layout for the model
        # set by the patcher: the task head PEFT trains with the prefix (modules_to_save of its SEQ_CLS,
        # TOKEN_CLS and QUESTION_ANS models), as module paths in the patched model; saved with the prefix
        self.heads: tuple[str, ...] = ()
        c = config
        L, N, H, P, D = len(c.layers), c.num_prefixes, c.num_kv_heads, c.num_tokens, c.head_dim
        # site key (a layer, or (role, layer) with sites="all") -> index into the L axis
        self.layer_slot: dict[SiteKey, int] = {key: i for i, key in enumerate(c.site_keys())}
        self.register_buffer("frozen_kv", None)  # set below for a raw prefix with frozen tokens
        if c.projection:
            if c.bank:
                raise ValueError(
                    "prefix_projection=True cannot be combined with a bank of prefixes (num_prefixes): the "
                    "MLP would be shared by every entry; use raw prefixes for a bank"
                )
            self.embedding = nn.Embedding(P, c.token_dim, dtype=dtype, device=device)
            self.transform = nn.Sequential(
                nn.Linear(c.token_dim, c.projection_hidden_size, dtype=dtype, device=device),
                nn.Tanh(),
                nn.Linear(c.projection_hidden_size, L * 2 * c.token_dim, dtype=dtype, device=device),
            )
            if init == "zeros":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            values = torch.empty((L, 2, N, H, P, D), dtype=dtype, device=device)
            if init == "zeros":
                nn.init.zeros_(values)
            else:  # PEFT's nn.Embedding default: N(0, 1); a seed gives the same values whatever F is
                nn.init.normal_(values)
            F = c.num_frozen_tokens
            self.kv = nn.Parameter(values[:, :, :, :, F:].clone() if F else values)
            if F:
                self.register_buffer("frozen_kv", values[:, :, :, :, :F].clone())

    def compute(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The prefix of this step, (L, 2, N, Hkv, P, D), in ``dtype`` (default: the parameters')."""
        if self.config.projection:
            kv = peft_rows_to_kv(self.transform(self.embedding.weight), self.config)
        elif self.frozen_kv is None:
            kv = self.kv
        else:  # the one copy of a step: frozen and trained tokens joined in the compute dtype
            return torch.cat([self.frozen_kv.to(dtype or self.kv.dtype), self.kv.to(dtype or self.kv.dtype)],
                             dim=4)
        return kv if dtype is None else kv.to(dtype)

    def layer_views(self, kv: torch.Tensor, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys (N, Hkv, P, Dk) and values (N, Hkv, P, Dv) of the prefixed layer at ``slot`` in ``kv``
        (what ``compute()`` returns, possibly cast): views, no copy."""
        h, dk, dv = self.config.layer_shape(slot)
        return kv[slot, 0, :, :h, :, :dk], kv[slot, 1, :, :h, :, :dv]

    @torch.no_grad()
    def layer_prefix(self, layer_idx: SiteKey, prefix_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's prefix keys (Hkv, P, Dk) and values (Hkv, P, Dv) of one entry, detached.
        ``layer_idx``: a layer, or (role, layer) for an encoder-decoder with sites="all"."""
        slot = self.slot(layer_idx)
        if slot is None:
            raise ValueError(f"layer {layer_idx} carries no prefix (prefixed layers: "
                             f"{list(self.config.site_keys())})")
        pk, pv = self.layer_views(self.compute(), slot)
        return pk[prefix_id], pv[prefix_id]

    def slot(self, layer_idx: SiteKey) -> int | None:
        """Index into the L axis for a model layer (a site key), or None when it carries no prefix."""
        return self.layer_slot.get(layer_idx)

    @torch.no_grad()
    def set_values(self, kv: torch.Tensor, prefix_id: int | None = None) -> None:
        """Overwrite the raw prefix with ``kv`` (L, 2, N or 1, Hkv, P, D); into one bank entry if
        prefix_id."""
        if self.config.projection:
            raise ValueError("this prefix is reparameterized by an MLP (prefix_projection=True); its values "
                             "cannot be set directly")
        entries = slice(None) if prefix_id is None else slice(prefix_id, prefix_id + 1)
        expected = (*self.kv.shape[:2], self.kv.shape[2] if prefix_id is None else 1, *self.kv.shape[3:4],
                    self.config.num_tokens, self.kv.shape[5])
        if tuple(kv.shape) != expected:
            raise ValueError(f"prefix values have shape {tuple(kv.shape)}, expected {expected}")
        F = self.config.num_frozen_tokens
        if self.frozen_kv is not None:
            self.frozen_kv[:, :, entries].copy_(kv[:, :, :, :, :F].to(device=self.frozen_kv.device,
                                                                      dtype=self.frozen_kv.dtype))
        self.kv[:, :, entries].copy_(kv[:, :, :, :, F:].to(device=self.kv.device, dtype=self.kv.dtype))

    def extra_repr(self) -> str:
        c = self.config
        shapes = f", layer_shapes={[list(s) for s in c.layer_shapes]}" if c.layer_shapes else ""
        sites = f", sites={c.sites!r}" if c.sites else ""
        heads = f", heads={list(self.heads)}" if self.heads else ""
        return (f"tokens={c.num_tokens}, layers={len(c.layers)}/{c.num_layers}, kv_heads={c.num_kv_heads}, "
                f"head_dim={c.head_dim}, prefixes={c.num_prefixes if c.bank else 1}, "
                f"projection={c.projection}{shapes}{sites}{heads}"
                + (f", cartridge=True, frozen_tokens={c.num_frozen_tokens}" if c.cartridge else ""))


def active_copy(module: nn.Module | None) -> nn.Module | None:
    """What a model reads in place of the submodule ``module``: the module itself, or, for PEFT's
    ``ModulesToSaveWrapper`` (``modules_to_save=["prefixattn_prefix"]``), the copy of the active adapter
    (the original when the adapters are disabled), as the wrapper's own forward does. Duck-typed: the
    prefix layer does not import peft."""
    copies = getattr(module, "modules_to_save", None)
    if isinstance(copies, nn.ModuleDict) and isinstance(getattr(module, "original_module", None), nn.Module):
        active = list(getattr(module, "active_adapters", None) or [])
        if getattr(module, "disable_adapters", False) or not active or active[0] not in copies:
            return module.original_module
        return copies[active[0]]
    return module


def _candidates(model: nn.Module) -> list[nn.Module]:
    out = [model]
    for attr in _WRAPPED_ATTRS:
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module):
            out.append(inner)
    for m in list(out):
        # a PEFT PeftModel (LoRA, ...): the prefix lives on the transformers model it wraps
        get_base = getattr(type(m), "get_base_model", None)
        if callable(get_base):
            base = m.get_base_model()
            if isinstance(base, nn.Module) and base is not m:
                out.append(base)
    return out


def find_prefix_owner(model: nn.Module) -> tuple[nn.Module, PrefixKV]:
    """(the patched transformers model, its ``PrefixKV``), through the wrappers ``find_prefix`` sees."""
    for candidate in _candidates(model):
        prefix = active_copy(candidate._modules.get(MODULE_NAME))
        if isinstance(prefix, PrefixKV):
            return candidate, prefix
    raise TypeError(f"{type(model).__name__} is not patched by prefixattn.patch")


def find_prefix(model: nn.Module) -> PrefixKV:
    """The ``PrefixKV`` a patched model reads (also through a DDP / accelerate / torch.compile wrapper,
    a PEFT model and PEFT's modules_to_save wrapper); TypeError if the model carries none."""
    return find_prefix_owner(model)[1]
