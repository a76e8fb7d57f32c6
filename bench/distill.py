"""``python -m bench distill``: one context-distillation step with the teacher reading the context's kept
keys and values (``prefixattn.hf.context``: prefilled once, a frozen prefix of C tokens) against a
teacher that re-reads [context; conversation] every step (what a plain implementation does), in one run.

A step: the teacher's logits over the batch's conversations (no grad), then the student's forward,
backward and AdamW step (the frozen model with a trainable P-token prefix, loss KL(teacher || student)
from the teacher's top-20). Both providers run the same student step; only the teacher differs. The
teacher's outputs are compared before timing (the same logits, to fp32 rounding), so a provider that
computed something else would be an error, not a time.

Records: seconds per step (median), the step's peak memory (CUDA: max_memory_allocated; CPU: the
allocator's peak through torch.profiler, ``train_step.cpu_step_peak_mb``), and the ratio re-read / kept.
The issue's shapes are C = 2048 / 8192, S = 256 / 1024, P = 256 / 2048 (``--full``, GPU); the default on a
CPU is reduced (C = 512 / 2048, S = 64 / 256, P = 128, a 4-layer Llama of hidden 256) and says so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from .timing import time_ms
from .train_step import cpu_step_peak_mb

CPU_GRID = [(C, S, 128) for C in (512, 2048) for S in (64, 256)]
FULL_GRID = [(C, S, P) for C in (2048, 8192) for S in (256, 1024) for P in (256, 2048)]
QUICK_GRID = [(2048, 256, 256), (8192, 256, 256)]
DRY_GRID = [(32, 8, 4)]  # scripts/gpu_check.sh --dry-run: the pipeline, not a measurement


def build_model(device: torch.device, dtype: torch.dtype, big: bool) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000 if big else 4096, hidden_size=2048 if big else 256,
                         intermediate_size=5632 if big else 512, num_hidden_layers=8 if big else 4,
                         num_attention_heads=16 if big else 8, num_key_value_heads=8 if big else 4,
                         max_position_embeddings=16384, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def measure(model: Any, C: int, S: int, P: int, B: int, device: torch.device, rep_ms: float,
            backend: str = "auto") -> list[dict[str, Any]]:
    import prefixattn
    from prefixattn.distill import distill_loss, prefill_context, teacher_logits, topk_of

    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(C + S + P)
    context = torch.randint(3, vocab, (C,), generator=g)
    conv = torch.randint(3, vocab, (B, S), generator=g).to(device)
    student = prefixattn.patch(model, num_prefix_tokens=P, backend=backend)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    kept = prefill_context(student, context)
    full_ids = torch.cat([context.to(device).expand(B, -1), conv], 1)

    def teacher_kept() -> torch.Tensor:
        return teacher_logits(student, kept, conv)

    def teacher_reread() -> torch.Tensor:
        with torch.no_grad(), prefixattn.hf.context.running_bare(student):
            return student(input_ids=full_ids, use_cache=False).logits[:, C:]

    def step(teacher: Any) -> None:
        t = teacher()
        top = topk_of(t[:, :-1].reshape(-1, t.shape[-1]), 20)
        logits = student(input_ids=conv, use_cache=False).logits[:, :-1]
        loss = distill_loss(logits.reshape(-1, logits.shape[-1]), top)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    a, b = teacher_kept(), teacher_reread()
    err = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
    records = []
    base = {"C": C, "S": S, "P": P, "B": B, "teacher_rel_err": err}
    for provider, teacher in (("teacher_kept_kv", teacher_kept), ("teacher_rereads", teacher_reread)):
        ms = time_ms(lambda teacher=teacher: step(teacher), device, rep_ms=rep_ms)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            step(teacher)
            torch.cuda.synchronize(device)
            peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        else:
            peak = cpu_step_peak_mb(lambda teacher=teacher: step(teacher))
        records.append({**base, "provider": provider, "s_per_step": ms / 1e3, "peak_mem_mb": peak})
    prefixattn.unpatch(student)
    ratio = records[1]["s_per_step"] / records[0]["s_per_step"]
    for r in records:
        r["speedup_kept_vs_reread"] = ratio
    return records


def table(records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"# Context distillation step: teacher over kept K/V vs re-reading the context "
             f"({meta['device']}, {meta['date']})", "",
             f"torch {meta['torch']}, transformers {meta['transformers']}; model: {meta['model']}; "
             f"{meta['note']}", "",
             "| C | S | P | B | kept K/V s/step | re-read s/step | ratio | kept peak MiB | "
             "re-read peak MiB | teacher rel err |", "|---|---|---|---|---|---|---|---|---|---|"]
    for kept, reread in zip(records[::2], records[1::2], strict=True):
        def mb(x: Any) -> str:
            return "n/a" if x is None else f"{x:.0f}"
        lines.append(f"| {kept['C']} | {kept['S']} | {kept['P']} | {kept['B']} | {kept['s_per_step']:.4f} | "
                     f"{reread['s_per_step']:.4f} | {kept['speedup_kept_vs_reread']:.2f}x | "
                     f"{mb(kept['peak_mem_mb'])} | {mb(reread['peak_mem_mb'])} | "
                     f"{kept['teacher_rel_err']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import transformers

    ap = argparse.ArgumentParser(prog="python -m bench distill", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None)
    ap.add_argument("--grid", choices=("auto", "cpu", "quick", "full", "dry"), default="auto",
                    help="auto: full on a GPU, cpu (reduced shapes) on a CPU")
    ap.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rep-ms", type=float, default=500.0)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--json", default=None,
                    help="write the records to this file instead of OUT/<device>-distill-<date>")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    grid_name = args.grid if args.grid != "auto" else ("full" if device.type == "cuda" else "cpu")
    grid = {"cpu": CPU_GRID, "quick": QUICK_GRID, "full": FULL_GRID, "dry": DRY_GRID}[grid_name]
    big = device.type == "cuda"
    dtype = torch.bfloat16 if big else torch.float32
    model = build_model(device, dtype, big)
    records = []
    for C, S, P in grid:
        try:
            got = measure(model, C, S, P, args.batch, device, args.rep_ms, args.backend)
        except torch.OutOfMemoryError as e:
            got = [{"C": C, "S": S, "P": P, "B": args.batch, "provider": p, "error": f"OOM: {e}"[:200]}
                   for p in ("teacher_kept_kv", "teacher_rereads")]
        records += got
        if "s_per_step" in got[0]:
            print(f"C={C} S={S} P={P}: kept {got[0]['s_per_step']:.4f} s, re-read "
                  f"{got[1]['s_per_step']:.4f} s, {got[0]['speedup_kept_vs_reread']:.2f}x", flush=True)
    date = datetime.date.today().isoformat()
    meta = {"device": torch.cuda.get_device_name(device) if big else f"CPU ({platform.machine()}), "
            f"{torch.get_num_threads()} thread(s)", "date": date, "torch": torch.__version__,
            "transformers": transformers.__version__, "grid": grid_name,
            "model": "Llama, hidden 2048, 8 layers, 16/8 heads, bf16" if big else
            "Llama, hidden 256, 4 layers, 8/4 heads, vocab 4096, fp32",
            "note": "the issue's shapes" if grid_name == "full" else
            "REDUCED shapes for a CPU (the issue's: C = 2048/8192, S = 256/1024, P = 256/2048, on the GPU)"}
    doc = {"meta": meta, "records": records}
    ok = [r for r in records if "s_per_step" in r]
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))
    else:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"{'gpu' if big else 'cpu'}-distill-{date}"
        stem.with_suffix(".json").write_text(json.dumps(doc, indent=1))
        if ok:
            stem.with_suffix(".md").write_text(table(ok, meta))
        print(f"wrote {stem}.json" + (f" and {stem}.md" if ok else ""))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
