"""The compile table of ``python -m bench compile``: what each launch needs on its GPU (sm_90 by
default), and the checks CI applies to it.

    smem        the compiler's shared memory (bytes) against the device's opt-in limit per block
    est         the launchers' own estimate for the config (kernels/smem.py); it must not be below smem
    regs        registers per thread (ptxas); 255 is the ceiling, spills go to local memory.
                AMD: VGPRs per lane (AGPRs included, in brackets), and SGPRs (the AMDGPU metadata)
    spill       spill stores / loads in bytes (ptxas). AMD: scratch bytes per lane / VGPRs spilled
    mma         wgmma (Hopper warpgroup MMA), tcgen05 (Blackwell), mma.sync (Ampere-style), mfma
                (AMD matrix cores), or fma (no tensor cores)
    serial      ptxas serialized the wgmma pipeline (usually for lack of registers)
    CTAs/SM     programs one SM holds at once, from registers, shared memory, threads
"""

from __future__ import annotations

from typing import Any

# Per-SM resources (CUDA occupancy calculator by compute capability; AMD CDNA per CU):
# (registers, shared memory per SM, max threads, max blocks per SM)
SM_RESOURCES = {
    80: (65536, 167936, 2048, 32),
    86: (65536, 102400, 1536, 16),
    89: (65536, 102400, 1536, 24),
    90: (65536, 233472, 2048, 32),
    100: (65536, 233472, 2048, 32),
    120: (65536, 102400, 1536, 32),
}
# Hopper's, the default
REGS_PER_SM, SMEM_PER_SM, MAX_THREADS_PER_SM, MAX_CTAS_PER_SM = SM_RESOURCES[90]
REG_UNIT = 256  # registers are allocated per warp in units of 256
SMEM_RESERVED_PER_CTA = 1024
# CDNA3/4: 4 SIMDs per CU, 512 VGPRs (arch + acc, granule 8) per lane per SIMD, 8 waves per SIMD
AMD_LDS_PER_CU = {"gfx942": 65536, "gfx950": 163840}


def ctas_per_sm(registers: int | None, shared: int, num_warps: int, facts=None,
                agprs: int | None = None) -> int | None:
    """Programs one SM (CU on AMD) holds at once, from registers, shared memory (LDS) and threads."""
    if registers is None:
        return None
    if facts is not None and facts.gfx:
        per_wave = -(-max(registers, 1) // 8) * 8  # vgpr_count includes the AGPRs
        waves = 4 * min(8, 512 // per_wave)
        by_lds = AMD_LDS_PER_CU.get(facts.gfx, facts.smem_per_block) // max(shared, 1)
        return max(0, min(waves // num_warps, by_lds))
    cap = 90 if facts is None else facts.capability[0] * 10 + facts.capability[1]
    regs_sm, smem_sm, threads_sm, ctas_sm = SM_RESOURCES.get(cap, SM_RESOURCES[90])
    per_warp = -(-max(registers, 1) * 32 // REG_UNIT) * REG_UNIT
    by_regs = (regs_sm // per_warp) // num_warps
    by_smem = smem_sm // (shared + SMEM_RESERVED_PER_CTA)
    by_threads = threads_sm // (32 * num_warps)
    return max(0, min(by_regs, by_smem, by_threads, ctas_sm))


def mma_kind(row: dict[str, Any]) -> str:
    if row.get("wgmma"):
        return "wgmma"
    if row.get("tcgen05"):
        return "tcgen05"
    if row.get("mfma"):
        return "mfma"
    if row.get("mma_sync"):
        return "mma.sync"
    return "fma" if row.get("fma") else "-"


def head_dims(row: dict[str, Any]) -> str:
    dk, dv = row.get("dk"), row.get("dv")
    return f"{dk}" if dk == dv else f"{dk}/{dv}"


def problems(row: dict[str, Any], limit: int) -> list[str]:
    """CI's rules for one launch: it compiles; a pinned (or fixed) config fits the device; no spills in
    a pinned bf16/fp16 config at head dims <= 128; the launchers' estimate is not below the compiler's
    figure (else they could pick a config that cannot launch)."""
    out = []
    if not row.get("ok"):
        return [f"compile failed: {row.get('error', '?')[:300]}"]
    pinned = row["kind"] in ("pinned", "fixed")
    if pinned and row["shared"] > limit:
        out.append(f"shared memory {row['shared']} B > device limit {limit} B")
    if (pinned and row.get("dtype") in ("bf16", "fp16") and max(row.get("dk") or 0, row.get("dv") or 0) <= 128
            and (row.get("spill_stores") or 0) > 0):
        out.append(f"spills {row['spill_stores']} B at D <= 128")
    est = row.get("estimate")
    if est is not None and row["kind"] != "pruned" and est < row["shared"]:
        out.append(f"estimate {est} B below the compiler's {row['shared']} B")
    return out


def _fmt_kib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024:.1f}"


def _cases(row: dict[str, Any], n: int = 3) -> str:
    cases = row.get("cases") or []
    shown = ", ".join(c.rsplit(":", 2)[0] for c in cases[:n])
    return shown + (f" +{len(cases) - n}" if len(cases) > n else "")


def _small(r: dict[str, Any]) -> bool:
    return r.get("dtype") in ("bf16", "fp16") and max(r.get("dk") or 0, r.get("dv") or 0) <= 128


def summary(rows: list[dict[str, Any]], limit: int) -> dict[str, int]:
    ok = [r for r in rows if r.get("ok")]
    pinned = [r for r in ok if r["kind"] in ("pinned", "fixed")]
    spill = [r for r in pinned if (r.get("spill_stores") or 0) > 0]
    return {
        "launches": len(rows), "compiled": len(ok), "failed": len(rows) - len(ok),
        "pinned over limit": sum(r["shared"] > limit for r in pinned),
        "pinned with spills": len(spill),
        "pinned bf16/fp16 D<=128 with spills": sum(map(_small, spill)),
        "wgmma serialized": sum(bool(r.get("wgmma_serialized")) for r in ok),
        "autotune kept over limit": sum(r["kind"] == "autotune" and r["shared"] > limit for r in ok),
        "pruned": sum(r["kind"] == "pruned" for r in rows),
    }


COLUMNS = ("kernel", "cases", "dtype", "D", "config", "smem KiB", "est KiB", "regs", "spill st/ld B", "mma",
           "serial", "CTAs/SM", "compile s")


def _row(r: dict[str, Any], limit: int) -> str:
    head = [r["short"], _cases(r), r.get("dtype", ""), head_dims(r), r["config"]]
    if not r.get("ok"):
        return "| " + " | ".join(head + [f"FAILED: {r.get('error', '')[:80]}"] + [""] * 7) + " |"
    flag = " **over**" if r["shared"] > limit else ""
    regs = str(r["registers"])
    if r.get("sgprs") is not None:  # AMD: VGPRs + AGPRs, SGPRs
        agprs = "" if r.get("agprs") is None else f" (a{r['agprs']})"
        regs = f"{r['registers']}{agprs} s{r['sgprs']}"
    cells = [f"{_fmt_kib(r['shared'])}{flag}", _fmt_kib(r.get("estimate")), regs,
             f"{r['spill_stores']}/{r['spill_loads']}", mma_kind(r), "yes" if r["wgmma_serialized"] else "",
             str(r.get("ctas_per_sm")), str(r["compile_s"])]
    return "| " + " | ".join(head + cells) + " |"


def table(rows: list[dict[str, Any]], limit: int, header: dict[str, Any]) -> str:
    """The markdown report: header, summary, checks, then one table per kind of launch."""
    h = header
    amd = h.get("backend") == "hip"
    arch = h.get("arch") if amd else f"sm_{h.get('arch')}"
    flag = f" --device {h['name']}" if h.get("name") else ""
    lines = [f"# Compile table: {h.get('device')} ({arch}), triton {h.get('triton')}", "",
             f"Generated by `python -m bench compile --set {h.get('set')}{flag}` on a machine without a GPU "
             f"({h.get('date')}; torch {h.get('torch')}, python {h.get('python')}). "
             f"{'LDS' if amd else 'Shared memory'} limit per block: {limit} B ({limit / 1024:.0f} KiB); "
             f"{h.get('sms', '?')} {'CUs' if amd else 'SMs'}, warp size {h.get('warp_size', 32)}. "
             + ("Every figure is the compiler's (triton's metadata, the AMDGPU metadata of the "
                "hsaco's assembly: regs = VGPRs, AGPRs included (aN when known), sSGPRs; spill = scratch "
                "bytes / VGPRs spilled)"
                if amd else "Every figure is the compiler's (ptxas -v, triton's metadata)")
             + "; `est` is the launchers' own estimate for the config (kernels/smem.py). "
             "Speed is not measured here.", ""]
    counts = summary(rows, limit)
    lines += ["## Summary", "", "| " + " | ".join(counts) + " |", "|" + "---|" * len(counts),
              "| " + " | ".join(str(v) for v in counts.values()) + " |", ""]
    bad = [(r, p) for r in rows for p in problems(r, limit)]
    lines += ["## Checks (what CI fails on)", ""]
    lines += [f"- {r['short']} {r['config']} {_cases(r)}: {p}" for r, p in bad] or ["- none"]
    lines.append("")
    order = {"fwd": 0, "combine_splits": 1, "delta": 2, "dq": 3, "dkdv": 4, "reduce_prefix": 5}

    def key(r: dict[str, Any]) -> tuple:
        return (order.get(r["short"], 9), r.get("variant", ""), r.get("mode", ""), r.get("dtype", ""),
                r.get("dk", 0), r.get("dv", 0), r["config"])

    groups = (("Pinned and fixed configs", ("pinned", "fixed")),
              ("Autotune candidates (kept by the prune)", ("autotune",)),
              ("Autotune candidates pruned before compiling", ("pruned",)))
    for title, kinds in groups:
        group = sorted((r for r in rows if r["kind"] in kinds), key=key)
        if group:
            lines += [f"## {title}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
            lines += [_row(r, limit) for r in group] + [""]
    return "\n".join(lines) + "\n"
