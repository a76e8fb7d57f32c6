"""``prefixattn distill``: distil a context into a prefix or a cartridge (Cartridges' self-study with
context distillation; ``prefixattn.distill``), on the Trainer machinery of ``prefixattn train``.

    1. the context (text files, or the embedded demo's text) is tokenized;
    2. self-study conversations about it are generated (in process over the chunks' kept K/V, or on
       ``--generator-url``) into OUT/selfstudy.jsonl, resumably; or ``--data`` gives them;
    3. the student (the frozen model with a P-token prefix, by default the context's first P tokens'
       keys and values) is trained on KL(teacher || student) over the answers, from the recorded top-k
       (or ``--live-teacher``: the teacher reads the whole context's kept K/V at every step);
    4. on held-out conversations: mean KL to the teacher and greedy agreement with its answers for no
       prefix, the initial prefix and the trained one (OUT/report.json, OUT/distill.png).

Output: OUT/prefix.safetensors, OUT/adapter (PEFT: PREFIX_TUNING, or CARTRIDGE with its frozen tokens
with --cartridge), OUT/checkpoint-N (atomic, ``--resume``), OUT/selfstudy.jsonl, OUT/report.json,
OUT/distill.png, OUT/base_model (the embedded model).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

import prefixattn
from prefixattn.distill import init_prefix_from_context, prefill_context, student_loss
from prefixattn.distill.evaluate import evaluate
from prefixattn.distill.records import collate, digest_ids, read_records, tokenizer_digest
from prefixattn.distill.selfstudy import EndpointGenerator, SelfStudyConfig, generate_selfstudy
from prefixattn.hf.context import check_context_ids

from .distill_args import FIXED_ON_RESUME, DistillConfig
from .model import build_base_model, byte_tokenizer, tiny_llama_config
from .outputs import give_normal_modes, write_json_atomic
from .trainer import (
    PrefixTrainer,
    latest_complete,
    read_marker,
    remove_incomplete,
    remove_run_outputs,
    save_peft_if_possible,
)

# the embedded demo's context: no download, a few hundred byte tokens
DEMO_CONTEXT = (
    "The Analytical Engine was a proposed mechanical general-purpose computer designed by Charles Babbage. "
    "It had an arithmetic logic unit called the mill, a memory called the store, and control flow with "
    "conditional branching and loops. Programs and data were given on punched cards, an idea taken from the "
    "Jacquard loom. In 1843 Ada Lovelace published notes on the engine, including a method to compute "
    "Bernoulli numbers, often called the first computer program."
)
OUTPUTS = ("base_model", "adapter", "prefix.safetensors", "report.json", "distill.png", "selfstudy.jsonl")


def demo_model(seed: int) -> tuple[Any, Any]:
    """The embedded model of ``prefixattn train`` (tiny Llama, byte tokenizer) with weights drawn twice as
    large (initializer range 0.3): its answers then depend on the context in front (held-out KL between
    the model with and without the demo context ~3.6 nats per token at 0.3, ~0.6 at train's 0.15), so
    there is something to distil."""
    from transformers import LlamaForCausalLM

    tokenizer = byte_tokenizer()
    config = tiny_llama_config(len(tokenizer))
    config.initializer_range = 0.3
    torch.manual_seed(seed)
    return LlamaForCausalLM(config), tokenizer


def read_context(cfg: DistillConfig, tokenizer: Any) -> tuple[str, list[int]]:
    """The context's text (files joined by blank lines, or the demo's) and its token ids."""
    if cfg.context:
        parts = []
        for path in cfg.context:
            try:
                parts.append(Path(path).read_text(encoding="utf-8"))
            except UnicodeDecodeError as e:
                raise ValueError(f"--context {path}: not UTF-8 text ({e.reason})") from None
        text = "\n\n".join(parts)
    else:
        text = DEMO_CONTEXT
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"--context {' '.join(cfg.context)}: the context is empty (no tokens)")
    return text, ids


class DistillTrainer(PrefixTrainer):
    """PrefixTrainer (atomic prefix-only checkpoints, resume without pickle) with the distillation loss."""

    def __init__(self, *args: Any, context: Any = None, top_k: int = 20, lm_weight: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.context, self.top_k, self.lm_weight = context, top_k, lm_weight

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if self.context is not None:  # the live teacher reads the whole context's kept K/V now
            inputs = {k: v for k, v in inputs.items() if k not in ("topk_ids", "topk_logprobs")}
        loss = student_loss(model, inputs, context=self.context, k=self.top_k, lm_weight=self.lm_weight)
        return (loss, None) if return_outputs else loss


def _prepare_out(cfg: DistillConfig, out: Path) -> Path | None:
    done = latest_complete(out)
    if done is not None and not (cfg.resume or cfg.overwrite):
        raise ValueError(f"{out} already holds a checkpoint ({done.name}): pass --resume to continue it or "
                         "--overwrite to start again")
    if cfg.resume and done is None:
        raise ValueError(f"--resume: no complete checkpoint in {out}")
    if cfg.overwrite and out.exists():
        remove_run_outputs(out, (*OUTPUTS, "runs"))
    elif cfg.resume:
        remove_incomplete(out)
        settings = read_marker(done).get("distill", {})
        changed = [f"--{k.replace('_', '-')} ({settings[k]!r} in the run, {getattr(cfg, k)!r} now)"
                   for k in FIXED_ON_RESUME if k in settings and settings[k] != _setting(cfg, k)]
        if changed:
            raise ValueError(f"--resume: options differ from the run's: {', '.join(changed)}")
    out.mkdir(parents=True, exist_ok=True)
    return done if cfg.resume else None


def _setting(cfg: DistillConfig, name: str) -> Any:
    value = getattr(cfg, name)
    if name in ("model", "data") and value is not None:
        return str(Path(value).resolve())
    if name == "context":
        return [str(Path(p).resolve()) for p in value]
    return value


def _plot(report: dict[str, Any], history: list[dict[str, Any]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    names = list(report["eval"])
    for ax, metric, title in ((axes[0], "kl", "held-out KL to the teacher"),
                              (axes[1], "agreement", "greedy agreement with the teacher")):
        values = [report["eval"][n][metric] for n in names]
        ax.bar(names, values, color=["#999", "#6a9", "#36c"][:len(names)])
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.3f}" if metric == "kl" else f"{v:.1%}", ha="center", va="bottom")
        ax.set_title(title)
    steps = [(r["step"], r["loss"]) for r in history if "loss" in r]
    if steps:
        axes[2].plot(*zip(*steps, strict=True), lw=1)
        axes[2].set_yscale("log")
    axes[2].set_xlabel("step")
    axes[2].set_title("training loss (KL)")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def distill(cfg: DistillConfig, log: Any = print) -> dict[str, Any]:
    """Run (or resume) ``prefixattn distill``; returns the report."""
    from transformers import TrainingArguments, set_seed
    from transformers.utils import logging as hf_logging

    cfg.check()
    set_seed(cfg.seed)
    hf_logging.set_verbosity_error()
    out = Path(cfg.out)
    t0 = time.monotonic()
    base, tokenizer = build_base_model(cfg.model, "float32", cfg.seed) if cfg.model else demo_model(cfg.seed)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    base = base.to(device).eval()
    text, ids = read_context(cfg, tokenizer)
    resume_from = _prepare_out(cfg, out)
    if cfg.model is None and not (out / "base_model" / "config.json").is_file():
        base.save_pretrained(out / "base_model")
        tokenizer.save_pretrained(out / "base_model")
        give_normal_modes(out / "base_model")
    model = prefixattn.patch(base, num_prefix_tokens=cfg.prefix_tokens, cartridge=cfg.cartridge,
                             num_frozen_tokens=cfg.frozen_tokens, backend=cfg.backend)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    context_digest = digest_ids(ids)
    live = None
    if cfg.live_teacher:  # the whole context must fit the model's positions
        live = prefill_context(model, check_context_ids(model, ids))
    if cfg.init == "context" and cfg.prefix_tokens > len(ids):
        raise ValueError(f"--prefix-tokens {cfg.prefix_tokens} exceeds the context's {len(ids)} tokens: a "
                         "student initialised from the context has at most its length (--init random for "
                         "more)")

    data = Path(cfg.data) if cfg.data else out / "selfstudy.jsonl"
    if cfg.data is None:
        generator = (EndpointGenerator(cfg.generator_url, tokenizer, cfg.generator_model)
                     if cfg.generator_url else None)
        generate_selfstudy(model, tokenizer, ids, data, SelfStudyConfig(
            conversations=cfg.conversations, chunk_tokens=cfg.chunk_tokens,
            question_tokens=cfg.question_tokens, answer_tokens=cfg.answer_tokens,
            temperature=cfg.temperature, top_k=cfg.top_k,
            batch_size=cfg.batch_size, seed=cfg.seed), generator=generator, context_digest=context_digest,
            log=log)
    records = read_records(data, vocab=model.get_input_embeddings().weight.shape[0], context=context_digest,
                           tokenizer=tokenizer_digest(tokenizer))
    if cfg.generate_only:
        return {"data": str(data), "conversations": len(records)}
    held = max(1, round(len(records) * cfg.eval_fraction))
    if len(records) - held < 1:
        raise ValueError(f"{data}: {len(records)} conversations leave none to train on after holding out "
                         f"{held}")
    train_set, eval_set = records[:-held], records[-held:]
    log(f"context: {len(ids)} tokens ({', '.join(cfg.context) or 'the embedded demo text'}); "
        f"{len(train_set)} train / {held} held-out conversations from {data}; student: "
        f"{'cartridge' if cfg.cartridge else 'prefix'} of P={cfg.prefix_tokens}, init {cfg.init}; teacher: "
        f"{'the whole context, live' if live is not None else 'recorded top-k'} (k={cfg.top_k})")

    report: dict[str, Any] = {"eval": {}}
    if resume_from is None:
        if cfg.init == "context":
            init_prefix_from_context(model, prefill_context(model, ids[:cfg.prefix_tokens]))
        report["eval"]["none"] = evaluate(model, eval_set, pad, bare=True, context=live, k=cfg.top_k)
        report["eval"]["initial"] = evaluate(model, eval_set, pad, context=live, k=cfg.top_k)
        write_json_atomic(out / "report.json", report)
    else:
        previous = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else {}
        report["eval"].update({k: v for k, v in previous.get("eval", {}).items() if k in ("none", "initial")})

    args = TrainingArguments(
        output_dir=str(out), max_steps=cfg.steps, per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.lr, lr_scheduler_type="constant", logging_steps=max(1, cfg.steps // 10),
        save_strategy="steps", save_steps=cfg.save_every, save_total_limit=None, seed=cfg.seed,
        data_seed=cfg.seed, use_cpu=device == "cpu", report_to=[], disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0, label_names=["labels"], eval_strategy="no")
    settings = {k: _setting(cfg, k) for k in FIXED_ON_RESUME}
    trainer = DistillTrainer(model=model, args=args, train_dataset=train_set,
                             data_collator=lambda batch: collate(batch, pad),
                             run_info={"distill": settings}, keep_checkpoints=2, context=live,
                             top_k=cfg.top_k, lm_weight=cfg.lm_weight)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    report["eval"]["trained"] = evaluate(model, eval_set, pad, context=live, k=cfg.top_k)
    report.update({"settings": {**asdict(cfg), **settings}, "context_tokens": len(ids),
                   "train_conversations": len(train_set), "eval_conversations": held,
                   "seconds": round(time.monotonic() - t0, 1)})
    no_adapter = save_peft_if_possible(model, out / "adapter")
    prefixattn.save_prefix(model, out / "prefix.safetensors")
    plot = _plot(report, trainer.state.log_history, out / "distill.png") if cfg.plot else None
    write_json_atomic(out / "report.json", report)
    give_normal_modes(out / "adapter", out / "prefix.safetensors")
    log("held-out (" + f"{report['eval']['trained']['tokens']} answer tokens): " + "; ".join(
        f"{name} KL {r['kl']:.3f}, greedy agreement {r['agreement']:.1%}"
        for name, r in report["eval"].items()))
    log(f"prefix: {out / 'prefix.safetensors'}; "
        + (f"no PEFT adapter ({'; '.join(no_adapter)})" if no_adapter else f"adapter: {out / 'adapter'}")
        + (f"; plot: {plot}" if plot else "") + f"; {report['seconds']:.0f} s")
    return report


def cmd_distill(args: argparse.Namespace) -> int:
    cfg = DistillConfig(**{f: getattr(args, f) for f in DistillConfig.__dataclass_fields__ if f != "plot"},
                        plot=not args.no_plot)
    distill(cfg)
    return 0
