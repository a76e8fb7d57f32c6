"""The ``prefixattn`` command: ``info``, ``train``, ``serve``. (Benchmarks: ``python -m bench``, from a
checkout.)

prefixattn info                     versions, device, usable backends
prefixattn train [--steps N] [--out DIR] [--model HF_DIR] [--data FILE.jsonl] [--resume]
prefixattn serve MODEL_DIR --prefix NAME=ADAPTER [...] [vLLM options]     (prefixattn.serve)
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .info import cmd_info


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from .train import TrainConfig, train

    cfg = TrainConfig(**{f: getattr(args, f) for f in TrainConfig.__dataclass_fields__ if f != "plot"},
                      plot=not args.no_plot)
    try:
        train(cfg)
    except KeyboardInterrupt:
        return 130
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


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


TRAIN_HELP = """Prefix-tune a causal LM on transformers' Trainer (frozen model, trainable prefix).

  prefixattn train                                   the embedded demo: no download, ~1 min on a CPU
  prefixattn train --model DIR --data train.jsonl --prefix-tokens 32 --steps 1000 --out runs/x
  prefixattn train --out runs/x --steps 2000 --resume          continue after an interruption
  torchrun --nproc-per-node 4 $(which prefixattn) train ...    4 data-parallel processes
  accelerate launch $(which prefixattn) train ...              the same through accelerate

--batch-size is per process: N processes with batch b train like one with N * b."""


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    pos_i, pos_f = _positive(int), _positive(float)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None,
                   help="local Hugging Face model directory (default: embedded tiny Llama)")
    g.add_argument("--data", default=None,
                   help='JSONL file: {"text": ...} or {"prompt": ..., "completion": ...}')
    g.add_argument("--seq-len", type=pos_i, default=32, help="length of the built-in task's sequences")
    g.add_argument("--max-len", type=pos_i, default=256, help="truncate JSONL examples to this many tokens")
    g.add_argument("--packing", action="store_true",
                   help="padding-free batches: one flattened row per batch, position_ids restart per example")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="base model dtype (the prefix stays fp32)")
    g = p.add_argument_group("prefix")
    g.add_argument("--prefix-tokens", type=pos_i, default=16, help="P, virtual tokens per layer (default 16)")
    g.add_argument("--prefix-projection", action="store_true", help="PEFT's MLP reparameterization")
    g.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto")
    g = p.add_argument_group("optimization")
    g.add_argument("--steps", type=pos_i, default=100, help="total optimizer steps (default 100)")
    g.add_argument("--batch-size", type=pos_i, default=16, help="examples per process per micro-step")
    g.add_argument("--grad-accum", type=pos_i, default=1, help="micro-steps per optimizer step")
    g.add_argument("--lr", type=pos_f, default=3e-2)
    g.add_argument("--lr-schedule", choices=("constant", "linear", "cosine"), default="constant")
    g.add_argument("--warmup", type=int, default=0, help="linear warm-up steps")
    g.add_argument("--weight-decay", type=float, default=0.0)
    prec = g.add_mutually_exclusive_group()
    prec.add_argument("--bf16", action="store_true", help="bf16 mixed precision (autocast)")
    prec.add_argument("--fp16", action="store_true", help="fp16 mixed precision (autocast + loss scaling)")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("evaluation, checkpoints, logging")
    g.add_argument("--out", default="runs/prefixattn-train", help="output directory")
    g.add_argument("--eval-every", type=pos_i, default=25)
    g.add_argument("--save-every", type=pos_i, default=50, help="checkpoint every N steps (and at the end)")
    g.add_argument("--keep-checkpoints", type=pos_i, default=2, help="complete checkpoints kept (default 2)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the latest complete checkpoint in OUT")
    g.add_argument("--overwrite", action="store_true", help="delete what a previous run wrote to OUT first")
    g.add_argument("--report-to", default="auto",
                   help="the Trainer's report_to: auto (tensorboard if installed), none, or a list of names")
    g.add_argument("--no-plot", action="store_true", help="skip the loss-curve PNG")
    g = p.add_argument_group("devices")
    g.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    g.add_argument("--fsdp", default="", help="the Trainer's fsdp option, e.g. 'full_shard auto_wrap'")
    g.add_argument("--fsdp-config", default=None, help="the Trainer's fsdp_config (JSON file)")
    g.add_argument("--deepspeed", default=None, help="a DeepSpeed config (JSON file), handed to the Trainer")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="prefixattn", description="Fused prefix-tuning attention: tools.")
    sub = ap.add_subparsers(dest="command", metavar="{info,train,serve}")
    sub.required = True

    p = sub.add_parser("info", help="versions, device, usable backends")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train", help="prefix-tune a causal LM on transformers' Trainer "
                       "(default: a built-in job that runs anywhere)", description=TRAIN_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)
    sub.add_parser("serve", help="serve tuned prefixes on vLLM (prefixattn serve --help)", add_help=False)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:  # parses its own options (vLLM's pass through); loads no vLLM for `train`
        from ..serve.cli import main as serve_main

        return serve_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as e:  # bad input: a clear message, no traceback
        print(f"prefixattn {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
