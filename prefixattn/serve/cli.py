"""``prefixattn serve``: vLLM's OpenAI-compatible server with every tuned prefix served as its own model.

The options vLLM does not know are ours; every other option goes to vLLM unchanged.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys

from .drain import DEFAULT_DRAIN_TIMEOUT_S
from .launch import prepare, run_server
from .versions import installed_vllm, untested_reason

SERVE_HELP = """Serve tuned prefixes on vLLM: one base model, every prefix its own model name.

  prefixattn serve MODEL_DIR --prefix NAME=ADAPTER [--prefix ...] [--host H] [--port N] [vLLM options...]
  python -m prefixattn serve ...                       the same without the console script

ADAPTER: a PEFT prefix-tuning adapter directory (prefixattn.save_peft, PEFT's save_pretrained), a
prefixattn prefix file (prefixattn.save_prefix; a bank of N is served as NAME/0 .. NAME/N-1), or the
output directory of `prefixattn train`. Requests pick a prefix with "model": "NAME"; the base model
answers under --served-model-name (default: MODEL_DIR). Every other option is passed to vLLM
(e.g. --max-model-len 4096 --dtype bfloat16 --enforce-eager). --check validates everything and exits
without starting vLLM (it runs without vLLM installed)."""

# vLLM listens on every interface by default; a server that holds tuned prefixes should be exposed only on
# purpose
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
_OWN_VLLM_OPTIONS = ("--kv-transfer-config", "--model", "--served-model-name", "--port", "--host")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prefixattn serve", description=SERVE_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", metavar="MODEL_DIR", help="local Hugging Face model directory (the base)")
    p.add_argument("--prefix", action="append", default=[], metavar="NAME=ADAPTER",
                   help="a prefix to serve under NAME (repeat for more)")
    p.add_argument("--served-model-name", default=None, help="the base model's name (default: MODEL_DIR)")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default: {DEFAULT_HOST}, this machine only; --host 0.0.0.0 "
                        "listens on every interface: pair it with --api-key)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"port to listen on (default: {DEFAULT_PORT})")
    p.add_argument("--drain-timeout", type=float, default=DEFAULT_DRAIN_TIMEOUT_S, metavar="SECONDS",
                   help="on SIGTERM or Ctrl-C: new requests get 503, running ones this long to finish "
                        "(then they are ended with an error), then the server exits (default: "
                        f"{DEFAULT_DRAIN_TIMEOUT_S:g})")
    p.add_argument("--run-dir", default=None,
                   help="where to write the served-prefix table (default: a temporary directory, removed "
                        "when the server stops)")
    p.add_argument("--check", action="store_true",
                   help="check the model and the adapters, print what would be served, and exit")
    p.add_argument("--allow-untested-vllm", action="store_true",
                   help="start on a vLLM version prefix serving was not tested with")
    return p


def _option_value(vllm_args: list[str], *names: str) -> str | None:
    """The value of the first of ``names`` given (``--name VALUE`` or ``--name=VALUE``)."""
    for i, arg in enumerate(vllm_args):
        for name in names:
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
            if arg == name and i + 1 < len(vllm_args):
                return vllm_args[i + 1]
    return None


def _max_model_len(vllm_args: list[str]) -> int | None:
    value = _option_value(vllm_args, "--max-model-len")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None  # vLLM's own parser reports it (it also takes 1k, 32K, ...)


def _check_vllm_args(vllm_args: list[str]) -> None:
    servers = _option_value(vllm_args, "--api-server-count", "-asc")
    if servers is not None and servers.strip() != "1":
        raise ValueError(f"--api-server-count {servers}: prefix serving runs one API server process (vLLM's "
                         "single-server entry point, whose drain on SIGTERM is tested; the option would be "
                         "ignored there). For more, run replicas behind a load balancer: any replica serves "
                         "any prefix by name")
    for arg in vllm_args:
        name = arg.split("=", 1)[0]
        if name in _OWN_VLLM_OPTIONS:
            raise ValueError(f"{name} is set by prefixattn serve (the connector, the model and its names)")
        if name in ("--pipeline-parallel-size", "-pp", "--data-parallel-size", "-dp"):
            raise ValueError(f"{name}: prefix serving runs one engine, on one device or on tensor-parallel "
                             "ranks (--tensor-parallel-size): the connector writes a prefix into that "
                             "engine's paged cache (a pipeline stage holds a slice of the layers: not written"
                             " yet; data-parallel engines were not tested). To serve more traffic, run "
                             "replicas behind a load balancer: any replica serves any prefix by name")


def main(argv: list[str] | None = None) -> int:
    args, vllm_args = build_parser().parse_known_args(argv)
    try:
        _check_vllm_args(vllm_args)
        if args.drain_timeout < 0:
            raise ValueError(f"--drain-timeout must be >= 0 seconds, got {args.drain_timeout:g}")
        if not args.check and importlib.util.find_spec("vllm") is None:
            raise ValueError(f"vLLM is not installed in this Python ({sys.executable}). "
                             "`bash scripts/setup_vllm.sh` makes .venv-vllm with it: run "
                             "`.venv-vllm/bin/prefixattn serve ...` (or --check here to validate only)")
        if not args.check and not args.allow_untested_vllm:
            reason = untested_reason(installed_vllm())
            if reason:
                raise ValueError(reason)
        prepared = prepare(args.model_dir, args.prefix, args.served_model_name,
                           None if args.check else args.run_dir, _max_model_len(vllm_args))
    except ValueError as e:
        print(f"prefixattn serve: error: {e}", file=sys.stderr)
        return 2
    table = prepared.table
    context = prepared.max_model_len
    print(f"prefixattn serve: base model {table.base_name!r} ({table.num_layers} layers, "
          f"{table.num_kv_heads} KV heads x head dim {table.head_dim}"
          + (f", context {context} tokens)" if context else ")"))
    for e in table.entries.values():
        room = f" (context {context - e.num_tokens} tokens)" if context else ""
        print(f"  {e.name}: {e.num_tokens} prefix tokens from {e.source}{room}")
    for warning in prepared.warnings:
        print(f"prefixattn serve: warning: {warning}", file=sys.stderr)
    if args.check:
        if prepared.owns_run_dir:
            shutil.rmtree(prepared.run_dir, ignore_errors=True)
        return 0
    return run_server(prepared, args.host, args.port, vllm_args, args.drain_timeout)


if __name__ == "__main__":
    sys.exit(main())
