"""``Documents``: where each packed (padding-free) document starts and ends, per position.

A packed batch row holds several documents one after the other (transformers'
DataCollatorWithFlattening, TRL padding_free). Each query sees the prefix and the causal keys of
its own document only. The op needs, for every position t of row b, the first position of t's
document (``start``) and one past its last (``end``): query i then sees sequence keys
``start[b, i] <= j <= i`` (causal) or ``start[b, i] <= j < end[b, i]`` (causal=False).

Both constructors work on the device with tensor ops only (no host synchronisation), so the
per-step plan can build them without stalling the GPU. Checks that need the values on the host
run only in ``from_cu_seqlens`` (whose offsets must be read anyway to be trusted) or when asked
for with ``validate()``: call it once per step where a sync is acceptable, never per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _ends_from_starts(new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, end) int32 (B, S) from a bool (B, S) "a document starts here" map (column 0 True)."""
    B, S = new.shape
    t = torch.arange(S, device=new.device, dtype=torch.int32).expand(B, S)
    # start: the last boundary at or before t
    start = torch.where(new, t, torch.zeros_like(t)).cummax(dim=1).values
    # end: the first boundary after t (S when none): a reversed running minimum over boundaries at u > t
    at = torch.where(new, t, torch.full_like(t, S))
    nxt = torch.cat([at[:, 1:], torch.full_like(at[:, :1], S)], dim=1)
    end = nxt.flip(1).cummin(dim=1).values.flip(1)
    return start.contiguous(), end.contiguous()


@dataclass(frozen=True, eq=False)  # eq on tensors would be elementwise: compare by identity
class Documents:
    """Per-position document bounds of packed rows: ``start`` and ``end``, int32 (B, S), on the
    device of the attention inputs. ``start[b, t] <= t < end[b, t]``."""

    start: torch.Tensor
    end: torch.Tensor

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"Documents.{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 2:
                raise ValueError(f"Documents.{name} must be (B, S), got shape {tuple(t.shape)}")
            if t.dtype != torch.int32:
                raise TypeError(f"Documents.{name} must be int32, got {t.dtype}")
        if self.start.shape != self.end.shape:
            raise ValueError(
                f"Documents.start and .end must have the same shape, got {tuple(self.start.shape)} "
                f"and {tuple(self.end.shape)}"
            )
        if self.start.device != self.end.device:
            raise ValueError("Documents.start and .end are on different devices")

    @property
    def shape(self) -> torch.Size:
        return self.start.shape

    @property
    def device(self) -> torch.device:
        return self.start.device

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor) -> Documents:
        """transformers' rule: a new document at t = 0 and wherever position_ids[t] - position_ids[t-1] != 1.
        No host synchronisation."""
        if not isinstance(position_ids, torch.Tensor):
            raise TypeError(f"position_ids must be a torch.Tensor, got {type(position_ids).__name__}")
        if position_ids.dim() != 2:
            raise ValueError(f"position_ids must be (B, S), got shape {tuple(position_ids.shape)}")
        if position_ids.dtype not in _INT_DTYPES:
            raise TypeError(f"position_ids must be an integer tensor, got {position_ids.dtype}")
        pos = position_ids.long()
        new = torch.ones_like(pos, dtype=torch.bool)
        new[:, 1:] = (pos[:, 1:] - pos[:, :-1]) != 1
        return cls(*_ends_from_starts(new))

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, batch: int, seqlen: int) -> Documents:
        """flash-attn varlen offsets over the flattened batch * seqlen tokens: document d spans
        [cu_seqlens[d], cu_seqlens[d + 1]). Every row start (a multiple of seqlen) must be a
        boundary. Reads the offsets on the host once to check them (call once per step)."""
        if not isinstance(cu_seqlens, torch.Tensor):
            raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(
                f"cu_seqlens must be 1-D with at least 2 offsets, got shape {tuple(cu_seqlens.shape)}"
            )
        if cu_seqlens.dtype not in _INT_DTYPES:
            raise TypeError(f"cu_seqlens must be an integer tensor, got {cu_seqlens.dtype}")
        if int(batch) < 1 or int(seqlen) < 1:
            raise ValueError(f"batch and seqlen must be >= 1, got batch={batch}, seqlen={seqlen}")
        batch, seqlen = int(batch), int(seqlen)
        total = batch * seqlen
        cu = cu_seqlens.long()
        host = cu.tolist()
        if host[0] != 0 or host[-1] != total:
            raise ValueError(
                f"cu_seqlens must run from 0 to batch * seqlen = {total}, got {host[0]} .. {host[-1]}"
            )
        if any(b <= a for a, b in zip(host, host[1:], strict=False)):
            raise ValueError("cu_seqlens must be strictly increasing (every document has at least one token)")
        missing = sorted(set(range(0, total, seqlen)) - set(host))
        if missing:
            raise ValueError(
                f"a document crosses a batch row boundary: offsets {missing[:4]} (multiples of "
                f"seqlen={seqlen}) are not in cu_seqlens"
            )
        new = torch.zeros(total, dtype=torch.bool, device=cu.device)
        new[cu[:-1]] = True
        return cls(*_ends_from_starts(new.view(batch, seqlen)))

    def validate(self) -> None:
        """Check the values (reads them on the host: once per step, not per layer):
        0 <= start[t] <= t < end[t] <= S, and positions of one document agree on its bounds."""
        B, S = self.start.shape
        t = torch.arange(S, device=self.start.device, dtype=torch.int32).expand(B, S)
        ok = (self.start >= 0) & (self.start <= t) & (t < self.end) & (self.end <= S)
        if not bool(ok.all()):
            raise ValueError("Documents: need 0 <= start[b, t] <= t < end[b, t] <= S at every position")
        same = (self.start[:, 1:] == self.start[:, :-1]) & (self.end[:, 1:] == self.end[:, :-1])
        boundary = (self.start[:, 1:] == t[:, 1:]) & (self.end[:, :-1] == t[:, 1:])
        if not bool((same | boundary).all()):
            raise ValueError(
                "Documents: neighbouring positions must share bounds or meet at a document boundary"
            )


__all__ = ["Documents"]
