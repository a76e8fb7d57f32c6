"""The torch backend of ``prefix_attention``: fused attention kernels (PyTorch's own), the prefix never
expanded into the scores, no (Sq, Sk) fp32 tensor for the common masks.

Same contract as the Triton launchers (``attention_forward`` / ``attention_backward``, same arguments,
same outputs: the row logsumexp includes the sinks), so the autograd Function and the torch.library
ops serve both backends.

How a call is split (``engines.py`` attends one block of keys and returns its logsumexp):

- concat (causal with Sq == Sk, causal=False, or a decode step over a short cache; no window, no
  documents): one kernel call
  over K = [prefix; k], V = [prefix_v; v]. For causal rows the queries get P zero rows in front:
  top-left causal over (P + Sq, P + Sk) is then exactly our rule (query i sees every prefix slot and
  sequence keys j <= i), so the kernel's causal block skipping does the masking and nothing (Sq, Sk)
  is built. Padding is a (B, 1, 1, P + Sk) additive key mask.
- blocks (decode steps over a long cache, sliding windows, packed documents, chunked prefill with
  Sq < Sk): the prefix as one block,
  the sequence keys in tiles of rows, each over the key range its rows can see, with a mask of that
  (rows, keys) tile only (a decode step: one tile, the KV cache read in place); the blocks are merged by
  their log-sum-exp:

      L = log(sum_blocks exp(lse_block) + exp(sink)),   out = sum_blocks exp(lse_block - L) out_block

The backward runs each block's engine backward with the merged out and L (engines.py: FlashAttention's
identity), only for the gradients asked for: a layer whose q, k, v need no gradient (layer 0 of a
frozen model) runs the prefix block alone. The prefix gradient is summed over the batch (shared
prefix) or added into the bank rows that ``prefix_index`` picked (the others get exact zeros).
Sinks: dsink_h = -sum_{b,i} exp(sink_h - L_bhi) Delta_bhi, Delta = rowsum(dO * O).

A score bias (1|B, 1|Hq, Sq, P + Sk) joins each block's additive mask: the block's rows and columns
of it (the prefix block its first P columns), so a masked block's mask gains a head axis. It is a
constant: the backward adds the same masks and computes no gradient for it. The two-sided window
(causal=False with a window: |a - j| < W) narrows each tile's key range on both sides.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .engines import compute_dtype, engine_for

# Rows per tile when the sequence keys are split (windows, documents): bounds each tile's mask.
ROWS_PER_TILE = 256
# Decode steps over at most this many cached keys copy them behind the prefix (one kernel call).
DECODE_CONCAT_KEYS = 256
# a causal square runs as one call over [prefix; k] while P * this <= S (concat_applies)
CONCAT_PREFIX_RATIO = 8
# Calls with at most this many query rows (decode steps, short verification chunks) in float32/float64
# run as plain matmuls over the prefix and the cache in place: their scores are (B, H, rows, P + Sk),
# small, and one fused-kernel call costs more in fixed overhead than the whole matmul path.
SMALL_ROWS = 4


@dataclass(frozen=True)
class Tile:
    """One engine call: rows r0..r1 against sequence keys k0..k1, with a causal flag (top-left, square
    tiles only) and an additive mask (B or 1, 1, r1 - r0 or 1, k1 - k0) or None."""

    r0: int
    r1: int
    k0: int
    k1: int
    causal: bool
    mask: torch.Tensor | None


def autocast_off(q: torch.Tensor):
    """A context without autocast for q's device (a no-op context when autocast is off anyway)."""
    if torch.is_autocast_enabled(q.device.type):
        return torch.autocast(q.device.type, enabled=False)
    return contextlib.nullcontext()


def prefix_rows(prefix: torch.Tensor, batch: int, prefix_index: torch.Tensor | None) -> torch.Tensor:
    """(B, Hkv, P, D): the prefix of every batch row (a view for a shared prefix, gathered from a bank)."""
    if prefix_index is not None:
        return prefix.index_select(0, prefix_index.long())
    if prefix.dim() == 3:
        return prefix.unsqueeze(0).expand(batch, -1, -1, -1)
    return prefix


def reduce_prefix_grad(rows: torch.Tensor, prefix: torch.Tensor, prefix_index: torch.Tensor | None):
    """The gradient of ``prefix`` from the gradient of its per-row copies (B, Hkv, P, D)."""
    rows = rows.to(prefix.dtype)
    if prefix_index is not None:  # entries no row picked stay exactly zero
        return torch.zeros_like(prefix).index_add_(0, prefix_index.long(), rows)
    if prefix.dim() == 3:
        return rows.sum(0)
    return rows


def key_mask(pad: torch.Tensor | None, dtype: torch.dtype, lead: int = 0) -> torch.Tensor | None:
    """Additive (B, 1, 1, lead + Sk) mask from a (B, Sk) padding mask; ``lead`` visible slots in front."""
    if pad is None:
        return None
    B, Sk = pad.shape
    mask = torch.zeros(B, lead + Sk, dtype=dtype, device=pad.device)
    mask[:, lead:].masked_fill_(~pad, float("-inf"))
    return mask.view(B, 1, 1, lead + Sk)


def with_bias(mask: torch.Tensor | None, bias: torch.Tensor | None, r0: int, r1: int, c0: int, c1: int,
              dtype: torch.dtype) -> torch.Tensor | None:
    """A block's additive mask plus the score bias's rows r0..r1 and columns c0..c1 (in ``dtype``):
    (B|1, Hq|1, rows, cols), or the mask alone without a bias."""
    if bias is None:
        return mask
    b = bias[:, :, r0:r1, c0:c1].to(dtype)
    return b if mask is None else b + mask


def rule_mask(r0: int, r1: int, k0: int, k1: int, sq: int, sk: int, *, causal: bool, window: int,
              pad: torch.Tensor | None, doc_start: torch.Tensor | None, doc_end: torch.Tensor | None,
              dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive (B or 1, 1, rows, keys) mask of DESIGN.md's rule on one tile: query i (absolute position
    a = i + Sk - Sq) sees key j when lo(i) <= j <= hi(i) and j is not padding."""
    i = torch.arange(r0, r1, device=device).view(1, -1, 1)
    a = i + (sk - sq)
    j = torch.arange(k0, k1, device=device).view(1, 1, -1)
    vis = j <= a if causal else torch.ones(1, 1, 1, dtype=torch.bool, device=device)
    if window:
        vis = vis & (j > a - window)
        if not causal:  # two-sided
            vis = vis & (j < a + window)
    if doc_start is not None:  # Sq == Sk: query i's document is that of position i
        vis = vis & (j >= doc_start[:, r0:r1].unsqueeze(-1))
        if not causal:
            vis = vis & (j < doc_end[:, r0:r1].unsqueeze(-1))
    if pad is not None:
        vis = vis & pad[:, k0:k1].unsqueeze(1)
    vis = vis.expand(vis.shape[0], r1 - r0, k1 - k0)
    mask = torch.zeros(vis.shape, dtype=dtype, device=device).masked_fill_(~vis, float("-inf"))
    return mask.unsqueeze(1)


def concat_applies(sq: int, sk: int, causal: bool, window: int, documents: bool, prefix_len: int) -> bool:
    """[prefix; k] in one call: prefill / training rows, encoders, and decode steps over a short cache.
    A decode step over a longer cache attends the prefix on its own instead: copying the whole cache
    into [prefix; k] costs more than the second call and the merge (crossover near 256 keys, measured
    on a CPU: bench/results/cpu-train-*.md). A causal square takes P zero query rows in front, which
    attend (causally) over the prefix too: (P + S)^2 / 2 pairs against P S + S^2 / 2 for two calls and
    a merge, so a long prefix (P > S / 8; cartridges) runs as two calls (measured on a CPU, fwd + bwd:
    S = 1024: P = 64 concatenated 16 ms vs 20 ms, P = 256 23 vs 21 ms; S = 256, P = 2048: 56 vs 12 ms)."""
    if window or documents:
        return False
    if sq == 1:
        return sk <= DECODE_CONCAT_KEYS
    if not causal:
        return True
    return sq == sk and prefix_len * CONCAT_PREFIX_RATIO <= sq


def sequence_tiles(sq: int, sk: int, *, causal: bool, window: int, pad, doc_start, doc_end, dtype,
                   device) -> list[list[Tile]]:
    """The sequence keys of the blocks strategy: groups of tiles; the tiles of a group cover every row once
    (one group per key range for chunked prefill; one group of row tiles for windows and documents)."""
    if not window and doc_start is None:
        if not causal or sq == 1 or sq == sk:  # every key, or the causal square
            square = causal and sq > 1
            return [[Tile(0, sq, 0, sk, square, key_mask(pad, dtype))]]
        # chunked prefill: the keys before the chunk (all visible), and the chunk itself (causal)
        past = sk - sq
        return [
            [Tile(0, sq, 0, past, False, key_mask(pad[:, :past] if pad is not None else None, dtype))],
            [Tile(0, sq, past, sk, True, key_mask(pad[:, past:] if pad is not None else None, dtype))],
        ]
    tiles = []
    for r0 in range(0, sq, ROWS_PER_TILE):
        r1 = min(sq, r0 + ROWS_PER_TILE)
        k1 = r1 + (sk - sq) if causal else sk  # one past the last row's last key
        if window and not causal:  # two-sided: the last row sees up to a + W - 1
            k1 = max(0, min(sk, r1 - 1 + (sk - sq) + window))
        k0 = max(0, r0 + (sk - sq) - window + 1) if window else 0
        mask = rule_mask(r0, r1, k0, k1, sq, sk, causal=causal, window=window, pad=pad, doc_start=doc_start,
                         doc_end=doc_end, dtype=dtype, device=device)
        tiles.append(Tile(r0, r1, k0, k1, False, mask))
    return [tiles]


# ---------------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------------


def attention_forward(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, doc_start, doc_end, sinks,
                      causal, scale, softcap, window, deterministic, score_bias=None):
    """(out (B, Hq, Sq, Dv) in q's dtype, lse (B, Hq, Sq) fp32 (fp64 for fp64 inputs), sinks included)."""
    with autocast_off(q):  # the inputs carry the compute dtype already
        engine = engine_for(q, softcap)
        B, Sq, Sk = q.shape[0], q.shape[2], k.shape[2]
        pk, pv = prefix_rows(prefix_k, B, prefix_index), prefix_rows(prefix_v, B, prefix_index)
        P, ct = pk.shape[2], compute_dtype(q.dtype)
        if small_rows_apply(q, Sq, doc_start is not None):
            return _small_rows_forward(q, k, v, pk, pv, key_padding_mask, causal, scale, softcap, window,
                                       score_bias, sinks)
        if concat_applies(Sq, Sk, causal, window, doc_start is not None, P):
            groups = [_concat_forward(engine, q, k, v, pk, pv, key_padding_mask, causal, scale, softcap,
                                      score_bias)]
        else:
            groups = [engine.forward(q, pk, pv, with_bias(None, score_bias, 0, Sq, 0, P, ct), False, scale,
                                     softcap)] if P else []
            for tiles in sequence_tiles(Sq, Sk, causal=causal, window=window, pad=key_padding_mask,
                                        doc_start=doc_start, doc_end=doc_end, dtype=q.dtype, device=q.device):
                groups.append(_tiles_forward(engine, q, k, v, tiles, scale, softcap, score_bias, P))
        # a row may see nothing: no prefix and no sink, or a bias that hides keys with -inf
        may_be_empty = (P == 0 and sinks is None) or score_bias is not None
        return _merge(groups, sinks, q, may_be_empty=may_be_empty)


def small_rows_apply(q: torch.Tensor, sq: int, documents: bool) -> bool:
    """Decode steps (and other calls of a few rows) in float32/float64: ``_small_rows_forward``. Half
    precision keeps the fused kernel, which accumulates the scores in float32."""
    return sq <= SMALL_ROWS and not documents and q.dtype in (torch.float32, torch.float64)


def _small_rows_forward(q, k, v, pk, pv, pad, causal, scale, softcap, window, bias, sinks):
    """Few query rows: the scores against [prefix; k] as two matmuls (K/V read in place, the GQA group's
    query heads stacked as rows of their KV head), the rule's mask on the (rows, Sk) scores, one softmax
    over P + Sk columns (sinks in its denominator), and the output as two matmuls. Returns (out, lse)."""
    B, Hq, Sq, Dk = q.shape
    Hkv, Sk, P = k.shape[1], k.shape[2], pk.shape[2]
    G = Hq // Hkv
    qg = q.reshape(B, Hkv, G * Sq, Dk)  # rows (g, i) of KV head h
    scores = torch.cat([qg @ pk.transpose(-1, -2), qg @ k.transpose(-1, -2)], -1).view(B, Hq, Sq, P + Sk)
    scores = scores * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    if pad is not None or window or (causal and Sq > 1):
        seq = rule_mask(0, Sq, 0, Sk, Sq, Sk, causal=causal, window=window, pad=pad, doc_start=None,
                        doc_end=None, dtype=scores.dtype, device=q.device)
        scores[..., P:] += seq
    lse = torch.logsumexp(scores, -1)
    if sinks is not None:
        lse = torch.logaddexp(lse, sinks.to(lse.dtype).view(1, -1, 1))
    weights = torch.exp(scores - lse.masked_fill(torch.isneginf(lse), 0.0).unsqueeze(-1))  # empty rows: 0
    weights = weights.view(B, Hkv, G * Sq, P + Sk)
    out = weights[..., :P] @ pv + weights[..., P:] @ v
    return out.view(B, Hq, Sq, v.shape[-1]), lse


def concat_mask(pad, bias, P: int, lead_rows: int, q: torch.Tensor) -> torch.Tensor | None:
    """The additive mask of the one call over [prefix; k]: padding (P visible slots in front) plus the
    score bias, whose rows get ``lead_rows`` zero rows in front (the zero query rows of a causal call)."""
    mask = key_mask(pad, q.dtype, lead=P)
    if bias is None:
        return mask
    if lead_rows:
        bias = torch.cat([bias.new_zeros(*bias.shape[:2], lead_rows, bias.shape[3]), bias], 2)
    return with_bias(mask, bias, 0, bias.shape[2], 0, bias.shape[3], compute_dtype(q.dtype))


def _concat_forward(engine, q, k, v, pk, pv, pad, causal, scale, softcap, bias):
    B, Hq, Sq, Dk = q.shape
    P = pk.shape[2]
    kernel_causal = causal and Sq > 1  # a decode step sees every key
    if P + k.shape[2] == 0:
        return _nothing(q, v)
    if P == 0:
        return engine.forward(q, k, v, concat_mask(pad, bias, 0, 0, q), kernel_causal, scale, softcap)
    kc, vc = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
    if not kernel_causal:
        return engine.forward(q, kc, vc, concat_mask(pad, bias, P, 0, q), False, scale, softcap)
    qc = torch.cat([q.new_zeros(B, Hq, P, Dk), q], 2)  # P rows in front: top-left causal = our rule
    out, lse = engine.forward(qc, kc, vc, concat_mask(pad, bias, P, P, q), True, scale, softcap)
    return out[:, :, P:], lse[:, :, P:]


def _tiles_forward(engine, q, k, v, tiles, scale, softcap, bias, P):
    parts = []
    ct = compute_dtype(q.dtype)
    for t in tiles:
        if t.k1 > t.k0:
            mask = with_bias(t.mask, bias, t.r0, t.r1, P + t.k0, P + t.k1, ct)
            parts.append(engine.forward(q[:, :, t.r0:t.r1], k[:, :, t.k0:t.k1], v[:, :, t.k0:t.k1], mask,
                                        t.causal, scale, softcap))
        else:
            parts.append(_nothing(q[:, :, t.r0:t.r1], v))
    if len(parts) == 1:
        return parts[0]
    return torch.cat([o for o, _ in parts], 2), torch.cat([lse for _, lse in parts], 2)


def _nothing(q, v):
    B, Hq, R = q.shape[:3]
    out = q.new_zeros(B, Hq, R, v.shape[-1])
    return out, torch.full((B, Hq, R), float("-inf"), dtype=compute_dtype(q.dtype), device=q.device)


def _merge(groups, sinks, q, may_be_empty):
    """One softmax from its blocks (and the sinks): L = log-sum-exp of the parts, each block's out
    weighted by exp(lse - L). ``may_be_empty``: some row may see nothing at all (L = -inf)."""
    if len(groups) == 1 and sinks is None:
        out, lse = groups[0]
        return out.to(q.dtype), lse
    L = groups[0][1]
    for _, lse in groups[1:]:
        L = torch.logaddexp(L, lse)
    if sinks is not None:
        L = torch.logaddexp(L, sinks.to(L.dtype).view(1, -1, 1))
    finite = L.masked_fill(torch.isneginf(L), 0.0) if may_be_empty else L  # empty rows: weights exp(-inf)
    ct = compute_dtype(q.dtype)
    out = None
    for o, lse in groups:
        w = torch.exp(lse - finite).unsqueeze(-1)
        out = o.to(ct) * w if out is None else torch.addcmul(out, o.to(ct), w)
    return out.to(q.dtype), L


# ---------------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------------


def attention_backward(grad_out, q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_index,
                       doc_start, doc_end, sinks, causal, scale, softcap, window,
                       need_dq, need_dkv, need_dprefix, need_dsinks, deterministic, score_bias=None):
    """(dq, dk, dv, dprefix_k, dprefix_v, dsinks); an empty tensor for each gradient not asked for."""
    with autocast_off(q):
        engine = engine_for(q, softcap)
        B, Sq, Sk = q.shape[0], q.shape[2], k.shape[2]
        P = prefix_k.shape[-2]
        ct = compute_dtype(q.dtype)
        need_dprefix = need_dprefix and P > 0
        do = grad_out.to(q.dtype)
        L = lse.masked_fill(torch.isneginf(lse), float("inf"))  # rows that saw nothing: every P_ij = 0
        pk, pv = prefix_rows(prefix_k, B, prefix_index), prefix_rows(prefix_v, B, prefix_index)
        grads = _Grads(q, k, v, pk, pv)
        run_sequence = need_dq or need_dkv
        if run_sequence and concat_applies(Sq, Sk, causal, window, doc_start is not None, P):
            _concat_backward(engine, grads, do, q, k, v, pk, pv, out, L, key_padding_mask, causal, scale,
                             softcap, need_dq, score_bias)
        else:
            if run_sequence:
                groups = sequence_tiles(Sq, Sk, causal=causal, window=window, pad=key_padding_mask,
                                        doc_start=doc_start, doc_end=doc_end, dtype=q.dtype, device=q.device)
                for tiles in groups:
                    for t in tiles:
                        if t.k1 <= t.k0:
                            continue
                        rows, keys = slice(t.r0, t.r1), slice(t.k0, t.k1)
                        mask = with_bias(t.mask, score_bias, t.r0, t.r1, P + t.k0, P + t.k1, ct)
                        dq, dk, dv = engine.backward(
                            do[:, :, rows], q[:, :, rows], k[:, :, keys], v[:, :, keys], out[:, :, rows],
                            L[:, :, rows], mask, t.causal, scale, softcap, need_dq, need_dkv)
                        grads.add(rows, keys, dq, dk, dv)
            if P and (need_dq or need_dprefix):
                mask = with_bias(None, score_bias, 0, Sq, 0, P, ct)
                dq, dpk, dpv = engine.backward(do, q, pk, pv, out, L, mask, False, scale, softcap, need_dq,
                                               True)
                grads.add(slice(None), None, dq, None, None)
                grads.add_prefix(dpk, dpv)
        def empty():  # one per missing gradient: outputs of a custom op may not alias each other
            return q.new_empty((0,))

        dsinks = empty()
        if need_dsinks and sinks is not None:
            delta = (do.to(ct) * out.to(ct)).sum(-1)
            dsinks = -(torch.exp(sinks.to(L.dtype).view(1, -1, 1) - L) * delta).sum((0, 2)).to(sinks.dtype)
        dq = grads.dq.to(q.dtype) if need_dq else empty()
        dk = grads.dk.to(k.dtype) if need_dkv else empty()
        dv = grads.dv.to(v.dtype) if need_dkv else empty()
        if need_dprefix:
            dpk = reduce_prefix_grad(grads.dpk, prefix_k, prefix_index)
            dpv = reduce_prefix_grad(grads.dpv, prefix_v, prefix_index)
        else:
            dpk, dpv = empty(), empty()
        return dq, dk, dv, dpk, dpv, dsinks


class _Grads:
    """Gradient accumulators: a block's share is stored as is when it is the only one, else added
    (in the compute dtype)."""

    def __init__(self, q, k, v, pk, pv):
        self._shapes = {"dq": q, "dk": k, "dv": v}
        self._ct = compute_dtype(q.dtype)
        self.dq = self.dk = self.dv = self.dpk = self.dpv = None

    def _acc(self, name, index, value):
        if value is None:
            return
        cur = getattr(self, name)
        ref = self._shapes[name]
        if index is None or (index == slice(None)):
            setattr(self, name, value if cur is None else cur.to(self._ct) + value)
            return
        if cur is None:
            cur = torch.zeros(ref.shape, dtype=self._ct, device=ref.device)
        elif cur.dtype != self._ct:
            cur = cur.to(self._ct)
        cur[:, :, index] += value
        setattr(self, name, cur)

    def add(self, rows, keys, dq, dk, dv):
        self._acc("dq", rows, dq)
        self._acc("dk", keys, dk)
        self._acc("dv", keys, dv)

    def add_prefix(self, dpk, dpv):
        self.dpk, self.dpv = dpk, dpv


def _concat_backward(engine, grads, do, q, k, v, pk, pv, out, L, pad, causal, scale, softcap, need_dq, bias):
    B, Hq, Sq, Dk = q.shape
    P = pk.shape[2]
    kernel_causal = causal and Sq > 1
    if P + k.shape[2] == 0:
        grads.add(slice(None), slice(None), torch.zeros_like(q) if need_dq else None, torch.zeros_like(k),
                  torch.zeros_like(v))
        return
    if P == 0:
        mask = concat_mask(pad, bias, 0, 0, q)
        dq, dk, dv = engine.backward(do, q, k, v, out, L, mask, kernel_causal, scale, softcap, need_dq, True)
        grads.add(slice(None), slice(None), dq, dk, dv)
        return
    kc, vc = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
    mask = concat_mask(pad, bias, P, P if kernel_causal else 0, q)
    if kernel_causal:
        # the P rows in front: zero dO, so they add nothing; L = +inf makes their P_ij exactly 0
        zeros = q.new_zeros(B, Hq, P, Dk)
        qc, oc = torch.cat([zeros, q], 2), torch.cat([out.new_zeros(B, Hq, P, out.shape[-1]), out], 2)
        doc = torch.cat([do.new_zeros(B, Hq, P, do.shape[-1]), do], 2)
        Lc = torch.cat([L.new_full((B, Hq, P), float("inf")), L], 2)
        dq, dkc, dvc = engine.backward(doc, qc, kc, vc, oc, Lc, mask, True, scale, softcap, need_dq, True)
        dq = dq[:, :, P:] if dq is not None else None
    else:
        dq, dkc, dvc = engine.backward(do, q, kc, vc, out, L, mask, False, scale, softcap, need_dq, True)
    grads.add(slice(None), slice(None), dq, dkc[:, :, P:], dvc[:, :, P:])
    grads.add_prefix(dkc[:, :, :P], dvc[:, :, :P])
