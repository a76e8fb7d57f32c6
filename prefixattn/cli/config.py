"""The settings of one ``prefixattn train`` run: the ``TrainConfig`` dataclass, which the command's
parser takes its option defaults from (``cli/__init__.py``). Nothing heavy is imported here: building the
parser (``--help``, ``info``, ``--version``) loads no transformers. ``train.check_config`` checks one."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    """Settings of one training run (the command's options)."""

    out: str = "runs/prefixattn-train"
    model: str | None = None
    tokenizer: str | None = None  # a tokenizer directory for --model (default: the model directory's)
    data: str | None = None
    steps: int = 100
    batch_size: int = 16
    grad_accum: int = 1
    seq_len: int = 32
    max_len: int = 256
    prefix_tokens: int = 16
    prefix_projection: bool = False
    ignore_attention_dropout: bool = False
    cartridge: bool = False
    frozen_tokens: int | None = None  # a cartridge's; None: PEFT's default (1)
    init_text: str | None = None
    lr: float = 3e-2
    lr_schedule: str = "constant"
    warmup: int = 0
    weight_decay: float = 0.0
    bf16: bool = False
    fp16: bool = False
    packing: bool = False
    gradient_checkpointing: bool = False
    eval_every: int = 25
    save_every: int = 50
    keep_checkpoints: int = 2
    seed: int = 0
    backend: str = "auto"
    device: str | None = None
    dtype: str = "float32"
    report_to: str = "auto"
    fsdp: str = ""
    fsdp_config: str | None = None
    deepspeed: str | None = None
    resume: bool = False
    overwrite: bool = False
    plot: bool = True
