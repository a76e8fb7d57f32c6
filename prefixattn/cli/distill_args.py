"""The options of ``prefixattn distill`` (``DistillConfig``, the parser's arguments and help), kept apart
from the command itself (``distill.py``) so that building the parser loads no transformers."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .model import check_model_dir

# settings a resumed run must keep (the others say how long and how to run)
FIXED_ON_RESUME = ("model", "context", "data", "prefix_tokens", "cartridge", "frozen_tokens", "init",
                   "lm_weight", "live_teacher", "batch_size", "lr", "seed", "top_k", "conversations",
                   "eval_fraction")


@dataclass
class DistillConfig:
    out: str = "runs/prefixattn-distill"
    model: str | None = None
    context: list[str] = field(default_factory=list)
    data: str | None = None
    generate_only: bool = False
    conversations: int = 96
    chunk_tokens: int = 512
    question_tokens: int = 24
    answer_tokens: int = 48
    temperature: float = 0.7
    top_k: int = 20
    generator_url: str | None = None
    generator_model: str | None = None
    prefix_tokens: int = 128
    cartridge: bool = False
    frozen_tokens: int | None = None
    init: str = "context"
    lm_weight: float = 0.0
    live_teacher: bool = False
    steps: int = 200
    batch_size: int = 8
    lr: float = 1e-1
    save_every: int = 100
    eval_fraction: float = 0.15
    seed: int = 0
    backend: str = "auto"
    device: str | None = None
    resume: bool = False
    overwrite: bool = False
    plot: bool = True

    def check(self) -> None:
        for name in ("conversations", "chunk_tokens", "question_tokens", "answer_tokens", "top_k",
                     "prefix_tokens", "steps", "batch_size", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"--eval-fraction must be in (0, 1), got {self.eval_fraction}")
        if not self.lr > 0 or not self.lm_weight >= 0:
            raise ValueError("--lr must be positive and --lm-weight >= 0")
        if self.init not in ("context", "random"):
            raise ValueError(f"--init must be context or random, got {self.init!r}")
        if self.frozen_tokens is not None and not self.cartridge:
            raise ValueError("--frozen-tokens is a cartridge option: add --cartridge")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other")
        if self.model is not None:
            check_model_dir(self.model)
        for path in self.context:
            if not Path(path).is_file():
                raise ValueError(f"--context {path}: no such file")
        if self.data is not None and not Path(self.data).is_file():
            raise ValueError(f"--data {self.data}: no such file")
        if self.data is not None and (self.generate_only or self.generator_url):
            raise ValueError("--data gives the conversations; --generate-only / --generator-url generate "
                             "them")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA device is available")


DISTILL_HELP = """Distil a context into a prefix or a cartridge: self-study conversations about the context
(an asker and an answerer, both with a chunk of it in front), then context distillation (KL from the
teacher, the frozen model with the context in front, to the student, the frozen model with the prefix).

  prefixattn distill                                    the embedded demo: no download, ~1 min on a CPU
  prefixattn distill --model DIR --context doc.txt --prefix-tokens 256 --out runs/doc
  prefixattn distill --model DIR --context doc.txt --generator-url http://localhost:8000/v1
  prefixattn distill --model DIR --context doc.txt --generate-only        only write OUT/selfstudy.jsonl
  prefixattn distill --model DIR --context doc.txt --data convs.jsonl --cartridge
  prefixattn distill --out runs/doc --resume ...                          continue after an interruption
  torchrun --nproc-per-node 4 -m prefixattn.cli distill --model DIR --context doc.txt
                                     4 processes: self-study split over them, data-parallel training"""


def add_distill_arguments(p: argparse.ArgumentParser) -> None:
    d = DistillConfig()
    g = p.add_argument_group("context and data")
    g.add_argument("--model", default=None, metavar="DIR", help="local Hugging Face causal LM (default: the "
                   "embedded tiny Llama)")
    g.add_argument("--context", nargs="+", default=[], metavar="FILE",
                   help="UTF-8 text file(s), joined by blank lines (default: the embedded demo text)")
    g.add_argument("--data", default=None, metavar="FILE",
                   help="self-study JSONL records to train on instead of generating them")
    g.add_argument("--generate-only", action="store_true", help="write OUT/selfstudy.jsonl and stop")
    g.add_argument("--conversations", type=int, default=d.conversations, help="self-study conversations")
    g.add_argument("--chunk-tokens", type=int, default=d.chunk_tokens, help="tokens per context chunk")
    g.add_argument("--question-tokens", type=int, default=d.question_tokens, help="longest user message")
    g.add_argument("--answer-tokens", type=int, default=d.answer_tokens, help="longest answer")
    g.add_argument("--temperature", type=float, default=d.temperature,
                   help="sampling temperature of both agents")
    g.add_argument("--top-k", type=int, default=d.top_k, help="teacher log-probs kept per answer token")
    g.add_argument("--generator-url", default=None, metavar="URL", help="an OpenAI-compatible endpoint "
                   "(prefixattn serve, vLLM) that writes the turns")
    g.add_argument("--generator-model", default=None, help="the endpoint's model name (default: its first)")
    g = p.add_argument_group("student and training")
    g.add_argument("--prefix-tokens", type=int, default=d.prefix_tokens, metavar="P",
                   help="the prefix's length")
    g.add_argument("--cartridge", action="store_true",
                   help="a cartridge (PEFT's CARTRIDGE, frozen first tokens)")
    g.add_argument("--frozen-tokens", type=int, default=None, help="a cartridge's frozen tokens (default 1)")
    g.add_argument("--init", choices=("context", "random"), default=d.init,
                   help="the prefix starts as the context's first P tokens' keys and values, or random")
    g.add_argument("--lm-weight", type=float, default=d.lm_weight, help="weight of the LM loss mixed in")
    g.add_argument("--live-teacher", action="store_true", help="the teacher reads the whole context's kept "
                   "K/V at every step instead of the recorded top-k (the context must fit the model)")
    g.add_argument("--steps", type=int, default=d.steps)
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps")
    g.add_argument("--eval-fraction", type=float, default=d.eval_fraction, help="conversations held out")
    g.add_argument("--seed", type=int, default=d.seed)
    g = p.add_argument_group("output and devices")
    g.add_argument("--out", default=d.out, metavar="DIR")
    g.add_argument("--resume", action="store_true", help="continue the latest complete checkpoint in OUT")
    g.add_argument("--overwrite", action="store_true", help="delete what a previous run wrote to OUT")
    g.add_argument("--no-plot", action="store_true")
    g.add_argument("--backend", choices=("auto", "triton", "torch"), default=d.backend)
    g.add_argument("--device", choices=("cpu", "cuda"), default=None)


