"""prefixattn.Documents: the per-position document bounds from position_ids (transformers' rule)
and from flash-attn style cu_seqlens, and the errors for malformed input."""

from __future__ import annotations

import pytest
import torch
from helpers import DOC_LENGTHS, document_ids, packed_position_ids

from prefixattn import Documents


def bounds_by_loop(position_ids):
    """start/end of every position from document_ids (an explicit loop)."""
    starts, ends = [], []
    for ids in document_ids(position_ids):
        S = len(ids)
        st = [min(u for u in range(S) if ids[u] == ids[t]) for t in range(S)]
        en = [max(u for u in range(S) if ids[u] == ids[t]) + 1 for t in range(S)]
        starts.append(st)
        ends.append(en)
    return torch.tensor(starts, dtype=torch.int32), torch.tensor(ends, dtype=torch.int32)


@pytest.mark.parametrize("B,S", [(1, 1), (2, 37), (3, 5)])
def test_from_position_ids(B, S):
    pos = packed_position_ids(B, S, device="cpu")
    docs = Documents.from_position_ids(pos)
    start, end = bounds_by_loop(pos)
    assert docs.start.dtype == torch.int32 and docs.end.dtype == torch.int32
    assert torch.equal(docs.start, start) and torch.equal(docs.end, end)
    docs.validate()


def test_from_position_ids_follows_transformers_rule():
    # a jump that is not +1 starts a document even when position_ids does not restart at 0
    pos = torch.tensor([[5, 6, 7, 0, 1, 3, 4, 4]])
    docs = Documents.from_position_ids(pos)
    assert docs.start.tolist() == [[0, 0, 0, 3, 3, 5, 5, 7]]
    assert docs.end.tolist() == [[3, 3, 3, 5, 5, 7, 7, 8]]


def test_from_cu_seqlens_matches_position_ids():
    B, S = 2, 23
    pos = packed_position_ids(B, S, device="cpu")
    starts = [b * S + t for b in range(B) for t in range(S) if pos[b, t] == 0]
    cu = torch.tensor(starts + [B * S], dtype=torch.int32)
    a = Documents.from_cu_seqlens(cu, B, S)
    b = Documents.from_position_ids(pos)
    assert torch.equal(a.start, b.start) and torch.equal(a.end, b.end)
    assert len(starts) > 2 * B and 1 in DOC_LENGTHS


@pytest.mark.parametrize("cu,msg", [
    ([0, 3, 8], "from 0 to batch \\* seqlen = 10"),
    ([1, 5, 10], "from 0 to batch"),
    ([0, 5, 5, 10], "strictly increasing"),
    ([0, 3, 7, 10], "crosses a batch row boundary"),
])
def test_from_cu_seqlens_errors(cu, msg):
    with pytest.raises(ValueError, match=msg):
        Documents.from_cu_seqlens(torch.tensor(cu), 2, 5)


def test_constructor_and_validate_errors():
    with pytest.raises(TypeError, match="int32"):
        Documents(torch.zeros(1, 3, dtype=torch.int64), torch.ones(1, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="same shape"):
        Documents(torch.zeros(1, 3, dtype=torch.int32), torch.ones(1, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"must be \(B, S\)"):
        Documents.from_position_ids(torch.arange(4))
    with pytest.raises(TypeError, match="integer"):
        Documents.from_position_ids(torch.zeros(1, 4))
    bad = Documents(torch.tensor([[0, 0, 2]], dtype=torch.int32), torch.tensor([[3, 3, 3]], dtype=torch.int32))
    with pytest.raises(ValueError, match="share bounds"):
        bad.validate()
    worse = Documents(torch.tensor([[0, 2, 2]], dtype=torch.int32), torch.tensor([[1, 3, 3]], dtype=torch.int32))
    with pytest.raises(ValueError, match="start\\[b, t\\] <= t"):
        worse.validate()


@pytest.mark.gpu
def test_from_position_ids_does_not_sync():
    pos = packed_position_ids(4, 512, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        docs = Documents.from_position_ids(pos)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert docs.start.is_cuda
