"""The ``prefixattn`` command: ``info``, ``train``, ``serve``. (Benchmarks: ``python -m bench``, from a
checkout.)

prefixattn info                     versions, device, usable backends
prefixattn train [--steps N] [--out DIR] [--model HF_DIR] [--data FILE.jsonl] [--resume]  (--help: all)
prefixattn distill [--model HF_DIR] [--context FILE ...] [--out DIR] [--resume]   (--help: all)
prefixattn serve MODEL_DIR --prefix NAME=ADAPTER [...] [vLLM options]     (prefixattn.serve)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from .. import __version__
from .config import TrainConfig
from .distill_args import DISTILL_HELP, add_distill_arguments
from .info import cmd_info
from .processes import leave_group


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    cfg = TrainConfig(**{f: getattr(args, f) for f in TrainConfig.__dataclass_fields__ if f != "plot"},
                      plot=not args.no_plot)
    try:
        train(cfg, given=getattr(args, "given", None))
    except KeyboardInterrupt:
        return 130
    finally:
        leave_group()
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from .distill import cmd_distill as run

    return run(args)


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


TRAIN_HELP = """Prefix-tune a causal LM on transformers' Trainer (frozen model, trainable prefix); or, with
--model, an encoder-decoder ({"prompt", "completion"} lines: prompt -> encoder, completion -> decoder)
or a sequence classifier ({"text", "label"} lines; its head trains with the prefix).

  prefixattn train                                   the embedded demo: no download, ~1 min on a CPU
  prefixattn train --model DIR --data train.jsonl --prefix-tokens 32 --steps 1000 --out runs/x
  prefixattn train --out runs/x --resume                       continue after an interruption
  prefixattn train --out runs/x --resume --steps 2000          train longer (constant LR schedule)
  prefixattn train --cartridge --prefix-tokens 64              the demo as a cartridge (see below)
  prefixattn train --model DIR --data qa.jsonl --cartridge --prefix-tokens 2048 --init-text corpus.txt
  torchrun --nproc-per-node 4 $(which prefixattn) train ...    4 data-parallel processes
  accelerate launch $(which prefixattn) train ...              the same through accelerate

--batch-size is per process: N processes with batch b train like one with N * b.

--cartridge trains a cartridge (PEFT's CARTRIDGE type; Eyuboglu et al. 2025): a long raw prefix whose
first --frozen-tokens (1) never train, initialised from the frozen model's keys and values of a corpus
(--init-text FILE: its first P tokens, repeated when shorter); OUT/adapter is a CARTRIDGE adapter. The
question/answer data is yours (--data; prefixattn distill writes self-study conversations about a
context and trains on the teacher's distribution instead); the demo initialises from the built-in
task's corpus (the permutation written out) and trains on the built-in task.

--resume continues the latest complete checkpoint in OUT with the run's own settings: the options
left out take the run's values, not the defaults below. Options given again must agree with the
run, except those that only say how long and how to run: --steps (not with a linear or cosine LR
schedule, which decays over --steps), --eval-every, --save-every, --keep-checkpoints, --report-to,
--no-plot, --backend, --device, --gradient-checkpointing, and --batch-size / --grad-accum as long
as the global batch (per process x processes x accumulation) stays the run's."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written; each option's default after its help, unless it has none to show
    (None: the help says what happens; False: an on/off flag that is off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or default is None or default is False or default in (argparse.SUPPRESS, ""):
            return text
        return text + " (default: %(default)s)"


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The train options: one per TrainConfig field (``--no-plot`` for ``plot``), each default the
    dataclass's own (tests/cli/test_info.py checks both)."""
    pos_i, pos_f = _positive(int), _positive(float)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=defaults["model"], metavar="DIR",
                   help="local Hugging Face model directory (default: the embedded tiny Llama, saved to "
                        "OUT/base_model)")
    g.add_argument("--tokenizer", default=defaults["tokenizer"], metavar="DIR",
                   help="local tokenizer directory for --model (default: the model directory's own; a "
                        "model directory without tokenizer files needs it)")
    g.add_argument("--data", default=defaults["data"], metavar="FILE",
                   help='JSONL file: {"text": ...} or {"prompt": ..., "completion": ...} lines; the last '
                        "10%% are held out for evaluation (default: the built-in successor task)")
    g.add_argument("--seq-len", type=pos_i, metavar="N", default=defaults["seq_len"],
                   help="length of the built-in task's sequences")
    g.add_argument("--max-len", type=pos_i, metavar="N", default=defaults["max_len"],
                   help="truncate JSONL examples to this many tokens")
    g.add_argument("--packing", action="store_true",
                   help="padding-free batches: one flattened row per batch, position_ids restart per example")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=defaults["dtype"],
                   help="base model dtype (the prefix stays fp32)")
    g = p.add_argument_group("prefix")
    g.add_argument("--prefix-tokens", type=pos_i, metavar="P", default=defaults["prefix_tokens"],
                   help="P, virtual tokens per layer")
    g.add_argument("--prefix-projection", action="store_true", help="PEFT's MLP reparameterization")
    g.add_argument("--cartridge", action="store_true",
                   help="train a cartridge (PEFT's CARTRIDGE type: no MLP, the first --frozen-tokens frozen)")
    g.add_argument("--frozen-tokens", type=int, metavar="N", default=defaults["frozen_tokens"],
                   help="a cartridge's frozen leading tokens (default 1, PEFT's: an attention sink)")
    g.add_argument("--init-text", metavar="FILE", default=defaults["init_text"],
                   help="initialise the prefix with the frozen model's keys/values of this UTF-8 text (its "
                        "first P tokens); default: random, or the built-in corpus for a --cartridge demo")
    g.add_argument("--backend", choices=("auto", "triton", "torch"), default=defaults["backend"],
                   help="attention backend: auto is triton on a CUDA GPU, else torch")
    g.add_argument("--ignore-attention-dropout", action="store_true",
                   help="train without the model's attention dropout (BERT-style configs have 0.1), which "
                        "the fused attention does not implement; without it such a model is refused")
    g = p.add_argument_group("optimization")
    g.add_argument("--steps", type=pos_i, metavar="N", default=defaults["steps"],
                   help="total optimizer steps")
    g.add_argument("--batch-size", type=pos_i, metavar="N", default=defaults["batch_size"],
                   help="examples per process per micro-step")
    g.add_argument("--grad-accum", type=pos_i, metavar="N", default=defaults["grad_accum"],
                   help="micro-steps per optimizer step")
    g.add_argument("--lr", type=pos_f, default=defaults["lr"], help="peak learning rate (AdamW)")
    g.add_argument("--lr-schedule", choices=("constant", "linear", "cosine"), default=defaults["lr_schedule"],
                   help="learning rate after the warm-up: constant, or decaying to 0 at --steps")
    g.add_argument("--warmup", type=int, metavar="N", default=defaults["warmup"], help="linear warm-up steps")
    g.add_argument("--weight-decay", type=float, metavar="W", default=defaults["weight_decay"],
                   help="AdamW weight decay")
    prec = g.add_mutually_exclusive_group()
    prec.add_argument("--bf16", action="store_true", help="bf16 mixed precision (autocast; GPU or CPU)")
    prec.add_argument("--fp16", action="store_true",
                      help="fp16 mixed precision (autocast + loss scaling; GPU only)")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                   default=defaults["gradient_checkpointing"],
                   help="recompute each layer in the backward pass: less memory, more time")
    g.add_argument("--seed", type=int, default=defaults["seed"],
                   help="seeds the prefix, the data order and every random number generator")
    g = p.add_argument_group("evaluation, checkpoints, logging")
    g.add_argument("--out", metavar="DIR", default=defaults["out"], help="output directory")
    g.add_argument("--eval-every", type=pos_i, metavar="N", default=defaults["eval_every"],
                   help="evaluate every N steps (and at the start)")
    g.add_argument("--save-every", type=pos_i, metavar="N", default=defaults["save_every"],
                   help="checkpoint every N steps (and at the end)")
    g.add_argument("--keep-checkpoints", type=pos_i, metavar="N", default=defaults["keep_checkpoints"],
                   help="complete checkpoints kept")
    g.add_argument("--resume", action="store_true",
                   help="continue from the latest complete checkpoint in OUT, with the run's settings")
    g.add_argument("--overwrite", action="store_true", help="delete what a previous run wrote to OUT first")
    g.add_argument("--report-to", metavar="NAMES", default=defaults["report_to"],
                   help="the Trainer's report_to: auto (tensorboard if installed), none, or a list of names")
    g.add_argument("--no-plot", action="store_true", help="skip the loss-curve PNG")
    g = p.add_argument_group("devices")
    g.add_argument("--device", choices=("cpu", "cuda"), default=defaults["device"],
                   help="default: cuda if available, else cpu")
    g.add_argument("--fsdp", metavar="OPTIONS", default=defaults["fsdp"],
                   help="the Trainer's fsdp option, e.g. 'full_shard auto_wrap'")
    g.add_argument("--fsdp-config", metavar="FILE", default=defaults["fsdp_config"],
                   help="the Trainer's fsdp_config (JSON file)")
    g.add_argument("--deepspeed", metavar="FILE", default=defaults["deepspeed"],
                   help="a DeepSpeed config (JSON file), handed to the Trainer")


def build_parser(defaults: bool = True) -> argparse.ArgumentParser:
    """The command's parser; ``defaults=False`` leaves out every train option that was not given (so
    ``--resume`` can tell an option given on the command line from a default)."""
    ap = argparse.ArgumentParser(prog="prefixattn", description="Fused prefix-tuning attention: tools.")
    ap.add_argument("--version", action="version", version=f"prefixattn {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="{info,train,distill,serve}")
    sub.required = True

    p = sub.add_parser("info", help="versions, device, usable backends")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train", help="prefix-tune a causal LM on transformers' Trainer "
                       "(default: a built-in job that runs anywhere)", description=TRAIN_HELP,
                       formatter_class=HelpFormatter)
    add_train_arguments(p)
    if not defaults:  # (argparse has no public list of a parser's options; set_defaults would not do)
        for action in p._actions:
            action.default = argparse.SUPPRESS
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("distill", help="distil a context into a prefix or a cartridge (self-study + context "
                       "distillation)", description=DISTILL_HELP, formatter_class=HelpFormatter)
    add_distill_arguments(p)
    p.set_defaults(func=cmd_distill)
    sub.add_parser("serve", help="serve tuned prefixes on vLLM (prefixattn serve --help)", add_help=False)
    return ap


def given_train_options(argv: list[str] | None) -> set[str]:
    """The TrainConfig fields the command line set (``--no-plot`` sets ``plot``)."""
    given = vars(build_parser(defaults=False).parse_args(argv))
    return {"plot" if name == "no_plot" else name for name in given if name not in ("command", "func")}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:  # parses its own options (vLLM's pass through); loads no vLLM for `train`
        from ..serve.cli import main as serve_main

        return serve_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "train":
        args.given = given_train_options(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as e:  # bad input: a clear message, no traceback
        print(f"prefixattn {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
