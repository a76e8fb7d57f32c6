"""Results files: the JSON (the record of truth), a markdown report, PNG figures, a compact table.

JSON schema::

    {"device": str, "torch": str, "triton": str | None, "cuda": str | None, "date": "YYYY-MM-DD",
     "cpu_only": bool, ... other environment fields ...,
     "suite_errors": {suite: "Error: message"}   (only when a whole suite failed),
     "conventions": {...how FLOPs and memory are counted...},
     "records": [{"suite": "micro" | "train" | "bank" | "cartridge", "provider": str, "mode": str,
                  "B": int, "H": int, "Hkv": int, "S": int, "P": int, "D": int, "dtype": str,
                  "ms": float | None, "tflops": float | None, "peak_mem_mb": float | None,
                  "status": "ok" | "skipped" | "error" | "oom", "reason": str | None, ...}]}

``ms`` is None exactly when ``status`` is not "ok". Speed-ups are only ever computed between
records of the same file (same run, same device).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from .env import slug

REQUIRED = {"provider": str, "mode": str, "B": int, "H": int, "Hkv": int, "S": int, "P": int, "D": int,
            "dtype": str}
NUMERIC_OR_NONE = ("ms", "tflops", "peak_mem_mb")
STATUSES = ("ok", "skipped", "error", "oom")
CONVENTIONS = {
    "ms": "median over repeats (triton.testing.do_bench: CUDA events, L2 flushed, warm-up first)",
    "flops": "fwd = 4*D*(Sq*P + visible causal pairs) per (row, head); bwd = 2.5x fwd; fwd_bwd = 3.5x fwd;"
             " layer0 bwd = 2.5x the prefix part only",
    "peak_mem_mb": "max_memory_allocated during one call minus memory_allocated before it (inputs,"
                   " and the retained graph for mode bwd, not counted); train: peak over the steps,"
                   " everything included; null = not measured (CPU runs)",
    "baselines": "providers compute the same function from the same tensors; rel_err is against"
                 " prefixattn's output in the same run",
}
PROVIDER_ORDER = ("prefixattn", "prefixattn_atomic", "concat_sdpa_mask", "concat_sdpa_causal", "concat_flex",
                  "concat_flex_compiled", "eager", "prefixattn_bank", "sequential", "concat_gather",
                  "peft_sdpa", "peft_eager")
SHORT = {"prefixattn": "ours", "prefixattn_atomic": "ours_atomic", "concat_sdpa_mask": "sdpa_mask",
         "concat_sdpa_causal": "sdpa_causal",
         "concat_flex": "flex", "concat_flex_compiled": "flex_c", "eager": "eager", "prefixattn_bank": "bank",
         "sequential": "sequential",
         "concat_gather": "gather", "peft_sdpa": "peft_sdpa", "peft_eager": "peft_eager",
         "prefixattn_patch": "ours"}


def validate(doc: dict[str, Any]) -> None:
    """Raise ValueError if ``doc`` does not follow the schema above."""
    for key in ("device", "torch", "triton", "cuda", "records"):
        if key not in doc:
            raise ValueError(f"results JSON lacks {key!r}")
    if not isinstance(doc["records"], list):
        raise ValueError("records must be a list")
    for i, r in enumerate(doc["records"]):
        for key, typ in REQUIRED.items():
            if not isinstance(r.get(key), typ) or isinstance(r.get(key), bool):
                raise ValueError(f"record {i}: {key!r} must be {typ.__name__}, got {r.get(key)!r}")
        for key in NUMERIC_OR_NONE:
            if key not in r or not (r[key] is None or isinstance(r[key], (int, float))):
                raise ValueError(f"record {i}: {key!r} must be a number or null, got {r.get(key)!r}")
        if (r["ms"] is None) != (r.get("status", "ok") != "ok"):
            raise ValueError(f"record {i}: ms is {r['ms']!r} but status is {r.get('status')!r}")
        if r.get("status", "ok") not in STATUSES:
            raise ValueError(f"record {i}: status must be one of {STATUSES}, got {r.get('status')!r}")
        if r.get("suite") == "bank" and (not isinstance(r.get("N"), int) or isinstance(r.get("N"), bool)):
            raise ValueError(f"record {i}: a bank record needs the bank size 'N' (int), got {r.get('N')!r}")


def stem(env: dict[str, Any]) -> str:
    return f"{slug(env['device'])}-{env['date']}"


def write_all(env: dict[str, Any], records: list[dict[str, Any]], out_dir: Path,
              figures: bool = True) -> list[Path]:
    """Write <stem>.json, <stem>.md and (unless ``figures`` is False) the figures into out_dir;
    return the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {**env, "conventions": CONVENTIONS, "records": records}
    validate(doc)
    base = out_dir / stem(env)
    paths = [base.with_suffix(".json"), base.with_suffix(".md")]
    paths[0].write_text(json.dumps(doc, indent=1, default=str) + "\n")
    paths[1].write_text(markdown(doc))
    if not figures:
        return paths
    try:
        from .plots import plot_all
    except ImportError:  # matplotlib missing: the JSON and markdown are the results
        return paths
    return paths + plot_all(doc, base)


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------


def _providers(recs: list[dict[str, Any]]) -> list[str]:
    seen = {r["provider"] for r in recs}
    return [p for p in PROVIDER_ORDER if p in seen] + sorted(seen - set(PROVIDER_ORDER))


def shape_label(r: dict[str, Any]) -> str:
    dt = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(r["dtype"], r["dtype"])
    sq = f" Sq={r['Sq']}" if r.get("Sq") not in (None, r["S"]) else ""
    n = f" N={r['N']}" if r.get("N") else ""
    return f"B={r['B']} H={r['H']}/{r['Hkv']} S={r['S']}{sq} P={r['P']} D={r['D']}{n} {dt}"


def _grouped(recs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """mode -> shape label -> provider -> record (insertion order kept)."""
    g: dict[str, dict[str, dict[str, dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
    for r in recs:
        g[r["mode"]][shape_label(r)][r["provider"]] = r
    return g


def _cell(r: dict[str, Any] | None, tflops: bool = True) -> str:
    if r is None:
        return ""
    if r["ms"] is None:
        return {"oom": "OOM", "skipped": "skip", "error": "error"}.get(r.get("status", ""), "-")
    if tflops and r.get("tflops") is not None:
        return f"{r['ms']:.3f} ({r['tflops']:.0f})" if r["tflops"] >= 1 else f"{r['ms']:.3f}"
    return f"{r['ms']:.3f}"


def speedups(row: dict[str, dict[str, Any]], ours: str, peft: str) -> tuple[float | None, float | None]:
    """(ours vs the PEFT-style baseline, ours vs the fastest other provider) from one run's records."""
    o = row.get(ours)
    if o is None or o["ms"] is None:
        return None, None
    b = row.get(peft)
    vs_peft = b["ms"] / o["ms"] if b is not None and b["ms"] is not None else None
    others = [r["ms"] for p, r in row.items() if p != ours and r["ms"] is not None]
    vs_best = min(others) / o["ms"] if others else None
    return vs_peft, vs_best


def _x(v: float | None) -> str:
    return f"{v:.2f}x" if v is not None else "-"


def micro_tables(recs: list[dict[str, Any]], *, ours: str = "prefixattn", peft: str = "concat_sdpa_mask",
                 tflops: bool = True) -> str:
    lines = []
    provs = _providers(recs)
    for mode, rows in _grouped(recs).items():
        lines.append(f"\n### {mode}\n")
        unit = "ms (TFLOP/s)" if tflops else "ms"
        lines.append("| shape | " + " | ".join(provs) + f" | {ours} vs {peft} | vs fastest other |")
        lines.append("|---|" + "---|" * (len(provs) + 2))
        for label, row in rows.items():
            vp, vb = speedups(row, ours, peft)
            cells = [_cell(row.get(p), tflops) for p in provs]
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {_x(vp)} | {_x(vb)} |")
        lines.append(f"\n(unit: {unit})")
    return "\n".join(lines)


def memory_table(recs: list[dict[str, Any]], mode: str) -> str:
    rows = _grouped(recs).get(mode, {})
    provs = _providers(recs)
    if not any(r.get("peak_mem_mb") is not None for row in rows.values() for r in row.values()):
        return f"\n### peak memory, {mode}\n\nnot measured (only measured on CUDA devices)"
    lines = [f"\n### peak memory, {mode} (MiB above the inputs)\n",
             "| shape | " + " | ".join(provs) + " |", "|---|" + "---|" * len(provs)]
    for label, row in rows.items():
        cells = []
        for p in provs:
            r = row.get(p)
            cells.append("" if r is None or r.get("peak_mem_mb") is None else f"{r['peak_mem_mb']:.0f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def train_table(recs: list[dict[str, Any]]) -> str:
    lines = ["| provider | model | batch x seq | P | step ms | tokens/s | peak MiB | vs peft_sdpa | loss0 "
             "| logits rel err | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    ref = {(r.get("model"), r["B"], r["S"]): r for r in recs if r["provider"] == "peft_sdpa"}
    for r in recs:
        base = ref.get((r.get("model"), r["B"], r["S"]))
        vs = base["ms"] / r["ms"] if base and base["ms"] and r["ms"] else None
        ms = f"{r['ms']:.1f}" if r["ms"] is not None else "-"
        tps = f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "-"
        mem = f"{r['peak_mem_mb']:.0f}" if r.get("peak_mem_mb") is not None else "-"
        status = r.get("status", "ok") + (f": {r['reason']}" if r.get("reason") else "")
        if r.get("agree") is False:
            status += " (DISAGREES)"
        loss0 = f"{r['loss0']:.4f}" if r.get("loss0") is not None else "-"
        err = f"{r['logits0_rel_err']:.1e}" if r.get("logits0_rel_err") is not None else "-"
        lines.append(f"| {r['provider']} | {r.get('model', '')} | {r['B']}x{r['S']} | {r['P']} | {ms} "
                     f"| {tps} | {mem} | {_x(vs)} | {loss0} | {err} | {status} |")
    return "\n".join(lines)


def packed_table(recs: list[dict[str, Any]]) -> str:
    lines = ["| provider | layout | model | docs | real / padded tokens | P | step ms | tokens/s (real) "
             "| peak MiB | vs peft_sdpa_padded | loss0 | loss rel err | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = next((r for r in recs if r["provider"] == "peft_sdpa_padded"), None)
    for r in recs:
        vs = base["ms"] / r["ms"] if base and base["ms"] and r["ms"] else None
        ms = f"{r['ms']:.1f}" if r["ms"] is not None else "-"
        tps = f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "-"
        mem = f"{r['peak_mem_mb']:.0f}" if r.get("peak_mem_mb") is not None else "-"
        status = r.get("status", "ok") + (f": {r['reason']}" if r.get("reason") else "")
        loss0 = f"{r['loss0']:.4f}" if r.get("loss0") is not None else "-"
        err = f"{r['loss0_rel_err']:.1e}" if r.get("loss0_rel_err") is not None else "-"
        lines.append(f"| {r['provider']} | {r.get('layout', '')} | {r.get('model', '')} | {r['B']} "
                     f"| {r.get('tokens')} / {r.get('padded_tokens')} | {r['P']} | {ms} | {tps} | {mem} "
                     f"| {_x(vs)} | {loss0} | {err} | {status} |")
    return "\n".join(lines)


def skips(recs: list[dict[str, Any]]) -> str:
    seen: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in recs:
        if r.get("status", "ok") != "ok":
            seen[(r["provider"], str(r.get("reason")))].append(f"{shape_label(r)} {r['mode']}")
    if not seen:
        return "none"
    out = []
    for (p, reason), where in seen.items():
        more = f" (+{len(where) - 3} more)" if len(where) > 3 else ""
        out.append(f"- **{p}**: {reason} — {'; '.join(where[:3])}{more}")
    return "\n".join(out)


def accuracy(recs: list[dict[str, Any]]) -> str:
    worst: dict[str, tuple[float, float]] = {}
    for r in recs:
        if r.get("rel_err") is None:
            continue
        e, g = worst.get(r["provider"], (0.0, 0.0))
        worst[r["provider"]] = (max(e, r["rel_err"]), max(g, r.get("rel_err_grad") or 0.0))
    lines = ["| provider | max rel err (out) | max rel err (grads) |", "|---|---|---|"]
    lines += [f"| {p} | {e:.2e} | {g:.2e} |" for p, (e, g) in worst.items()]
    return "\n".join(lines)


def markdown(doc: dict[str, Any]) -> str:
    recs = doc["records"]
    head = [f"# prefixattn benchmarks: {doc['device']}, {doc['date']}", "",
            f"torch {doc['torch']}, triton {doc['triton']}, CUDA {doc['cuda']}, "
            f"transformers {doc.get('transformers')}, peft {doc.get('peft')}", ""]
    if doc.get("cpu_only"):
        head += ["**CPU run: these numbers only show the harness works. They are not kernel speed.**", ""]
    for suite, err in doc.get("suite_errors", {}).items():
        head += [f"**Suite {suite} failed and has no records: {err}**", ""]
    head += ["Conventions: " + "; ".join(f"{k}: {v}" for k, v in doc.get("conventions", {}).items()), ""]
    parts = ["\n".join(head)]
    micro = [r for r in recs if r.get("suite", "micro") == "micro"]
    if micro:
        parts += ["## Attention microbenchmarks", micro_tables(micro), memory_table(micro, "fwd_bwd"),
                  "\n### agreement with prefixattn (same inputs)\n", accuracy(micro)]
    train = [r for r in recs if r.get("suite") == "train" and r["mode"] != "train_step_packed"]
    if train:
        parts += ["\n## Training step (one prefix-tuning job, three ways)\n", train_table(train)]
    packed = [r for r in recs if r.get("suite") == "train" and r["mode"] == "train_step_packed"]
    if packed:
        parts += ["\n## Packed training step (a mixed-length batch: padding-free vs padded)\n",
                  packed_table(packed)]
    cartridge = [r for r in recs if r.get("suite") == "cartridge"]
    if cartridge:
        parts += ["\n## Cartridges: long prefixes (P >> S)\n",
                  "prefixattn against the concatenated cache + masked SDPA (PEFT's CARTRIDGE path) and the"
                  " concatenated cache + FlexAttention block mask (Cartridges' trainer), same inputs.",
                  micro_tables(cartridge), memory_table(cartridge, "fwd_bwd"),
                  "\n### agreement with prefixattn\n", accuracy(cartridge)]
    bank = [r for r in recs if r.get("suite") == "bank"]
    if bank:
        parts += ["\n## Mixed-task batch: a bank of prefixes\n",
                  "One call over the bank (prefixattn_bank) against one call per task (sequential) and"
                  " gathering each row's prefix + masked SDPA (concat_gather, the PEFT-style path).",
                  micro_tables(bank, ours="prefixattn_bank", peft="concat_gather"),
                  memory_table(bank, "fwd_bwd"),
                  "\n### agreement with prefixattn_bank\n", accuracy(bank)]
    parts += ["\n## Skipped or failed\n", skips(recs), ""]
    return "\n".join(parts)


def compact(doc: dict[str, Any]) -> str:
    """A short plain-text summary for a terminal (ms, and ours vs the PEFT-style baseline)."""
    recs = doc["records"]
    out = [f"== {doc['device']} {doc['date']} torch {doc['torch']} triton {doc['triton']}"
           + ("  [CPU: NOT KERNEL SPEED]" if doc.get("cpu_only") else "")]
    suites = (("micro", "prefixattn", "concat_sdpa_mask"), ("cartridge", "prefixattn", "concat_sdpa_mask"),
              ("bank", "prefixattn_bank", "concat_gather"))
    for suite, ours, peft in suites:
        rs = [r for r in recs if r.get("suite", "micro") == suite]
        if not rs:
            continue
        provs = _providers(rs)
        for mode, rows in _grouped(rs).items():
            out.append(f"-- {suite} {mode} (ms; x = {SHORT.get(peft, peft)} / ours)")
            out.append(f"{'shape':<40}" + "".join(f"{SHORT.get(p, p):>12}" for p in provs) + f"{'x':>7}")
            for label, row in rows.items():
                vp, _ = speedups(row, ours, peft)
                cells = "".join(f"{_cell(row.get(p), tflops=False):>12}" for p in provs)
                out.append(f"{label[:40]:<40}{cells}{(f'{vp:.2f}' if vp else '-'):>7}")
    train = [r for r in recs if r.get("suite") == "train"]
    if train:
        out.append("-- train_step")
        for r in train:
            ms = f"{r['ms']:.1f} ms" if r["ms"] is not None else r.get("status", "-")
            tps = f"{r['tokens_per_s']:.0f} tok/s" if r.get("tokens_per_s") else ""
            mem = f"{r['peak_mem_mb']:.0f} MiB" if r.get("peak_mem_mb") is not None else ""
            out.append(f"{r['provider']:<18}{r.get('model', ''):<24} {r['B']}x{r['S']:<6} {ms:>12} {tps:>16} "
                       f"{mem:>10}")
    return "\n".join(out)
