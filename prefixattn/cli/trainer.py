"""The Trainer of ``prefixattn train``: transformers' Trainer with atomic, prefix-only checkpoints.

What it adds to the Trainer:
- every checkpoint also holds the prefix as a PEFT adapter (``checkpoint-N/adapter``) where PEFT's format
  can hold it (not latent attention: ``save_peft_if_possible``);
- a checkpoint counts only once its marker ``checkpoint-N/prefixattn.json`` exists. The marker is
  written last (to a temporary name, then renamed), after every process has written its part, so a
  run killed at any moment (SIGKILL included) leaves either a complete checkpoint or one that resume
  ignores and deletes. The Trainer's own rotation is off; older complete checkpoints are removed only
  after a newer one is complete;
- datasets that say ``ordered = True`` (the built-in task) are read in index order (the examples are
  already random): global step s trains on the same examples whatever the number of processes;
- the optimizer, LR scheduler, gradient scaler and RNG states as safetensors + JSON, not the Trainer's
  pickles (``state_files.py``);
- every file of a checkpoint gets the mode ``open()`` would give it (``outputs.py``);
- next-token accuracy at evaluation (argmax taken per batch, so the logits are never gathered).

The patched model's ``save_pretrained`` writes only the prefix (the patcher marks the frozen weights
as not to be saved), so ``model.safetensors`` in a checkpoint is the prefix alone.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Trainer

import prefixattn
from prefixattn.prefix import peft_format_problems

from .data import IGNORE
from .outputs import give_normal_modes, write_json_atomic
from .state_files import (
    OPTIMIZER_FILE,
    SCALER_FILE,
    SCHEDULER_FILE,
    load_optimizer,
    load_rng_states,
    read_json,
    rng_file,
    save_optimizer,
    save_rng_states,
    write_json,
)

MARKER = "prefixattn.json"
# The Trainer's private methods PrefixTrainer overrides or calls (held under transformers 5.17 and 5.25:
# tests/cli, run by scripts/test_oldest.sh too). No public hook chooses the train sampler or writes and
# reads the optimizer, scheduler, scaler and RNG states in another format than torch.save's pickles;
# _save and _save_checkpoint could become an on_save callback, but callbacks are handed the model the
# Trainer was given, not its self.model (which it replaces with the FSDP-wrapped model, whose adapter
# this class saves), nor its accelerator (the barrier before the marker). A release that renamed one
# would leave an override uncalled (pickles written, the sampler shuffled): refused at construction.
PRIVATE_TRAINER_METHODS = ("_get_train_sampler", "_save_optimizer_and_scheduler",
                           "_load_optimizer_and_scheduler", "_save_scaler", "_load_scaler", "_save",
                           "_save_rng_state", "_load_rng_state", "_save_checkpoint", "_get_output_dir")
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(out: Path) -> list[tuple[int, Path, bool]]:
    """(step, path, complete) of every checkpoint-N directory in OUT, by step."""
    found = []
    if out.is_dir():
        for p in out.iterdir():
            m = CHECKPOINT.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p, (p / MARKER).is_file()))
    return sorted(found)


def latest_complete(out: Path) -> Path | None:
    done = [p for _, p, complete in checkpoints(out) if complete]
    return done[-1] if done else None


def remove_incomplete(out: Path) -> list[Path]:
    """Delete checkpoints a killed run left half-written; returns what was removed."""
    gone = [p for _, p, complete in checkpoints(out) if not complete]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def remove_run_outputs(out: Path, names: tuple[str, ...]) -> None:
    """--overwrite: delete what a previous run wrote (the named outputs and every checkpoint), and only that:
    OUT may be a directory holding other things."""
    for name in names:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    for _, path, _ in checkpoints(out):
        shutil.rmtree(path)


def read_marker(checkpoint: Path) -> dict[str, Any]:
    try:
        return json.loads((checkpoint / MARKER).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot resume: {checkpoint / MARKER} is unreadable ({e})") from None


def save_peft_if_possible(model: Any, directory: Path) -> list[str]:
    """Write the prefix as a PEFT adapter unless PEFT's format cannot hold it; returns why not (empty
    when written). ``prefix.safetensors`` / ``model.safetensors`` hold every prefix."""
    problems = peft_format_problems(model)
    if not problems:
        prefixattn.save_peft(model, directory)
    return problems


def argmax_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Keep only the predicted token per position (the Trainer would otherwise gather all logits)."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(-1)


def token_accuracy(pred: Any) -> dict[str, float]:
    """Next-token accuracy over the positions that carry a label."""
    preds, labels = np.asarray(pred.predictions), np.asarray(pred.label_ids)
    p, t = preds[:, :-1], labels[:, 1:]
    valid = t != IGNORE
    return {"accuracy": float((p == t)[valid].mean()) if valid.any() else float("nan")}


class PrefixTrainer(Trainer):
    """transformers.Trainer for a patched model (see the module docstring)."""

    def __init__(self, *args: Any, run_info: dict[str, Any], keep_checkpoints: int = 2,
                 **kwargs: Any) -> None:
        missing = [name for name in PRIVATE_TRAINER_METHODS if not callable(getattr(Trainer, name, None))]
        if missing:
            import transformers

            raise ValueError(f"transformers {transformers.__version__}: its Trainer has no "
                             f"{', '.join(missing)}, which prefixattn train overrides (checkpoints without "
                             "pickles); install another transformers (5.17 to 5.25 are tested)")
        super().__init__(*args, **kwargs)
        self.run_info = run_info
        self.keep_checkpoints = keep_checkpoints

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if getattr(dataset, "ordered", False):
            return torch.utils.data.SequentialSampler(dataset)
        return super()._get_train_sampler(train_dataset)

    # ---- resume state without pickle (state_files.py); DeepSpeed and FSDP keep their own formats ----

    def _own_state_files(self) -> bool:
        return not (self.is_deepspeed_enabled or self.is_fsdp_enabled)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self._own_state_files():
            return super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            save_optimizer(self.optimizer.state_dict(), Path(output_dir) / OPTIMIZER_FILE)
            write_json(Path(output_dir) / SCHEDULER_FILE, self.lr_scheduler.state_dict(), "LR scheduler")

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not self._own_state_files():
            return super()._load_optimizer_and_scheduler(checkpoint)
        folder = Path(checkpoint)
        if (folder / OPTIMIZER_FILE).is_file() and (folder / SCHEDULER_FILE).is_file():
            self.optimizer.load_state_dict(load_optimizer(folder / OPTIMIZER_FILE))
            self.lr_scheduler.load_state_dict(read_json(folder / SCHEDULER_FILE))

    def _save_scaler(self, output_dir: str) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if not self._own_state_files() or scaler is None:
            return super()._save_scaler(output_dir)
        if self.args.should_save:
            write_json(Path(output_dir) / SCALER_FILE, scaler.state_dict(), "gradient scaler")

    def _load_scaler(self, checkpoint: str | None) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if checkpoint is None or not self._own_state_files() or scaler is None:
            return super()._load_scaler(checkpoint)
        if (Path(checkpoint) / SCALER_FILE).is_file():
            scaler.load_state_dict(read_json(Path(checkpoint) / SCALER_FILE))

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        # the Trainer pickles its TrainingArguments next to the weights (informational: resume never
        # reads it); keep them as JSON instead
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        if self.args.should_save and (folder / "training_args.bin").is_file():
            (folder / "training_args.bin").unlink()
            write_json_atomic(folder / "training_args.json", json.loads(self.args.to_json_string()))

    def _rng_path(self, folder: str) -> Path:
        return Path(folder) / rng_file(self.args.process_index if self.args.world_size > 1 else None)

    def _save_rng_state(self, output_dir: str) -> None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        save_rng_states(self._rng_path(output_dir))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is not None and self._rng_path(checkpoint).is_file():
            load_rng_states(self._rng_path(checkpoint))

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        run_dir = Path(self._get_output_dir(trial=trial))
        folder = run_dir / f"checkpoint-{self.state.global_step}"
        if self.args.should_save:
            save_peft_if_possible(self.model, folder / "adapter")
        # every process has written its part (each saves its own RNG state) before the marker
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            give_normal_modes(folder)  # outputs.py: atomic writers leave 0600
            write_json_atomic(folder / MARKER, {**self.run_info, "step": self.state.global_step})
            done = [p for _, p, complete in checkpoints(run_dir) if complete]
            for old in done[: max(0, len(done) - self.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
