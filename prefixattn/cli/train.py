"""``prefixattn train``: prefix-tune a causal LM, an encoder-decoder or a sequence classifier on
transformers' Trainer (the kinds of ``--model``: ``kinds.py``; a classifier's head trains with the
prefix, as PEFT's modules_to_save, and is saved with it).

One process by default; under ``torchrun --nproc-per-node N`` or ``accelerate launch`` the same
command is N data-parallel processes (gloo on CPU, NCCL on GPU), and ``--fsdp`` / ``--deepspeed`` go
to the Trainer. ``--batch-size`` is per process, as in the Trainer.

Default job (no download, runs anywhere in seconds): a tiny Llama-style model built from a config
with seeded weights, a byte-level tokenizer, and the built-in successor task (``cli/data.py``). Or a
local HF model directory (``--model``) and a JSONL dataset (``--data``).

Output directory::

    OUT/base_model/            the embedded base model and tokenizer (absent with --model)
    OUT/checkpoint-N/          the Trainer's checkpoint (prefix-only model.safetensors, optimizer and
                               RNG states as safetensors, scheduler.json, trainer_state.json: no
                               pickle) + adapter/ (PEFT format) + prefixattn.json (written last:
                               the checkpoint is complete)
    OUT/adapter/               the final prefix as a PEFT prefix-tuning adapter, a CARTRIDGE adapter with
                               --cartridge (prefixattn.save_peft; not for latent attention, which PEFT
                               cannot run)
    OUT/prefix.safetensors     the final trainable prefix (prefixattn.save_prefix)
    OUT/run.json               the run's settings and summary (eval loss/accuracy, tokens/s)
    OUT/loss.png               train and eval loss against step
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

import prefixattn
from prefixattn.hf.patcher import attention_dropout
from prefixattn.prefix import find_prefix

from . import data as D
from . import kinds
from .callbacks import CadenceFromArguments, ProgressCallback
from .config import TrainConfig
from .model import DTYPES, build_base_model, check_model_dir, check_tokenizer_source
from .outputs import give_normal_modes, write_json_atomic
from .plot import plot_losses
from .processes import barrier, world
from .resume import PATHS, absolute, settings_for_resume
from .trainer import (
    PrefixTrainer,
    argmax_logits,
    latest_complete,
    read_marker,
    remove_incomplete,
    remove_run_outputs,
    save_peft_if_possible,
    token_accuracy,
)

# what a run writes into OUT (and all that --overwrite deletes), besides checkpoint-N directories
# (loss.tmp.png: the plot's temporary name in runs of versions before the plot went through atomic_write)
OUTPUTS = ("base_model", "adapter", "prefix.safetensors", "run.json", "loss.png", "loss.tmp.png", "runs")
SCHEDULES = ("constant", "linear", "cosine")
EVAL_EXAMPLES = 64  # held-out examples of the built-in task


def check_config(cfg: TrainConfig) -> None:
    """Every setting of a run, before anything loads (a ValueError naming the option)."""
    for name in ("steps", "batch_size", "grad_accum", "prefix_tokens", "eval_every", "save_every",
                 "keep_checkpoints", "seq_len", "max_len"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ValueError(f"--lr must be a positive number, got {cfg.lr}")
    if cfg.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {cfg.warmup}")
    if cfg.lr_schedule not in SCHEDULES:
        raise ValueError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}, got {cfg.lr_schedule!r}")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    if cfg.bf16 and cfg.fp16:
        raise ValueError("--bf16 and --fp16 contradict each other")
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume and --overwrite contradict each other")
    if cfg.backend not in ("auto", "triton", "torch"):
        raise ValueError(f"--backend must be auto, triton or torch, got {cfg.backend!r}")
    if cfg.device not in (None, "cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {cfg.device!r} (a process's GPU is "
                         f"chosen by torchrun / accelerate through LOCAL_RANK)")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is available")
    if cfg.backend == "triton" and on_cpu(cfg) and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("--backend triton needs a CUDA GPU (or TRITON_INTERPRET=1, Triton's slow "
                         "interpreter); on a CPU use --backend torch, which --backend auto picks")
    if cfg.fp16 and on_cpu(cfg):
        raise ValueError("--fp16 needs a CUDA GPU: on a CPU the Trainer (accelerate) skips fp16 autocast "
                         "and would train in fp32 while calling it fp16; use --bf16 for mixed precision "
                         "on a CPU")
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise ValueError(f"--out {cfg.out}: a file, not a directory")
    if cfg.model is not None:
        check_model_dir(cfg.model)
    check_tokenizer_source(cfg.model, cfg.tokenizer)
    if cfg.model is not None:
        kind = kinds.model_kind(cfg.model)
        kinds.check_options(kind, cfg.data, cfg.packing)
        if cfg.cartridge and kind != "causal":
            raise ValueError(f"--cartridge trains a causal LM's cartridge; {cfg.model} is "
                             f"{kinds.DESCRIBED[kind]}")
    if cfg.data is not None and Path(cfg.data).is_dir():
        raise ValueError(f"--data {cfg.data}: a directory; --data takes a JSONL file")
    if cfg.data is not None and not Path(cfg.data).is_file():
        raise ValueError(f"--data {cfg.data}: no such file")
    _check_prefix_kind(cfg)
    report_to(cfg.report_to)
    for name in ("fsdp_config", "deepspeed"):
        value = getattr(cfg, name)
        if value is not None and not value.lstrip().startswith("{") and not Path(value).is_file():
            raise ValueError(f"--{name.replace('_', '-')} {value}: no such file")


def _check_prefix_kind(cfg: TrainConfig) -> None:
    if cfg.frozen_tokens is not None and not cfg.cartridge:
        raise ValueError("--frozen-tokens is a cartridge option: add --cartridge")
    if cfg.frozen_tokens is not None and not 0 <= cfg.frozen_tokens < cfg.prefix_tokens:
        raise ValueError(f"--frozen-tokens must be in [0, --prefix-tokens {cfg.prefix_tokens} - 1] (at "
                         f"least one token trains), got {cfg.frozen_tokens}")
    if cfg.prefix_projection and (cfg.cartridge or cfg.init_text):
        other = "--cartridge" if cfg.cartridge else "--init-text"
        raise ValueError(f"--prefix-projection cannot be combined with {other}: the MLP's output cannot "
                         "be set to given keys and values (and a cartridge holds them directly)")
    if cfg.init_text is not None and not cfg.resume and not Path(cfg.init_text).is_file():
        raise ValueError(f"--init-text {cfg.init_text}: no such file")


def report_to(choice: str) -> list[str]:
    """``auto``: TensorBoard when it is installed, else nothing; ``none``; or a comma-separated list of the
    Trainer's integrations, each checked to be installed (the Trainer would raise a bare RuntimeError from
    its callback's constructor)."""
    from transformers.integrations import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

    installed = set(get_available_reporting_integrations())
    if choice == "auto":
        return ["tensorboard"] if "tensorboard" in installed else []
    names = [] if choice == "none" else [s.strip() for s in choice.split(",") if s.strip()]
    if names == ["all"]:
        return sorted(installed)
    for name in names:
        if name not in INTEGRATION_TO_CALLBACK:
            raise ValueError(f"--report-to {name}: not one of the Trainer's integrations (auto, none, all, "
                             f"or {', '.join(sorted(INTEGRATION_TO_CALLBACK))})")
        # flyte is the one integration get_available_reporting_integrations does not list
        if name not in installed and name != "flyte":
            raise ValueError(f"--report-to {name}: its package is not installed here; install it, or pass "
                             f"--report-to none")
    return names


def build_datasets(cfg: TrainConfig, tokenizer: Any, global_batch: int,
                   encode: Any = None) -> tuple[Any, Any, str]:
    """(train, eval, description); every example is checked before training starts. ``encode``: how a
    JSONL line becomes an example (``kinds.line_encoder``)."""
    if cfg.data is not None:
        train, evals = D.read_jsonl(cfg.data, tokenizer, cfg.max_len, encode)
        return train, evals, f"{cfg.data}: {len(train)} train / {len(evals)} eval examples"
    size = cfg.steps * global_batch
    train = D.SuccessorTask(tokenizer, size=size, seed=cfg.seed, seq_len=cfg.seq_len)
    evals = D.SuccessorTask(tokenizer, size=EVAL_EXAMPLES, seed=cfg.seed, seq_len=cfg.seq_len, split="eval")
    return train, evals, train.describe()


def checkpoint_to_resume(cfg: TrainConfig, out: Path) -> Path | None:
    """Check OUT against --resume / --overwrite (nothing written); returns the checkpoint to resume from."""
    done = latest_complete(out)
    if done is not None and not (cfg.resume or cfg.overwrite):
        raise ValueError(f"{out} already holds a checkpoint ({done.name}): pass --resume to continue it "
                         f"or --overwrite to start again")
    if cfg.resume and done is None:
        raise ValueError(f"--resume: no complete checkpoint in {out}")
    if cfg.resume and read_marker(done)["step"] > cfg.steps:
        raise ValueError(f"--resume: the checkpoint is already at step {read_marker(done)['step']}, past "
                         f"--steps {cfg.steps}; pass a larger --steps to train further")
    return done if cfg.resume else None


def prepare_out(cfg: TrainConfig, out: Path, main: bool) -> None:
    """Make OUT ready for the run (once everything has been checked): --overwrite deletes what a previous
    run wrote, --resume what a killed run left half-written."""
    if main:
        if cfg.overwrite and out.exists():
            remove_run_outputs(out, OUTPUTS)
        elif cfg.resume:
            remove_incomplete(out)  # what a killed run left half-written
        out.mkdir(parents=True, exist_ok=True)


def check_attention_dropout(model: Any, cfg: TrainConfig) -> None:
    """Refuse, before any evaluation or step, a model whose attention dropout the fused attention would
    refuse at the first training step (patch() found it: the model was loaded in eval mode)."""
    dropout = attention_dropout(model)
    if dropout and not cfg.ignore_attention_dropout:
        raise ValueError(f"--model {cfg.model} has attention dropout {dropout} in training, which "
                         "prefixattn's fused attention does not implement: pass --ignore-attention-dropout "
                         "to train without it (or set the attention dropout in its config.json to 0)")


def check_packing(model: Any) -> None:
    """--packing needs a patcher that keeps the documents of a packed row apart (position_ids restarting
    per document); refuse, rather than train on documents that see each other, when it does not: the
    logits of a document inside a packed row must be those of the document alone."""
    vocab = model.config.vocab_size
    first, second = torch.arange(5) % (vocab - 3) + 3, (torch.arange(4) + 7) % (vocab - 3) + 3
    device = next(model.parameters()).device
    row = torch.cat([first, second])[None].to(device)
    positions = torch.cat([torch.arange(5), torch.arange(4)])[None].to(device)
    with torch.no_grad():
        packed = model(input_ids=row, position_ids=positions).logits[0, 5:]
        alone = model(input_ids=second[None].to(device)).logits[0]
    tol = 1e-3 if packed.dtype == torch.float32 else 3e-2
    if not torch.allclose(packed.float(), alone.float(), rtol=tol, atol=tol):
        raise ValueError("--packing: this version of prefixattn's patcher does not keep the documents of a "
                         "packed row apart (position_ids restarting per document); train without --packing")


def run_settings(cfg: TrainConfig) -> dict[str, Any]:
    """What a checkpoint records of its run (and --resume takes back); paths absolute."""
    _, size = world()
    paths = {name: absolute(getattr(cfg, name)) for name in PATHS}
    global_batch = cfg.batch_size * size * cfg.grad_accum
    return {**asdict(cfg), **paths, "world_size": size, "global_batch": global_batch}


def on_cpu(cfg: TrainConfig) -> bool:
    """--device, or its default: cuda if available, else cpu."""
    return cfg.device == "cpu" or (cfg.device is None and not torch.cuda.is_available())


def checked_training_arguments(**kwargs: Any) -> Any:
    """TrainingArguments(**kwargs), after checking that this transformers has every field (a clear error
    instead of the dataclass's TypeError when a release renames one)."""
    import dataclasses

    import transformers
    from transformers import TrainingArguments

    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    missing = sorted(set(kwargs) - known)
    if missing:
        raise ValueError(f"transformers {transformers.__version__}: TrainingArguments has no "
                         f"{', '.join(missing)}, which prefixattn train needs; install another transformers")
    return TrainingArguments(**kwargs)


def checkpointing_field() -> str:
    """The TrainingArguments field that turns on activation (gradient) checkpointing: transformers 5.24
    renamed ``gradient_checkpointing`` to ``activation_checkpointing`` (the old name a deprecated alias,
    ``FutureWarning``), releases before have only the old name. Found by the fields, not the version."""
    import dataclasses

    from transformers import TrainingArguments

    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in known else "gradient_checkpointing"


def training_arguments(cfg: TrainConfig, out: Path, resuming: bool) -> Any:
    kwargs: dict[str, Any] = {checkpointing_field(): cfg.gradient_checkpointing}
    if cfg.fsdp:
        kwargs["fsdp"] = cfg.fsdp
        if cfg.fsdp_config:
            kwargs["fsdp_config"] = cfg.fsdp_config
    if cfg.deepspeed:
        kwargs["deepspeed"] = cfg.deepspeed
    return checked_training_arguments(
        output_dir=str(out),
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_schedule if cfg.warmup == 0 or cfg.lr_schedule != "constant"
        else "constant_with_warmup",
        warmup_steps=cfg.warmup,
        weight_decay=cfg.weight_decay,
        bf16=cfg.bf16,
        fp16=cfg.fp16,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=cfg.eval_every,
        eval_on_start=not resuming,
        save_strategy="steps",
        save_steps=cfg.save_every,
        save_total_limit=None,  # PrefixTrainer rotates, after a newer checkpoint is complete
        seed=cfg.seed,
        data_seed=cfg.seed,
        # the Trainer runs on a GPU unless told otherwise, and refuses --bf16 without one
        use_cpu=on_cpu(cfg),
        report_to=report_to(cfg.report_to),
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=not on_cpu(cfg),
        include_num_input_tokens_seen="all" if cfg.packing else "non_padding",
        ddp_find_unused_parameters=False,
        label_names=["labels"],
        **kwargs,
    )


def prefix_init(cfg: TrainConfig, train_ds: Any, tokenizer: Any,
                resuming: bool) -> tuple[dict[str, Any], str]:
    """``patch`` arguments that set the prefix's initial values, and how the run's first line says it:
    --init-text FILE; for a --cartridge on the built-in task, the task's corpus; else random. A resumed
    run's prefix comes from its checkpoint."""
    if resuming:
        return {}, ""
    if cfg.init_text is not None:
        try:
            text = Path(cfg.init_text).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"--init-text {cfg.init_text}: not UTF-8 text ({e.reason})") from None
        source = cfg.init_text
    elif cfg.cartridge and cfg.data is None:
        text, source = train_ds.corpus(), "the built-in task's corpus"
    else:
        return {}, ""
    if not tokenizer(text, add_special_tokens=False)["input_ids"]:
        raise ValueError(f"--init-text {cfg.init_text}: the text has no tokens")
    return {"init": "text", "init_text": text, "tokenizer": tokenizer}, f"initialised from {source}, "


def frozen_note(model: Any) -> str:
    config = find_prefix(model).config
    return f"{config.num_frozen_tokens} frozen, " if config.cartridge else ""


def sharding(trainer: Any) -> str:
    """How the Trainer shards the model, as the run reports it (empty for plain data parallelism)."""
    if getattr(trainer, "is_fsdp_enabled", False):
        version = getattr(trainer.accelerator.state.fsdp_plugin, "fsdp_version", 1)
        return f" (FSDP{version})"
    if getattr(trainer, "is_deepspeed_enabled", False):
        return " (DeepSpeed)"
    return ""


def finished_outputs(out: Path, step: int) -> dict[str, Any] | None:
    """The summary of a run whose outputs were all written at ``step`` (run.json is written last), or None."""
    try:
        doc = json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        return None
    summary = doc.get("summary") if isinstance(doc, dict) else None
    return summary if isinstance(summary, dict) and summary.get("step") == step else None


def finished_run(model: Any, checkpoint: Path) -> list[dict[str, Any]]:
    """A complete run's final checkpoint, without training: its prefix (and head) loaded into ``model``;
    returns its log history."""
    from transformers import TrainerState

    if not (checkpoint / "prefix.safetensors").is_file():  # (a checkpoint in DeepSpeed's or FSDP's format)
        raise ValueError(f"--resume: the run is complete, its outputs are missing and {checkpoint} holds no "
                         "prefix.safetensors to write them from")
    prefixattn.load_prefix(model, checkpoint / "prefix.safetensors")
    return TrainerState.load_from_json(str(checkpoint / "trainer_state.json")).log_history


def train(cfg: TrainConfig, log: Any = print, given: set[str] | None = None) -> dict[str, Any]:
    """Run (or resume) a training job; returns a summary. Raises ValueError on bad settings or data,
    before any training step. ``given``: the options the command line set; with ``--resume`` the others
    come from the run's checkpoint (None: the fields that differ from TrainConfig's defaults)."""
    from transformers import PrinterCallback, set_seed
    from transformers import ProgressCallback as HFProgressCallback
    from transformers.utils import logging as hf_logging

    rank, size = world()
    if cfg.resume and not cfg.overwrite:
        done = latest_complete(Path(cfg.out))
        if done is None:
            raise ValueError(f"--resume: no complete checkpoint in {cfg.out}")
        cfg = settings_for_resume(cfg, read_marker(done), given, str(done), size)
    check_config(cfg)
    # everything random before the Trainer seeds (the prefix's initial values, a model's load) follows
    # --seed too: without this, runs with --model differed from the first evaluation on
    set_seed(cfg.seed)
    main = rank == 0
    say = log if main else (lambda *a, **k: None)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # save_pretrained's shard bars would interleave with ours
    out = Path(cfg.out)
    global_batch = cfg.batch_size * size * cfg.grad_accum

    kind = kinds.model_kind(cfg.model)
    base, tokenizer = build_base_model(cfg.model, cfg.dtype, cfg.seed, kinds.AUTO_CLASS[kind], cfg.tokenizer)
    train_ds, eval_ds, described = build_datasets(cfg, tokenizer, global_batch,
                                                  kinds.line_encoder(kind, base))
    resume_from = checkpoint_to_resume(cfg, out)
    # the demo's base model as it is before patching (saved below: a patched model saves its prefix)
    demo_base = copy.deepcopy(base) if cfg.model is None and main else None
    init, init_note = prefix_init(cfg, train_ds, tokenizer, resuming=resume_from is not None)
    model = prefixattn.patch(base, num_prefix_tokens=cfg.prefix_tokens,
                             prefix_projection=cfg.prefix_projection, backend=cfg.backend,
                             ignore_attention_dropout=cfg.ignore_attention_dropout,
                             cartridge=cfg.cartridge, num_frozen_tokens=cfg.frozen_tokens, **init)
    check_attention_dropout(model, cfg)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if cfg.packing:
        check_packing(model)
    # every check passed: only now is OUT touched
    prepare_out(cfg, out, main)
    if demo_base is not None and not (out / "base_model" / "config.json").is_file():
        # OUT is self-contained: PEFT can load OUT/adapter onto OUT/base_model
        demo_base.save_pretrained(out / "base_model")
        tokenizer.save_pretrained(out / "base_model")
        give_normal_modes(out / "base_model")
    del demo_base

    args = training_arguments(cfg, out, resuming=resume_from is not None)
    progress = ProgressCallback()
    trainer = PrefixTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=(D.collator(cfg.packing, tokenizer.pad_token_id) if kind == "causal"
                       else kinds.EncoderCollator(tokenizer.pad_token_id)),
        processing_class=tokenizer,
        compute_metrics=kinds.metric(kind, token_accuracy),
        preprocess_logits_for_metrics=argmax_logits,
        run_info=run_settings(cfg),
        keep_checkpoints=cfg.keep_checkpoints,
    )
    for cb in (PrinterCallback, HFProgressCallback):
        trainer.remove_callback(cb)
    trainer.add_callback(progress)
    trainer.add_callback(CadenceFromArguments())

    prefix_kind = "cartridge" if cfg.cartridge else "prefix"
    say(f"{described}\nmodel: {type(base).__name__} ({cfg.model or 'embedded tiny Llama'}; "
        f"{kinds.DESCRIBED[kind]}), {cfg.dtype}"
        f"{', bf16 autocast' if cfg.bf16 else ', fp16 autocast' if cfg.fp16 else ''}, on {args.device}"
        f"{f' x {size} processes' if size > 1 else ''}{sharding(trainer)}; "
        f"{prefix_kind}: P={cfg.prefix_tokens}, {frozen_note(model)}{init_note}"
        f"{n_params} trainable parameters; batch {cfg.batch_size} per process x {size} x {cfg.grad_accum} "
        f"accumulation = {global_batch}{', packed rows' if cfg.packing else ''}"
        f"{', gradient checkpointing' if cfg.gradient_checkpointing else ''}")
    if cfg.fsdp and not getattr(trainer, "is_fsdp_enabled", False):
        say(f"note: the Trainer did not enable FSDP ({cfg.fsdp!r}) on {args.device}: it runs as plain data "
            f"parallelism (FSDP through the Trainer needs GPUs)")
    at = read_marker(resume_from)["step"] if resume_from is not None else 0
    complete = resume_from is not None and at >= cfg.steps
    if resume_from is not None:
        say(f"resuming from {resume_from} (step {at})" + (
            f": the run is complete (--steps {cfg.steps}), nothing to train (a larger --steps trains "
            f"further)" if complete else ""))
    written = finished_outputs(out, at) if complete else None
    if written is not None:  # the run's outputs stay as they are
        say(f"its outputs are in {out}")
        return written
    if complete:  # killed after its last checkpoint, before its outputs: they are written from it
        # not the Trainer: resumed at max_steps it still ran a step on data whose epochs do not divide
        # the steps (JSONL), changing the prefix of a finished run
        history = finished_run(model, resume_from)
        step = at
    else:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        history, step = trainer.state.log_history, trainer.state.global_step

    evals = [r for r in history if "eval_loss" in r]
    summary: dict[str, Any] = {
        "out": str(out),
        "step": step,
        "eval_loss_start": evals[0]["eval_loss"] if evals else None,
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "eval_accuracy_start": evals[0].get("eval_accuracy") if evals else None,
        "eval_accuracy": evals[-1].get("eval_accuracy") if evals else None,
        "tokens_per_s": progress.run_tokens_per_s,
        "train_tokens": progress.run_tokens,
        "train_seconds": progress.run_seconds,
        "tokens_per_s_is": "the whole run's (a resumed run's: since its checkpoint): train_tokens (real "
                           "input tokens, every process) / train_seconds (wall time of the training loop, "
                           "less evaluation and checkpoints)",
        "world_size": size,
    }
    if main:
        unwrapped = trainer.model
        no_adapter = save_peft_if_possible(unwrapped, out / "adapter")
        prefixattn.save_prefix(unwrapped, out / "prefix.safetensors")
        plot = plot_losses(history, out / "loss.png") if cfg.plot else None
        summary["plot"] = str(plot) if plot else None
        write_json_atomic(out / "run.json", {"settings": run_settings(cfg), "summary": summary,
                                             "log_history": history})
        give_normal_modes(out / "adapter", out / "prefix.safetensors")  # outputs.py
        rate = summary["tokens_per_s"]
        if evals:
            say(f"done: eval loss {summary['eval_loss_start']:.4f} -> {summary['eval_loss']:.4f}, accuracy "
                f"{summary['eval_accuracy_start']:.1%} -> {summary['eval_accuracy']:.1%}"
                + (f", {rate:.0f} tokens/s over the run" if rate else ""))
        adapter = (f"no PEFT adapter ({'; '.join(no_adapter)})" if no_adapter
                   else f"adapter (PEFT format): {out / 'adapter'}")
        say(f"{adapter}; prefix: {out / 'prefix.safetensors'}" + (f"; loss curve: {plot}" if plot else ""))
    with contextlib.suppress(Exception):  # the Trainer leaves the process group to the caller
        barrier()
    return summary
