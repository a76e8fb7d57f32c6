"""PNG figures: time and TFLOP/s against S (one line per provider, one row per mode), and bars for
the training-step and prefix-bank benchmarks. Few files: the remote GPU runner returns only a few."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .report import PROVIDER_ORDER, shape_label  # noqa: E402


def _title(doc: dict[str, Any]) -> str:
    cpu = "  [CPU run: not kernel speed]" if doc.get("cpu_only") else ""
    return f"{doc['device']}, {doc['date']}, torch {doc['torch']}{cpu}"


def sweep_records(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Microbenchmark records of the S sweep (the base shape at every S); on CPU, every shape."""
    recs = [r for r in doc["records"] if r.get("suite", "micro") == "micro"]
    sweep = [r for r in recs if r.get("tag") == "S sweep"]
    return sweep or [r for r in recs if r.get("Sq") == r["S"]]


def plot_micro(doc: dict[str, Any], path: Path) -> Path | None:
    recs = sweep_records(doc)
    modes = list(dict.fromkeys(r["mode"] for r in recs))
    if not modes:
        return None
    fig, axes = plt.subplots(len(modes), 2, figsize=(11, 3.2 * len(modes)), squeeze=False)
    for row, mode in enumerate(modes):
        by_p: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in recs:
            if r["mode"] == mode and r["ms"] is not None:
                by_p[r["provider"]].append(r)
        for p in [p for p in PROVIDER_ORDER if p in by_p]:
            pts = sorted(by_p[p], key=lambda r: r["S"])
            style = dict(marker="o", lw=2.5 if p == "prefixattn" else 1.2)
            axes[row][0].plot([r["S"] for r in pts], [r["ms"] for r in pts], label=p, **style)
            axes[row][1].plot([r["S"] for r in pts], [r["tflops"] for r in pts], label=p, **style)
        shape = shape_label(recs[0]).split(" S=")[0]
        for col, (ylabel, logy) in enumerate((("ms", True), ("TFLOP/s", False))):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            if logy:
                ax.set_yscale("log")
            ax.set_xlabel("S (= Sq = Sk)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{mode}: {ylabel}  ({shape})", fontsize=9)
            ax.grid(alpha=0.3)
        axes[row][0].legend(fontsize=7)
    fig.suptitle(_title(doc), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_e2e(doc: dict[str, Any], path: Path) -> Path | None:
    train = [r for r in doc["records"] if r.get("suite") == "train"]
    bank = [r for r in doc["records"] if r.get("suite") == "bank" and r["ms"] is not None]
    panels = (2 if train else 0) + (1 if bank else 0)
    if not panels:
        return None
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
    axes = list(axes[0])
    if train:
        ax_t, ax_m = axes.pop(0), axes.pop(0)
        labels = [f"{r['provider']}\n{r['B']}x{r['S']}" for r in train]
        ax_t.bar(labels, [r.get("tokens_per_s") or 0 for r in train], color="tab:blue")
        ax_t.set_ylabel("tokens/s")
        ax_t.set_title(f"training step: {train[0].get('model', '')}", fontsize=9)
        if any(r.get("peak_mem_mb") is not None for r in train):
            ax_m.bar(labels, [r.get("peak_mem_mb") or 0 for r in train], color="tab:orange")
        else:  # CPU: not measured; no zero bars that could be read as a measurement
            ax_m.text(0.5, 0.5, "peak memory not measured\n(CUDA only)", ha="center", va="center",
                      transform=ax_m.transAxes)
            ax_m.set_xticks([])
            ax_m.set_yticks([])
        ax_m.set_ylabel("peak MiB")
        ax_m.set_title("training step: peak memory", fontsize=9)
        for ax in (ax_t, ax_m):
            ax.tick_params(axis="x", labelsize=7)
    if bank:
        ax = axes.pop(0)
        groups = list(dict.fromkeys(f"{r['mode']} S={r['S']} N={r.get('N')}" for r in bank))
        provs = [p for p in PROVIDER_ORDER if any(r["provider"] == p for r in bank)]
        width = 0.8 / max(1, len(provs))
        for i, p in enumerate(provs):
            vals = []
            for g in groups:
                hit = [r["ms"] for r in bank if r["provider"] == p and
                       f"{r['mode']} S={r['S']} N={r.get('N')}" == g]
                vals.append(hit[0] if hit else 0)
            ax.bar([j + i * width for j in range(len(groups))], vals, width, label=p)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], groups, fontsize=7, rotation=20)
        ax.set_ylabel("ms")
        ax.set_title("mixed-task batch (prefix bank)", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(_title(doc), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(doc: dict[str, Any], base: Path) -> list[Path]:
    out = [plot_micro(doc, base.with_name(base.name + "-micro.png")),
           plot_e2e(doc, base.with_name(base.name + "-e2e.png"))]
    return [p for p in out if p is not None]
