"""Shared memory of a launch on sm_90, counted tile by tile (host side only: no @triton.jit here, so
changing the model does not change any kernel's cache key).

``python -m bench compile`` holds the model against the compiler's figure for every pinned config
(tests/bench/test_compile.py: never below it, at most 15% + 4 KiB above; on the full table 0 to 1 KiB above); the launchers use it to
pick the pinned configs and to prune the autotune lists (kernels/common.py smem_fits, smem_prune).
"""

from __future__ import annotations


def dot_family(facts=None) -> str:
    """How a device's dots use shared memory: "wgmma" (Hopper, and the CPU, which plans as an H100),
    "tcgen05" (Blackwell datacenter, sm_100), "mma" (mma.sync: Ampere, Ada, consumer Blackwell
    sm_120), "cdna3" (MI300X, gfx942: the pipeliner prefetches into registers, stages - 1 LDS
    buffers), "cdna4" (MI355X, gfx950: direct-to-LDS async copies, stages buffers)."""
    if facts is None:
        return "wgmma"
    if facts.gfx:
        return "cdna4" if facts.gfx == "gfx950" else "cdna3"
    major = facts.capability[0]
    if major in (10, 11):
        return "tcgen05"
    if 0 < major < 9 or major >= 12:
        return "mma"
    return "wgmma"


def uses_wgmma(rows: int, num_warps: int, elsize: int, precision: str, family: str = "wgmma") -> bool:
    """Whether triton lowers a dot whose A operand has `rows` rows to an MMA that reads its operands
    from shared memory asynchronously (Hopper's wgmma; Blackwell's tcgen05): half inputs or TF32, at
    least 64 rows (one warpgroup's M) and whole warpgroups of warps."""
    return family in ("wgmma", "tcgen05") and rows >= 64 and num_warps % 4 == 0 and (elsize == 2 or precision == "tf32")


def smem_bytes(kernel: str, meta: dict, num_warps: int, num_stages: int, elsize: int, precision: str,
               facts=None) -> int:
    """Shared memory a launch of `kernel` (fwd, dq, dkdv) needs on sm_90 (on `facts`' GPU when given:
    dot_family), counting every tile; the compile check (tests/bench/test_compile.py, and
    ``python -m bench compile --device ...`` for the other GPUs) holds it against the compiler's figure.

    Each loop keeps its resident tiles in shared memory and pipelines its streamed tiles: `stages`
    buffers when the dots go to wgmma (which reads shared memory asynchronously), `stages - 1`
    otherwise (mma.sync, FMA), plus the score tile that mma.sync and FMA dots pass through shared
    memory. The forward and dq stream BLOCK_P prefix keys before the sequence keys, the dk/dv
    kernel's prefix programs keep BLOCK_P slots resident; loops and branches run one after the
    other, so the larger counts. With ATOMIC_DQ the dk/dv kernel also converts its fp32 dq tile for
    the atomics (wgmma), or keeps k again for the mma.sync of the transposed dS tile. A score bias
    (HAS_BIAS, element size BIAS_ELSIZE) is one more streamed (rows, keys) tile: the forward and dq
    keep one buffer of it when it starts the dot's accumulator, stages - 1 when it is added after a
    softcap; the dk/dv kernel's transposed tile counts like its streamed operands (measured with
    triton 3.9 on the bias variants of ``python -m bench compile``). 1 KiB covers barriers and small
    scratch.

    Other families (triton 3.9, ``bench compile --set devices`` per device): tcgen05 (sm_100) as
    wgmma, plus a k tile (keys x BLOCK_DK) in dq and two transposed score tiles (resident x rows) in
    dk/dv, which its MMA reads from shared memory; cdna4 (gfx950) stages buffers (its async copies
    land in LDS) plus the score tile and 2 KiB of LDS padding; mma.sync as above; cdna3 (gfx942) as
    mma.sync, but the resident tiles only before the loop (the larger of the two counts: q, or k and v
    pass through LDS once, and the loop's buffers reuse it; the loop's figure was exact on gfx942)."""
    family = dot_family(facts)
    bm, bn, bp = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_P"]
    bdk, w = meta["BLOCK_DK"], meta["BLOCK_DK"] + meta["BLOCK_DV"]
    es = elsize
    keys = max(bn, bp)

    def buffers(rows: int) -> int:
        if family == "cdna4" or uses_wgmma(rows, num_warps, es, precision, family):
            return num_stages
        return max(num_stages - 1, 1)

    def score_tile(rows: int, cols: int) -> int:
        return 0 if uses_wgmma(rows, num_warps, es, precision, family) else rows * cols * es

    bias_es = (meta.get("BIAS_ELSIZE") or es) if meta.get("HAS_BIAS") else 0
    # tcgen05 keeps stages - 1 buffers of the bias with or without a softcap (measured: 16 KiB more than
    # one buffer at 128x32 and 128x64 w8 s3)
    bias_buffers = max(num_stages - 1, 1) if meta.get("SOFTCAP") or family == "tcgen05" else 1

    def loop(resident: int, streamed: int) -> int:
        # cdna3: the resident tiles pass through LDS once, before the loop, which reuses it
        return max(resident, streamed) if family == "cdna3" else resident + streamed

    if kernel == "fwd":
        need = loop(es * bm * bdk, es * buffers(bm) * keys * w + score_tile(bm, keys)
                    + bias_es * bias_buffers * bm * keys)
    elif kernel == "dq":
        need = loop(es * bm * w, es * buffers(bm) * keys * w + score_tile(bm, keys)
                    + bias_es * bias_buffers * bm * keys)
        if family == "tcgen05" and uses_wgmma(bm, num_warps, es, precision, family):
            need += es * keys * bdk
    elif kernel == "dkdv":
        def branch(resident: int) -> int:  # a key block (BLOCK_N) or a prefix block (BLOCK_P) program
            bias = bias_es * buffers(resident) * resident * bm
            tiles = loop(es * resident * w, es * buffers(resident) * bm * w + score_tile(resident, bm) + bias)
            if family == "tcgen05" and uses_wgmma(resident, num_warps, es, precision, family):
                tiles += 2 * es * resident * bm
                if w > 256:  # measured above D = 128: 24 KiB more at 256/256, 16 KiB at 192/128 (32x64 w8 s2)
                    tiles += 3 * es * bm * w // 4
            return tiles
        # layer 0 (only the prefix gradient): the key-block branch is compiled out; on tcgen05 not its
        # whole allocation (82240 B where the prefix branch counts 74752 at D = 128, 32x128 w8 s2), so
        # there the full kernel's count bounds it
        prefix_only = meta.get("DO_SEQUENCE") is False and family != "tcgen05"
        need = branch(bp) if prefix_only else max(branch(bn), branch(bp))
        if meta.get("ATOMIC_DQ"):
            if uses_wgmma(bm, num_warps, es, precision, family):
                need += bm * bdk * 4
            else:
                need += es * (keys * bdk + keys * bm)
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    return need + (3072 if family == "cdna4" else 1024)


def launch_smem_estimate(kernel: str, meta: dict, num_warps: int, num_stages: int, elsize: int, facts=None) -> int:
    """smem_bytes of a launch recorded by ``python -m bench compile`` (its constants as meta)."""
    return smem_bytes(kernel, meta, num_warps, num_stages, elsize, meta.get("DOT_PRECISION", "tf32"), facts)


__all__ = ["dot_family", "uses_wgmma", "smem_bytes", "launch_smem_estimate"]
