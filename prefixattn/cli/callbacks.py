"""The progress bar of ``prefixattn train`` as a TrainerCallback: step count, loss and tokens/s, and
one line per evaluation. Only the main process prints.

tokens/s counts real (non-padding) input tokens of every process (the Trainer's
``num_input_tokens_seen``) over the time spent in training steps (evaluation and checkpoint time
excluded).
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
        self.step_time = 0.0
        self.train_time = 0.0
        self.tokens_at_last_log = 0
        self.tokens_per_s: float | None = None
        self._t0 = 0.0
        self._log_time = 0.0
        self.losses: list[tuple[int, float]] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.tokens_at_last_log = state.num_input_tokens_seen
        if state.is_world_process_zero:
            self.bar = Progress(total=state.max_steps, initial=state.global_step, desc="train",
                                file=self.file)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._t0 = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        dt = time.perf_counter() - self._t0
        self.step_time += dt
        self.train_time += dt

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
