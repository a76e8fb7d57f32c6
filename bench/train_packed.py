"""Packed (padding-free) training-step benchmark: one realistic mixed-length batch, three ways.

The batch: documents with long-tailed (lognormal) lengths, as real fine-tuning data has: most are
short, a few are long. Ways to feed it:

- ``peft_sdpa_padded``: PEFT prefix tuning, the documents right-padded to the longest (what PEFT
  can do: it has no padding-free path), sdpa attention;
- ``prefixattn_padded``: ``prefixattn.patch`` of that model on the same padded batch;
- ``prefixattn_packed``: the patched model on one flattened row holding every document, with
  ``position_ids`` restarting at 0 per document (transformers' DataCollatorWithFlattening layout):
  no padding at all, and each document attends to the prefix and its own tokens only.

Before timing, each provider's loss on the batch (same prefix, restored from a snapshot) is checked
against ``peft_sdpa_padded``'s: the loss is a mean over the same label tokens in both layouts, so a
packed row whose documents leaked into each other would not agree. A provider that disagrees is
recorded as an error and not timed. ``tokens_per_s`` counts real tokens (the documents' lengths
summed), whatever the padding; ``peak_mem_mb`` is the peak allocated memory over the timed steps
(CUDA only). Records: suite ``train``, mode ``train_step_packed``, ``B`` the number of documents and
``S`` the longest (the padded width), plus ``tokens`` and ``lengths``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from .timing import free_memory, is_oom
from .train_step import CPU_MODEL, GPU_MODEL, ModelSpec, _measure, peft_prefix_model

PROVIDERS = ("peft_sdpa_padded", "prefixattn_padded", "prefixattn_packed")
# relative error of the loss (a mean over every label token) up to which a provider agrees
LOSS_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
IGNORE = -100


def doc_lengths(n: int, median: float, sigma: float, lo: int, hi: int, seed: int = 0) -> list[int]:
    """n lognormal lengths (median ``median``, log-space spread ``sigma``) clipped to [lo, hi]."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=g, dtype=torch.float64)
    return [int(x) for x in (torch.exp(z * sigma) * median).round().clamp(lo, hi)]


def make_batches(spec: ModelSpec, lengths: list[int], device: torch.device
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(padded, packed) batches of the same documents. Labels: every token but each document's first
    (whose prediction would cross a document boundary in the packed row)."""
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, spec.vocab, (n,), generator=g) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(docs), width, dtype=torch.long)
    mask = torch.zeros(len(docs), width, dtype=torch.long)
    labels = torch.full((len(docs), width), IGNORE, dtype=torch.long)
    for i, d in enumerate(docs):
        ids[i, : len(d)], mask[i, : len(d)], labels[i, : len(d)] = d, 1, d
    packed_labels = torch.cat([torch.cat([torch.tensor([IGNORE]), d[1:]]) for d in docs])
    padded = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    packed = {"input_ids": torch.cat(docs)[None], "labels": packed_labels[None],
              "position_ids": torch.cat([torch.arange(n) for n in lengths])[None]}
    return ({k: v.to(device) for k, v in padded.items()}, {k: v.to(device) for k, v in packed.items()})


def run_packed(spec: ModelSpec, lengths: list[int], P: int, device: torch.device, dtype: torch.dtype,
               backend: str, warmup: int, steps: int, log: Any = print) -> list[dict[str, Any]]:
    import prefixattn

    model, snapshot = peft_prefix_model(spec, P, device, dtype)
    padded, packed = make_batches(spec, lengths, device)
    tokens = sum(lengths)
    dt = str(dtype).removeprefix("torch.")
    tol = LOSS_TOL.get(dtype, 2e-2)
    records: list[dict[str, Any]] = []
    ref_loss: float | None = None
    patched = None
    with tempfile.TemporaryDirectory() as tmp:
        prefix_file = Path(tmp) / "prefix.safetensors"
        for provider in PROVIDERS:
            rec: dict[str, Any] = {
                "suite": "train", "provider": provider, "mode": "train_step_packed",
                "B": len(lengths), "H": spec.heads, "Hkv": spec.kv_heads, "S": max(lengths),
                "Sq": max(lengths), "Sk": max(lengths), "P": P, "D": spec.head_dim, "dtype": dt,
                "model": spec.name, "layers": spec.layers, "hidden": spec.hidden, "tokens": tokens,
                "padded_tokens": len(lengths) * max(lengths), "lengths": lengths,
                "layout": "packed" if provider.endswith("packed") else "padded",
                "ms": None, "tflops": None, "peak_mem_mb": None, "tokens_per_s": None, "loss0": None,
                "loss0_rel_err": None, "ref": None, "agree": None, "status": "ok", "reason": None,
            }
            records.append(rec)
            try:
                if provider == "peft_sdpa_padded":
                    model.prompt_encoder.load_state_dict(snapshot)
                    target, batch = model, padded
                else:
                    if patched is None:  # carries the PEFT prefix over; kept for both prefixattn layouts
                        model.prompt_encoder.load_state_dict(snapshot)
                        patched = prefixattn.patch(model, backend=backend)
                        prefixattn.save_prefix(patched, prefix_file)
                    prefixattn.load_prefix(patched, prefix_file)
                    target, batch = patched, packed if rec["layout"] == "packed" else padded
                with torch.no_grad():
                    loss0 = float(target(**batch).loss)
                if ref_loss is None:
                    ref_loss = loss0
                rec.update(loss0=loss0, ref="peft_sdpa_padded",
                           loss0_rel_err=abs(loss0 - ref_loss) / max(abs(ref_loss), 1e-30))
                rec["agree"] = bool(rec["loss0_rel_err"] <= tol)
                if not rec["agree"]:
                    rec.update(status="error",
                               reason=f"loss {loss0:.5g} disagrees with peft_sdpa_padded's {ref_loss:.5g} "
                                      f"(rel err {rec['loss0_rel_err']:.1e}): not timed")
                    log(f"{provider:>18} {len(lengths)} docs, {tokens} tokens: {rec['reason']}")
                    continue
                measured, _ = _measure(target, batch, device, warmup, steps)
                rec.update(ms=measured["ms"], peak_mem_mb=measured["peak_mem_mb"],
                           trainable_params=measured["trainable_params"])
                rec["tokens_per_s"] = tokens / (rec["ms"] * 1e-3)
                log(f"{provider:>18} {len(lengths)} docs, {tokens} tokens (padded {rec['padded_tokens']}): "
                    f"{rec['ms']:.1f} ms/step, {rec['tokens_per_s']:.0f} tokens/s, loss0 {loss0:.4f}"
                    + (f", peak {rec['peak_mem_mb']:.0f} MiB" if rec["peak_mem_mb"] is not None else ""))
            except Exception as e:
                rec.update(status="oom" if is_oom(e) else "error",
                           reason=f"{type(e).__name__}: {str(e)[:200]}", ms=None)
                log(f"{provider:>18}: {rec['status']} ({rec['reason']})")
            finally:
                free_memory(device)
    del model, patched
    free_memory(device)
    return records


def run_packed_bench(device: torch.device, *, quick: bool = False, backend: str = "auto",
                     log: Any = print) -> list[dict[str, Any]]:
    """The packed case for this device: a GPU batch of ~16k real tokens (median document 512, up to
    4096), or a tiny CPU one (labelled CPU numbers by run_all)."""
    if device.type == "cuda":
        spec, dtype, P = GPU_MODEL, torch.bfloat16, 64
        lengths = doc_lengths(16 if quick else 32, median=512, sigma=1.0, lo=32, hi=4096)
        warmup, steps = (2, 5) if quick else (3, 10)
    else:
        spec, dtype, P = CPU_MODEL, torch.float32, 8
        lengths = doc_lengths(6, median=10, sigma=0.8, lo=3, hi=40)
        warmup, steps = 1, 2
    median = sorted(lengths)[len(lengths) // 2]
    log(f"# packed training step: {spec.name}, P={P}, {dtype}, {len(lengths)} documents of lengths "
        f"{min(lengths)}..{max(lengths)} (median {median}), {sum(lengths)} tokens")
    return run_packed(spec, lengths, P, device, dtype, backend, warmup, steps, log)
