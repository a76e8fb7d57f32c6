"""The ``prefixattn`` command: ``info``, ``train``. (Benchmarks: ``python -m bench`` from a checkout.)

prefixattn info                     versions, device, usable backends
prefixattn train [--steps N] [--out DIR] [--model HF_DIR] [--data FILE.jsonl] [--resume]
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from pathlib import Path
from typing import Any


def _version(module: str) -> str:
    try:
        return str(getattr(importlib.import_module(module), "__version__", "?"))
    except Exception:
        return "not installed"


def backends() -> dict[str, str]:
    """Each attention backend of prefix_attention, and whether it can run here (with the reason)."""
    import torch

    from .ops import triton_available, triton_interpreting

    out = {"torch": "yes (pure PyTorch, any device)"}
    if not triton_available():
        out["triton"] = "no: the triton package does not import"
    elif torch.cuda.is_available():
        try:
            importlib.import_module("prefixattn.kernels")
            out["triton"] = "yes (CUDA)"
        except Exception as e:
            out["triton"] = f"no: kernels fail to import ({type(e).__name__}: {e})"
    elif triton_interpreting():
        out["triton"] = "yes, through the interpreter (TRITON_INTERPRET=1: slow, for tests)"
    else:
        out["triton"] = "no: needs a CUDA GPU (or TRITON_INTERPRET=1 for the slow interpreter)"
    out["auto"] = "triton" if out["triton"].startswith("yes") else "torch"
    return out


def info() -> dict[str, Any]:
    import torch

    import prefixattn

    dev = "cpu"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        dev = f"cuda: {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)"
    return {
        "prefixattn": prefixattn.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "device": dev,
        "backends": backends(),
    }


def cmd_info(args: argparse.Namespace) -> int:
    data = info()
    for key, value in data.items():
        if key == "backends":
            print("backends:")
            for name, state in value.items():
                print(f"  {name:<7} {state}")
        else:
            print(f"{key + ':':<14}{value}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    cfg = TrainConfig(
        out=str(args.out),
        model=args.model,
        data=args.data,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        max_len=args.max_len,
        num_prefix_tokens=args.prefix_tokens,
        prefix_projection=args.prefix_projection,
        lr=args.lr,
        eval_every=args.eval_every,
        save_every=args.save_every,
        seed=args.seed,
        backend=args.backend,
        device=args.device,
        dtype=args.dtype,
        resume=args.resume,
        overwrite=args.overwrite,
        plot=not args.no_plot,
    )
    try:
        train(cfg)
    except KeyboardInterrupt:
        return 130
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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="prefixattn", description="Fused prefix-tuning attention: tools.")
    sub = ap.add_subparsers(dest="command", metavar="{info,train}")
    sub.required = True

    p = sub.add_parser("info", help="versions, device, usable backends")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train", help="prefix-tune a causal LM (default: a built-in job that runs anywhere)")
    pos_i, pos_f = _positive(int), _positive(float)
    p.add_argument("--out", type=Path, default=Path("runs/prefixattn-train"), help="output directory")
    p.add_argument(
        "--model", default=None, help="local Hugging Face model directory (default: embedded tiny Llama)"
    )
    p.add_argument(
        "--data", default=None, help='JSONL file: {"text": ...} or {"prompt": ..., "completion": ...}'
    )
    p.add_argument("--steps", type=pos_i, default=200, help="total optimizer steps (default 200)")
    p.add_argument("--batch-size", type=pos_i, default=16)
    p.add_argument("--seq-len", type=pos_i, default=32, help="length of the built-in task's sequences")
    p.add_argument("--max-len", type=pos_i, default=256, help="truncate JSONL examples to this many tokens")
    p.add_argument("--prefix-tokens", type=pos_i, default=16, help="P, virtual tokens per layer (default 16)")
    p.add_argument("--prefix-projection", action="store_true", help="PEFT's MLP reparameterization")
    p.add_argument("--lr", type=pos_f, default=3e-2)
    p.add_argument("--eval-every", type=pos_i, default=50)
    p.add_argument("--save-every", type=pos_i, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="base model dtype"
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete OUT first")
    p.add_argument("--no-plot", action="store_true", help="skip the loss-curve PNG")
    p.set_defaults(func=cmd_train)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as e:  # bad input: a clear message, no traceback
        print(f"prefixattn {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
