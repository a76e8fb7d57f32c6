"""FLOP counts for prefix attention, the same for every provider (useful work, not work done).

Convention (the FlashAttention papers'): per (batch row, query head) the forward pass does two
matmuls over every visible (query, key) pair, 2 * D multiply-adds each:

    fwd = 4 * D * (Sq * P + visible causal pairs)

Every query sees all P prefix slots; sequence key j is visible to query i when j <= i + Sk - Sq
(causal aligned to the bottom right), so for Sq = Sk = S there are S (S + 1) / 2 causal pairs
(not S^2 / 2 and not S^2), and a decode step (Sq = 1) sees all Sk keys.

The backward pass recomputes the scores and does four more matmuls (dV, dP, dQ, dK): it counts as
2.5 x fwd, so fwd_bwd = 3.5 x fwd. In layer 0 of a frozen model only the prefix needs a gradient:
its backward counts only the prefix pairs, 2.5 x 4 * D * Sq * P.
"""

from __future__ import annotations

BWD_FACTOR = 2.5


def causal_pairs(sq: int, sk: int, causal: bool = True) -> int:
    """Number of (i, j) sequence pairs visible under bottom-right causal masking."""
    if not causal:
        return sq * sk
    off = sk - sq
    total = 0
    # query i sees keys 0..min(sk - 1, i + off): count = clamp(i + off + 1, 0, sk)
    # closed form over the ranges where the clamp is linear
    first_full = max(0, sk - off - 1)  # from this i on, all sk keys are visible
    lo = max(0, -off)  # before this i, nothing is visible
    hi = min(sq, first_full)
    if hi > lo:
        n = hi - lo
        a = lo + off + 1
        total += n * a + n * (n - 1) // 2
    total += max(0, sq - max(first_full, lo)) * sk
    return total


def attention_flops(
    mode: str, *, B: int, H: int, Sq: int, Sk: int, P: int, D: int, causal: bool = True
) -> float:
    """FLOPs of one call in the given mode (fwd, infer, bwd, fwd_bwd, layer0_bwd, layer0_fwd_bwd)."""
    pairs = Sq * P + causal_pairs(Sq, Sk, causal)
    fwd = 4.0 * D * pairs * B * H
    prefix_bwd = BWD_FACTOR * 4.0 * D * Sq * P * B * H
    table = {
        "fwd": fwd,
        "infer": fwd,
        "bwd": BWD_FACTOR * fwd,
        "fwd_bwd": (1 + BWD_FACTOR) * fwd,
        "layer0_bwd": prefix_bwd,
        "layer0_fwd_bwd": fwd + prefix_bwd,
    }
    if mode not in table:
        raise ValueError(f"unknown mode {mode!r}; choose one of {sorted(table)}")
    return table[mode]
