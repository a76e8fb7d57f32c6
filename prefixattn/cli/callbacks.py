"""The progress bar of ``prefixattn train`` as a TrainerCallback: step count, loss and tokens/s, and
one line per evaluation. Only the main process prints.

tokens/s counts real (non-padding) input tokens of every process (the Trainer's
``num_input_tokens_seen``). The bar shows the latest step's rate; the run's rate (``run_tokens_per_s``,
what the command reports at the end) is every token this session trained over the wall time of its
training, from the start of ``train()`` to the end of its last step, less the time spent in evaluation
and checkpoints (data loading and logging count: they are part of training).
"""

from __future__ import annotations

import math
import time
from typing import Any

from transformers import TrainerCallback

from .progress import Progress


class ProgressCallback(TrainerCallback):
    """Drives a Progress bar from the Trainer's events."""

    def __init__(self, file: Any = None) -> None:
        self.file = file
        self.bar: Progress | None = None
        self.step_time = 0.0  # the current step's time in forward, backward and optimizer step
        self.tokens_at_last_log = 0
        self.tokens_per_s: float | None = None  # the latest step's rate (the bar's)
        self.tokens_at_start = 0
        self.run_tokens = 0  # trained by this session (a resumed run counts from its checkpoint)
        self.run_seconds = 0.0
        self._t0 = 0.0
        self._started = 0.0
        self._mark = 0.0  # the end of the last step, evaluation or checkpoint
        self._outside = 0.0  # evaluation and checkpoint time so far
        self.losses: list[tuple[int, float]] = []

    @property
    def run_tokens_per_s(self) -> float | None:
        """The run's rate: tokens trained / seconds of training (see the module docstring)."""
        return self.run_tokens / self.run_seconds if self.run_seconds > 0 and self.run_tokens > 0 else None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.tokens_at_last_log = self.tokens_at_start = state.num_input_tokens_seen
        self._started = self._mark = time.perf_counter()
        if state.is_world_process_zero:
            self.bar = Progress(total=state.max_steps, initial=state.global_step, desc="train",
                                file=self.file)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._t0 = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        now = time.perf_counter()
        self.step_time += now - self._t0
        self._mark = now
        self.run_seconds = now - self._started - self._outside
        self.run_tokens = state.num_input_tokens_seen - self.tokens_at_start

    def _outside_training(self) -> None:
        now = time.perf_counter()
        self._outside += now - self._mark
        self._mark = now

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._outside_training()  # since the step (or the start): the evaluation

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._outside_training()  # since the step or the evaluation: the checkpoint

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
               **kwargs: Any) -> None:
        logs = logs or {}
        if "loss" in logs:
            tokens = state.num_input_tokens_seen - self.tokens_at_last_log
            if self.step_time > 0 and tokens > 0:
                self.tokens_per_s = tokens / self.step_time
            self.tokens_at_last_log, self.step_time = state.num_input_tokens_seen, 0.0
            loss = float(logs["loss"])
            self.losses.append((state.global_step, loss))
            if self.bar is not None:
                fields: dict[str, Any] = {"loss": loss}
                if self.tokens_per_s is not None:
                    fields["tok/s"] = round(self.tokens_per_s)
                self.bar.set(**fields)
                self.bar.update(state.global_step - self.bar.n)  # logging_steps=1: once per step
            if not math.isfinite(loss):
                raise FloatingPointError(f"the training loss became {loss} at step {state.global_step}")
        if "eval_loss" in logs and self.bar is not None:
            acc = logs.get("eval_accuracy")
            self.bar.write(f"step {state.global_step}: eval loss {logs['eval_loss']:.4f}"
                           + (f", accuracy {acc:.1%}" if acc is not None else ""))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class CadenceFromArguments(TrainerCallback):
    """A resumed Trainer takes its logging, evaluation and checkpoint intervals from the checkpoint's
    trainer_state.json, not from its arguments (a mismatch is only logged), so a resumed run's
    --eval-every / --save-every would be ignored. The state is loaded before ``on_train_begin``
    (transformers 5.17 to 5.24): put the arguments' intervals back there."""

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        state.logging_steps = args.logging_steps
        state.eval_steps, state.save_steps = args.eval_steps, args.save_steps
