"""The per-step plan: everything every layer needs, prepared once per forward in the pre-hook.

Work that is the same for every layer happens here, once per step, never per layer:

- the prefix is computed (the MLP reparameterization runs once) and cast ONCE to the compute dtype
  (the activations' dtype; under ``torch.autocast`` the autocast dtype, which the op computes in);
- a bank's ``prefix_ids`` are range-checked and packing is detected with at most ONE host read (the
  values that need checking are stacked and read together), and the ids put on the device as longs;
- packed (padding-free) rows become one ``prefixattn.Documents`` (from position_ids that restart,
  transformers' rule, or from flash-attn style ``cu_seq_lens_q/k``);
- each prefixed layer's key/value prefix is a ready view into that one tensor.

The attention function of a layer then only looks its entry up: no host sync, no copy of the prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..documents import Documents
from ..prefix import PrefixConfig, PrefixKV

LayerPrefix = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]  # (pk, pv, index)
_NO_PREFIX: LayerPrefix = (None, None, None)


@dataclass(frozen=True)
class StepPlan:
    """One forward pass's prefix: per model layer, (pk, pv, index) ready to hand to the op.

    pk/pv are (Hkv, P, Dk) / (Hkv, P, Dv) views for a single prefix, (N, Hkv, P, D*) bank views with
    ``index`` (B,) long for a bank. ``documents`` describes packed rows (None when the rows are not
    packed). ``autocast``: the step runs under torch.autocast (the op casts q/k/v itself). ``capture``
    marks a probing / init-from-text pass (the frozen model, no prefix). ``output_attentions``: the caller
    asked for the attention weights (computed beside the output, ``prefixattn.weights``).
    ``cached``: the layers whose KV cache holds the prefix (generate() on the torch backend).
    """

    layers: dict[int, LayerPrefix] = field(default_factory=dict)
    dtype: torch.dtype | None = None
    documents: Documents | None = None
    autocast: bool = False
    capture: bool = False
    output_attentions: bool = False
    # layers whose KV cache holds their prefix in front of the sequence (``decode_cache.py``):
    # layer_idx -> that cache layer (its ``prefix_len`` first rows are the prefix)
    cached: dict[int, Any] = field(default_factory=dict)

    def layer(self, layer_idx: int) -> LayerPrefix:
        return self.layers.get(layer_idx, _NO_PREFIX)


CAPTURE_PLAN = StepPlan(capture=True)


def compute_dtype(device: torch.device, activations: torch.dtype | None) -> torch.dtype | None:
    """The dtype attention computes in: the autocast dtype under ``torch.autocast``, else the
    activations' (None when unknown: the layer then casts to its query's dtype)."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return activations


def check_prefix_ids(prefix_ids: Any, batch: int) -> None:
    """Type and shape of a bank's per-row entry ids (the range is checked in ``StepInputs.read``)."""
    if not isinstance(prefix_ids, torch.Tensor):
        raise TypeError(f"prefix_ids must be a torch.Tensor of integer ids, got {type(prefix_ids).__name__}")
    if prefix_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"prefix_ids must be int64 (long) or int32, got {prefix_ids.dtype}")
    if prefix_ids.shape != (batch,):
        raise ValueError(f"prefix_ids must have shape (batch,) = ({batch},), got {tuple(prefix_ids.shape)}: "
                         "one id per row of input_ids (generate() repeats them for num_beams / "
                         "num_return_sequences itself)")


def _restarts(position_ids: torch.Tensor, batch: int) -> torch.Tensor:
    """Device bool: does any row's position_ids restart (transformers' packed-sequence rule)?"""
    pos = position_ids.expand(batch, -1)
    return ((pos[:, 1:] - pos[:, :-1]) != 1).any()


@dataclass
class StepInputs:
    """What the pre-hook found in the call that the plan depends on."""

    batch: int
    length: int
    device: torch.device
    prefix_ids: torch.Tensor | None = None  # a bank's ids, type and shape checked
    position_ids: torch.Tensor | None = None  # as given by the caller (before + P)
    attention_mask: torch.Tensor | None = None
    has_cache: bool = False  # a KV cache was passed in
    cu_seq_lens_q: torch.Tensor | None = None
    cu_seq_lens_k: torch.Tensor | None = None
    output_attentions: bool = False

    def documents(self, config: PrefixConfig) -> Documents | None:
        """Validate the ids' range and find packed rows, with one host read; the step's Documents."""
        if self.cu_seq_lens_q is not None or self.cu_seq_lens_k is not None:
            return self._documents_from_cu_seqlens(config)
        may_pack = self.position_ids is not None and self.attention_mask is None and self.length > 1
        compiling = torch.compiler.is_compiling()
        scalars = []
        if self.prefix_ids is not None and self.batch:
            scalars += [self.prefix_ids.min().long(), self.prefix_ids.max().long()]
        if may_pack and not compiling:
            scalars.append(_restarts(self.position_ids, self.batch).long())
        values = torch.stack(scalars).tolist() if scalars and not compiling else []  # the one read
        if self.prefix_ids is not None and values:
            _check_range(values[0], values[1], config)
        packed = may_pack and (compiling or bool(values[-1]))  # under compile: documents always
        if not packed:
            return None
        if self.has_cache:
            raise ValueError("prefixattn: packed rows (position_ids that restart, no attention mask) cannot "
                             "use a KV cache; pass use_cache=False or unpacked rows with an attention mask")
        return Documents.from_position_ids(self.position_ids.expand(self.batch, -1).to(self.device))

    def _documents_from_cu_seqlens(self, config: PrefixConfig) -> Documents:
        if self.prefix_ids is not None and self.batch and not torch.compiler.is_compiling():
            lo, hi = torch.stack([self.prefix_ids.min(), self.prefix_ids.max()]).tolist()
            _check_range(lo, hi, config)
        if self.has_cache:
            raise ValueError("prefixattn: packed rows (cu_seq_lens_q/k) cannot use a KV cache; pass "
                             "use_cache=False")
        cu_q, cu_k = self.cu_seq_lens_q, self.cu_seq_lens_k
        if cu_q is None or (cu_k is not None and cu_k is not cu_q and not torch.equal(cu_q, cu_k)):
            raise ValueError("prefixattn: packed rows need cu_seq_lens_q == cu_seq_lens_k (queries and keys "
                             "are the same tokens: no KV cache)")
        return Documents.from_cu_seqlens(cu_q.to(self.device), self.batch, self.length)


def _check_range(lo: int, hi: int, config: PrefixConfig) -> None:
    if lo < 0 or hi >= config.num_prefixes:
        raise ValueError(f"prefix_ids out of range: values span [{lo}, {hi}] but the bank has "
                         f"{config.num_prefixes} entries")


def build_plan(prefix: PrefixKV, inputs: StepInputs, dtype: torch.dtype | None,
               shared_kv: dict[int, int] | None = None) -> StepPlan:
    """The step's plan: checks the inputs (one host read at most), computes and casts the prefix once,
    and lays out every layer's entry. ``shared_kv`` maps a layer that attends over another layer's keys
    and values (KV sharing: Gemma 3n, Gemma 4) to that layer: it reads that layer's prefix too, as it
    would read it from PEFT's KV cache."""
    documents = inputs.documents(prefix.config)
    ids = None if inputs.prefix_ids is None else inputs.prefix_ids.to(device=inputs.device, dtype=torch.long)
    # (L, 2, N, Hkv, P, D) in the compute dtype: the MLP, if any, runs here once, and this is the one
    # autograd-tracked cast of the master prefix per step (a cartridge's frozen tokens join it here)
    kv = prefix.compute(dtype)
    bank = prefix.config.bank
    layers: dict[int, LayerPrefix] = {}
    for layer_idx, slot in prefix.layer_slot.items():
        pk, pv = prefix.layer_views(kv, slot)
        layers[layer_idx] = (pk, pv, ids) if bank else (pk[0], pv[0], None)
    for layer_idx, source in (shared_kv or {}).items():
        if source in layers:
            layers[layer_idx] = layers[source]
    return StepPlan(layers=layers, dtype=kv.dtype, documents=documents,
                    autocast=torch.is_autocast_enabled(inputs.device.type),
                    output_attentions=inputs.output_attentions)
