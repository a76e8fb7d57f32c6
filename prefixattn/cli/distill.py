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

Under torchrun / accelerate launch (N processes, gloo on CPU, NCCL on GPU): the self-study groups are
dealt over the processes and merged into one file, the one a single process writes; every process
prefills the teacher's context itself; training is the Trainer's data parallelism over the conversations
(``--batch-size`` per process, the loss averaged over the answer tokens of the whole global batch, so N x B
trains as 1 x NB); the held-out evaluation is split over the processes; process 0 writes the outputs.
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
from prefixattn.distill.records import IGNORE, collate, digest_ids, read_records, tokenizer_digest
from prefixattn.distill.selfstudy import (
    EndpointGenerator,
    SelfStudyConfig,
    generate_selfstudy,
    merge_shards,
    shard_files,
)
from prefixattn.distill.student import teacher_topk
from prefixattn.hf.context import check_context_ids

from .distill_args import FIXED_ON_RESUME, DistillConfig
from .model import build_base_model, byte_tokenizer, tiny_llama_config
from .outputs import give_normal_modes, write_json_atomic
from .processes import all_sum, barrier, leave_group, world
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
        teacher = None
        if self.context is not None:  # the live teacher reads the whole context's kept K/V now
            inputs = {k: v for k, v in inputs.items() if k not in ("topk_ids", "topk_logprobs")}
            # the model itself, not its DDP wrapper: a forward without gradients that DDP need not see
            teacher = teacher_topk(self.accelerator.unwrap_model(model), self.context, inputs, self.top_k)
        # the mean over the answer tokens of the whole global batch, not of this process's part: DDP then
        # averages the processes' gradients, hence the factor (N processes of B train exactly as 1 of NB)
        processes = self.accelerator.num_processes
        tokens = (inputs["labels"][:, 1:] != IGNORE).sum()
        if processes > 1:
            tokens = self.accelerator.reduce(tokens, reduction="sum")
        loss = student_loss(model, inputs, teacher=teacher, lm_weight=self.lm_weight,
                            num_items=tokens.clamp(min=1)) * processes
        return (loss, None) if return_outputs else loss


def _checkpoint_to_resume(cfg: DistillConfig, out: Path, processes: int) -> Path | None:
    """Check OUT against --resume / --overwrite and a resumed run's settings (nothing written)."""
    done = latest_complete(out)
    if done is not None and not (cfg.resume or cfg.overwrite):
        raise ValueError(f"{out} already holds a checkpoint ({done.name}): pass --resume to continue it or "
                         "--overwrite to start again")
    if cfg.resume and done is None:
        raise ValueError(f"--resume: no complete checkpoint in {out}")
    if not cfg.resume:
        return None
    marker = read_marker(done)
    settings = marker.get("distill", {})
    changed = [f"--{k.replace('_', '-')} ({settings[k]!r} in the run, {getattr(cfg, k)!r} now)"
               for k in FIXED_ON_RESUME if k in settings and settings[k] != _setting(cfg, k)]
    if changed:
        raise ValueError(f"--resume: options differ from the run's: {', '.join(changed)}")
    ran_on = marker.get("processes", 1)
    if ran_on != processes:
        raise ValueError(f"--resume: the run trained on {ran_on} process(es), this is {processes}: its "
                         f"global batch (--batch-size x processes) would change; resume it on {ran_on}")
    return done


def _prepare_out(cfg: DistillConfig, out: Path) -> None:
    """Make OUT ready (once everything has been checked; one process): --overwrite deletes what a
    previous run wrote, --resume what a killed run left half-written."""
    if cfg.overwrite and out.exists():
        remove_run_outputs(out, (*OUTPUTS, "runs"))
        for shard in shard_files(out / "selfstudy.jsonl"):
            shard.unlink()
    elif cfg.resume:
        remove_incomplete(out)
    out.mkdir(parents=True, exist_ok=True)


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
    """Run (or resume) ``prefixattn distill``; returns the report (the held-out figures on every process,
    the full report on process 0)."""
    from transformers import TrainingArguments, set_seed
    from transformers.utils import logging as hf_logging

    cfg.check()
    rank, size = world()
    main = rank == 0
    say = log if main else (lambda *a, **k: None)
    set_seed(cfg.seed)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # save_pretrained's shard bar would interleave with ours
    out = Path(cfg.out)
    t0 = time.monotonic()
    use_cpu = cfg.device == "cpu" or (cfg.device is None and not torch.cuda.is_available())
    # first: under torchrun the arguments start the process group, and name this process's device
    args = TrainingArguments(
        output_dir=str(out), max_steps=cfg.steps, per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.lr, lr_scheduler_type="constant", logging_steps=max(1, cfg.steps // 10),
        save_strategy="steps", save_steps=cfg.save_every, save_total_limit=None, seed=cfg.seed,
        data_seed=cfg.seed, use_cpu=use_cpu, report_to=[], disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0, dataloader_pin_memory=not use_cpu,
        ddp_find_unused_parameters=False, label_names=["labels"], eval_strategy="no")
    device = args.device
    base, tokenizer = build_base_model(cfg.model, "float32", cfg.seed) if cfg.model else demo_model(cfg.seed)
    base = base.to(device).eval()
    text, ids = read_context(cfg, tokenizer)
    if cfg.init == "context" and cfg.prefix_tokens > len(ids):
        raise ValueError(f"--prefix-tokens {cfg.prefix_tokens} exceeds the context's {len(ids)} tokens: a "
                         "student initialised from the context has at most its length (--init random for "
                         "more)")
    resume_from = _checkpoint_to_resume(cfg, out, size)
    if main:
        _prepare_out(cfg, out)
        if cfg.model is None and not (out / "base_model" / "config.json").is_file():
            base.save_pretrained(out / "base_model")
            tokenizer.save_pretrained(out / "base_model")
            give_normal_modes(out / "base_model")
    barrier()  # OUT is ready
    model = prefixattn.patch(base, num_prefix_tokens=cfg.prefix_tokens, cartridge=cfg.cartridge,
                             num_frozen_tokens=cfg.frozen_tokens, backend=cfg.backend)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    context_digest = digest_ids(ids)
    live = None
    if cfg.live_teacher:  # the whole context must fit the model's positions; every process keeps its K/V
        live = prefill_context(model, check_context_ids(model, ids))

    data = Path(cfg.data) if cfg.data else out / "selfstudy.jsonl"
    if cfg.data is None:
        _generate(cfg, model, tokenizer, ids, data, context_digest, say, rank, size)
    records = read_records(data, vocab=model.get_input_embeddings().weight.shape[0], context=context_digest,
                           tokenizer=tokenizer_digest(tokenizer))
    if cfg.generate_only:
        barrier()
        return {"data": str(data), "conversations": len(records)}
    held = max(1, round(len(records) * cfg.eval_fraction))
    if len(records) - held < 1:
        raise ValueError(f"{data}: {len(records)} conversations leave none to train on after holding out "
                         f"{held}")
    train_set, eval_set = records[:-held], records[-held:]
    say(f"context: {len(ids)} tokens ({', '.join(cfg.context) or 'the embedded demo text'}); "
        f"{len(train_set)} train / {held} held-out conversations from {data}; student: "
        f"{'cartridge' if cfg.cartridge else 'prefix'} of P={cfg.prefix_tokens}, init {cfg.init}; teacher: "
        f"{'the whole context, live' if live is not None else 'recorded top-k'} (k={cfg.top_k})"
        + (f"; {size} processes, batch {cfg.batch_size} each" if size > 1 else ""))

    def held_out(bare: bool = False) -> dict[str, float]:  # each process its share, summed
        return evaluate(model, eval_set[rank::size], pad, bare=bare, context=live, k=cfg.top_k,
                        reduce=(lambda v: all_sum(v, device)) if size > 1 else None)

    report: dict[str, Any] = {"eval": {}}
    if resume_from is None:
        if cfg.init == "context":
            init_prefix_from_context(model, prefill_context(model, ids[:cfg.prefix_tokens]))
        report["eval"]["none"] = held_out(bare=True)
        report["eval"]["initial"] = held_out()
        if main:
            write_json_atomic(out / "report.json", report)
    else:
        previous = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else {}
        report["eval"].update({k: v for k, v in previous.get("eval", {}).items() if k in ("none", "initial")})

    settings = {k: _setting(cfg, k) for k in FIXED_ON_RESUME}
    trainer = DistillTrainer(model=model, args=args, train_dataset=train_set,
                             data_collator=lambda batch: collate(batch, pad),
                             run_info={"distill": settings, "processes": size}, keep_checkpoints=2,
                             context=live, top_k=cfg.top_k, lm_weight=cfg.lm_weight)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    report["eval"]["trained"] = held_out()
    report.update({"settings": {**asdict(cfg), **settings}, "context_tokens": len(ids),
                   "train_conversations": len(train_set), "eval_conversations": held, "processes": size,
                   "seconds": round(time.monotonic() - t0, 1)})
    if main:
        _write_outputs(cfg, model, report, trainer.state.log_history, out, say)
    barrier()
    return report


def _generate(cfg: DistillConfig, model: Any, tokenizer: Any, ids: list[int], data: Path, digest: str,
              say: Any, rank: int, size: int) -> None:
    """Self-study conversations into ``data``: each process its share of the groups, then one file."""
    if rank == 0:
        merge_shards(data)  # what a killed run split over processes (any number of them) left
    barrier()
    generator = (EndpointGenerator(cfg.generator_url, tokenizer, cfg.generator_model)
                 if cfg.generator_url else None)
    generate_selfstudy(model, tokenizer, ids, data, SelfStudyConfig(
        conversations=cfg.conversations, chunk_tokens=cfg.chunk_tokens,
        question_tokens=cfg.question_tokens, answer_tokens=cfg.answer_tokens,
        temperature=cfg.temperature, top_k=cfg.top_k,
        batch_size=cfg.batch_size, seed=cfg.seed), generator=generator, context_digest=digest,
        log=say if size == 1 else None, progress=rank == 0, shard=(rank, size))
    barrier()
    if rank == 0 and size > 1:
        say(f"self-study: {merge_shards(data)} conversations from {size} processes merged into {data}")
    barrier()


def _write_outputs(cfg: DistillConfig, model: Any, report: dict[str, Any], history: list[dict[str, Any]],
                   out: Path, say: Any) -> None:
    no_adapter = save_peft_if_possible(model, out / "adapter")
    prefixattn.save_prefix(model, out / "prefix.safetensors")
    plot = _plot(report, history, out / "distill.png") if cfg.plot else None
    write_json_atomic(out / "report.json", report)
    give_normal_modes(out / "adapter", out / "prefix.safetensors")
    say("held-out (" + f"{report['eval']['trained']['tokens']} answer tokens): " + "; ".join(
        f"{name} KL {r['kl']:.3f}, greedy agreement {r['agreement']:.1%}"
        for name, r in report["eval"].items()))
    say(f"prefix: {out / 'prefix.safetensors'}; "
        + (f"no PEFT adapter ({'; '.join(no_adapter)})" if no_adapter else f"adapter: {out / 'adapter'}")
        + (f"; plot: {plot}" if plot else "") + f"; {report['seconds']:.0f} s")


def cmd_distill(args: argparse.Namespace) -> int:
    cfg = DistillConfig(**{f: getattr(args, f) for f in DistillConfig.__dataclass_fields__ if f != "plot"},
                        plot=not args.no_plot)
    try:
        distill(cfg)
    finally:
        leave_group()
    return 0
