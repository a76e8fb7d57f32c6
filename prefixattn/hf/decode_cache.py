"""generate() on the torch backend: the prefix kept in the KV cache in front of the sequence, as PEFT does.

Why: a decode step attends one query row over P + Sk keys. The Triton decode kernel reads the prefix in
place, so on CUDA the cache holds the sequence only. The torch backend (CPU, MPS, head dims over 256) runs
PyTorch's fused attention, which takes ONE key tensor: with the prefix outside the cache, every layer of
every step would first concatenate [prefix; keys] (a copy of the whole cache, as costly as the attention
itself on a CPU), or run two softmax blocks and merge them. PEFT pays neither: its cache already holds the
prefix. So for these layers prefixattn does the same, once, when generate() hands the model a fresh
DynamicCache under no_grad: the layer's cache object becomes a ``PrefixedCacheLayer`` that starts with
the B prefix rows and grows [prefix; seq], and a decode step is one SDPA call over the cache's tensor,
as PEFT's is. It appends in place into buffers with rows to spare, where transformers' DynamicLayer
copies the whole cache every step.

What stays the same: the cache reports the sequence length only (``get_seq_length``, mask sizes, crop,
positions), so positions, masks and a continued generation are those of the sequence-only cache; the
attention function takes the first P cached rows as the row's prefix (views, no copy) for every call
that is not the plain decode step, so every feature keeps the op's exact rule.

Where it is not used (the cache then holds the sequence only): CUDA layers the kernels take, training
(the cached prefix rows carry no gradient; a cache that holds them is refused under grad), caches other
than a fresh ``DynamicCache`` of plain ``DynamicLayer`` s (sliding-window layers evict old rows, and would
evict the prefix; static, offloaded, quantized and encoder-decoder caches), layers that the patch-time
probe found not attending over their cache layer's own tensors (latent attention caches a compressed
form, Dory copies its cache: ``probe.layers_attending_over_their_cache``), models whose layers share
KV, and a cache made inside a forward (``use_cache=True`` without one) or filled before under the
patch-free path. The prefix in the cache is the one of
the call that created it (PEFT's semantics too): a bank's ``prefix_ids`` or the prefix weights changed
while continuing from that cache do not reach the cached rows.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer

from ..ops import resolve_backend
from ..ops.torch_backend import prefix_rows

# rows a full buffer grows by: at least this many, or 1/16 of what it holds (the slack stays small and a
# decode step copies its new row, not the whole cache as DynamicLayer's concatenation does)
MIN_GROWTH = 64


class PrefixedCacheLayer(DynamicLayer):
    """A DynamicLayer whose tensors are [prefix rows; sequence]: (B, Hkv, P + S, D). Everything that
    measures or cuts the cache counts the sequence only.

    ``keys`` / ``values`` are views of the first P + S rows of buffers with some rows to spare: an update
    writes its new rows in place (DynamicLayer concatenates, copying the whole cache every step) and the
    buffers grow by ``max(MIN_GROWTH, rows / 16)`` when full. Whatever replaces ``keys`` with a tensor
    of its own (beam reordering, batch selection) gets a fresh buffer at the next update."""

    def __init__(self, prefix_k: torch.Tensor, prefix_v: torch.Tensor) -> None:
        super().__init__()
        self.prefix_k, self.prefix_v = prefix_k, prefix_v  # (B, Hkv, P, D*), detached
        self.prefix_len = prefix_k.shape[-2]
        self._k_buf: torch.Tensor | None = None
        self._v_buf: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.keys = self.prefix_k.to(device=key_states.device, dtype=key_states.dtype)
        self.values = self.prefix_v.to(device=value_states.device, dtype=value_states.dtype)
        self._k_buf = self._v_buf = None
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, new = self.keys.shape[-2], key_states.shape[-2]
        if not self._in_buffer(n + new):
            self._rebuffer(n + new)
        self._k_buf[:, :, n:n + new].copy_(key_states)
        self._v_buf[:, :, n:n + new].copy_(value_states)
        self.keys, self.values = self._k_buf[:, :, :n + new], self._v_buf[:, :, :n + new]
        return self.keys, self.values

    def _in_buffer(self, rows: int) -> bool:
        """keys/values are the buffers' leading rows, and the buffers hold ``rows``."""
        buf = self._k_buf
        return (buf is not None and rows <= buf.shape[-2] and self.keys.data_ptr() == buf.data_ptr()
                and self.keys.shape[0] == buf.shape[0] and self.values.data_ptr() == self._v_buf.data_ptr())

    def _rebuffer(self, rows: int) -> None:
        capacity = rows + max(MIN_GROWTH, rows // 16)
        self._k_buf, self._v_buf = _grown(self.keys, capacity), _grown(self.values, capacity)

    def get_seq_length(self) -> int:
        if not self.is_initialized or self.keys is None:
            return 0
        return self.keys.shape[-2] - self.prefix_len

    def reset(self) -> None:
        # dropped, not zeroed (transformers before 5.24 zeroes): the next update puts the prefix back
        self.keys = self.values = self._k_buf = self._v_buf = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if not self.is_initialized:
            return
        length = self.keys.shape[-2] - self.prefix_len
        if tokens_to_remove > 0:  # transformers' legacy form: the length to keep
            tokens_to_remove = min(0, tokens_to_remove - length)
        keep = self.keys.shape[-2] - min(-tokens_to_remove, length)  # never into the prefix
        self.keys, self.values = self.keys[..., :keep, :], self.values[..., :keep, :]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)
        else:
            self.prefix_k = self.prefix_k.repeat_interleave(repeats, dim=0)
            self.prefix_v = self.prefix_v.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.keys, self.values = self.keys[indices, ...], self.values[indices, ...]
        else:
            self.prefix_k, self.prefix_v = self.prefix_k[indices, ...], self.prefix_v[indices, ...]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self.keys = self.keys.index_select(0, beam_idx.to(self.keys.device))
            self.values = self.values.index_select(0, beam_idx.to(self.values.device))


def _grown(rows: torch.Tensor, capacity: int) -> torch.Tensor:
    """A (B, H, capacity, D) buffer that starts with ``rows``."""
    buf = rows.new_empty(*rows.shape[:2], capacity, rows.shape[-1])
    buf[:, :, :rows.shape[-2]].copy_(rows)
    return buf


def held_prefix_layers(cache: Any) -> dict[int, PrefixedCacheLayer]:
    """The layers of a cache that hold their prefix: ``{layer_idx: layer}``."""
    if cache is None or type(cache) is not DynamicCache:
        return {}
    return {i: layer for i, layer in enumerate(cache.layers) if isinstance(layer, PrefixedCacheLayer)}


def prefixed_cache_layers(cache: Any, layers: dict[int, tuple], backend: str, batch: int,
                          allowed: frozenset[int]) -> dict[int, PrefixedCacheLayer]:
    """The step's cache layers that hold their prefix: ``{layer_idx: layer}``. A fresh DynamicCache under
    no_grad gets them here: its plain full-attention layers among ``allowed`` (the layers found at patch
    time to attend over their cache layer's own tensors) whose prefix runs on the torch backend. A cache
    that holds them already is refused under grad (its prefix rows have no gradient)."""
    held = held_prefix_layers(cache)
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for pk, pv, _ in layers.values() for t in (pk, pv))
    if held:
        if grad:
            raise ValueError(
                "prefixattn: this KV cache holds the prefix rows of the generation that created it (no "
                "gradient reaches them); continue from it under torch.no_grad(), or start a new cache "
                "to train")
        return held
    fresh = (type(cache) is DynamicCache and not getattr(cache, "offloading", False)
             and cache.get_seq_length() == 0)
    if grad or not allowed or not fresh:
        return {}
    if not cache.layers and getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
        # a cache made without a config fills its list on first use: lay the plain layers out now
        cache.layers.extend(DynamicLayer() for _ in range(max(layers, default=-1) + 1))
    made = {}
    for idx, (pk, pv, index) in layers.items():
        if idx not in allowed or pk is None or pk.shape[-2] == 0 or idx >= len(cache.layers):
            continue
        layer = cache.layers[idx]
        if type(layer) is not DynamicLayer or layer.is_initialized:
            continue
        if resolve_backend(backend, pk, max(pk.shape[-1], pv.shape[-1])) != "torch":
            continue  # the Triton decode kernel reads the prefix in place
        rows_k = prefix_rows(pk.detach(), batch, index)
        rows_v = prefix_rows(pv.detach(), batch, index)
        cache.layers[idx] = made[idx] = PrefixedCacheLayer(rows_k, rows_v)
    return made


def decode_over_cache(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, prefix_len: int,
                      padding: torch.Tensor | None, scale: float | None) -> torch.Tensor:
    """One decode step (Sq == 1) over a cache tensor [prefix; seq]: it sees every cached key but padding,
    one SDPA call as PEFT's. (B, Hq, 1, D) q, (B, Hkv, P + S, D) k/v, padding (B, S) bool or None ->
    (B, Hq, 1, Dv). Transformers' GQA rule: SDPA's GQA flag where every fused kernel serves it, else
    K/V repeated over the group."""
    mask = None
    if padding is not None:
        mask = torch.cat([padding.new_ones(padding.shape[0], prefix_len), padding], 1)[:, None, None, :]
    G = query.shape[1] // key.shape[1]
    gqa_flag = G > 1 and (query.device.type in ("cpu", "mps")
                          or (mask is None and key.shape[-1] == value.shape[-1] <= 256))
    if G > 1 and not gqa_flag:
        key, value = key.repeat_interleave(G, 1), value.repeat_interleave(G, 1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale,
                                          enable_gqa=gqa_flag)
