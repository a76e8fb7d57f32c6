"""The per-step plan: everything every layer needs, prepared once per forward in the pre-hook.

Work that is the same for every layer happens here, once per step, never per layer:

- the prefix is computed (the MLP reparameterization runs once) and cast ONCE to the compute dtype
  (the activations' dtype; under ``torch.autocast`` the autocast dtype);
- a bank's ``prefix_ids`` are validated with a single host read, and put on the device as long ints;
- each prefixed layer's key/value prefix is a ready view into that one tensor.

The attention function of a layer then only looks its entry up: no host sync, no copy of the prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..prefix import PrefixConfig, PrefixKV

LayerPrefix = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]  # (pk, pv, index)
_NO_PREFIX: LayerPrefix = (None, None, None)


@dataclass(frozen=True)
class StepPlan:
    """One forward pass's prefix: per model layer, (pk, pv, index) ready to hand to the op.

    pk/pv are (Hkv, P, D) views for a single prefix, (N, Hkv, P, D) bank views with ``index`` (B,) long
    for a bank. ``capture`` marks a probing / init-from-text pass (the frozen model, no prefix).
    """

    layers: dict[int, LayerPrefix] = field(default_factory=dict)
    dtype: torch.dtype | None = None
    capture: bool = False

    def layer(self, layer_idx: int) -> LayerPrefix:
        return self.layers.get(layer_idx, _NO_PREFIX)


CAPTURE_PLAN = StepPlan(capture=True)


def compute_dtype(device: torch.device, activations: torch.dtype | None) -> torch.dtype | None:
    """The dtype attention computes in: the autocast dtype under ``torch.autocast``, else the
    activations' (None when unknown: the layer then casts to its query's dtype)."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return activations


def check_prefix_ids(prefix_ids: Any, batch: int, config: PrefixConfig, device: torch.device) -> torch.Tensor:
    """Validate a bank's per-row entry ids (before any kernel runs) with one host read; returns them on
    ``device`` as long ints."""
    if not isinstance(prefix_ids, torch.Tensor):
        raise TypeError(f"prefix_ids must be a torch.Tensor of integer ids, got {type(prefix_ids).__name__}")
    if prefix_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"prefix_ids must be int64 (long) or int32, got {prefix_ids.dtype}")
    if prefix_ids.shape != (batch,):
        raise ValueError(f"prefix_ids must have shape (batch,) = ({batch},), got {tuple(prefix_ids.shape)}: "
                         "one id per row of input_ids (generate() repeats them for num_beams / "
                         "num_return_sequences itself)")
    if batch and not torch.compiler.is_compiling():
        lo, hi = torch.stack([prefix_ids.min(), prefix_ids.max()]).tolist()  # the step's one host read
        if lo < 0 or hi >= config.num_prefixes:
            raise ValueError(f"prefix_ids out of range: values span [{lo}, {hi}] but the bank has "
                             f"{config.num_prefixes} entries")
    return prefix_ids.to(device=device, dtype=torch.long)


def build_plan(prefix: PrefixKV, prefix_ids: torch.Tensor | None, dtype: torch.dtype | None) -> StepPlan:
    """The step's plan from the prefix module (``prefix_ids`` already checked, on the prefix's device for
    a bank)."""
    kv = prefix.compute()  # (L, 2, N, Hkv, P, D); the MLP, if any, runs here once
    if dtype is not None and kv.dtype != dtype:
        kv = kv.to(dtype)  # the one autograd-tracked cast of the master prefix per step
    bank = prefix.config.bank
    layers: dict[int, LayerPrefix] = {}
    for layer_idx, slot in prefix.layer_slot.items():
        if bank:
            layers[layer_idx] = (kv[slot, 0], kv[slot, 1], prefix_ids)
        else:
            layers[layer_idx] = (kv[slot, 0, 0], kv[slot, 1, 0], None)
    return StepPlan(layers=layers, dtype=kv.dtype)
