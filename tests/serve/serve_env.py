"""The vLLM environment seen from the main one: finding its Python (or skipping, saying why), starting and
stopping ``prefixattn serve`` in it, and a small HTTP client. The tests run in the main environment and
talk HTTP or run scripts there, so the main suite never imports vLLM.

Where vLLM cannot be installed (``.venv-vllm.unavailable`` holds the reason) the tests skip, saying why; in
CI (``CI`` set) a missing vLLM environment is an error, not a skip.
"""

from __future__ import annotations

import fcntl
import http.client
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import tiny_serving

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 420
# A cache of 16 blocks of 32 tokens (1 KiB per token: 2 layers x K,V x 2 heads x 32 x fp32): a handful of
# concurrent requests fill it, so mixed batches get preempted. 64 tokens per step: long prompts are
# prefilled in chunks.
SERVER_ARGS = ["--served-model-name", "base", "--enforce-eager", "--dtype", "float32", "--max-model-len", "256",
               "--block-size", str(tiny_serving.BLOCK_SIZE), "--kv-cache-memory-bytes", str(16 * 32 * 1024),
               "--max-num-batched-tokens", "64", "--max-num-seqs", "8", "--uvicorn-log-level", "warning",
               "--api-key", "test-key"]
AUTH = {"Authorization": "Bearer test-key"}


def vllm_python() -> Path:
    """The vLLM environment's Python, or a skip (fail in CI) saying why there is none."""
    configured = os.environ.get("PREFIXATTN_VLLM_PYTHON")
    python = Path(configured) if configured else ROOT / ".venv-vllm" / "bin" / "python"
    if python.is_file():
        return python
    reason_file = ROOT / ".venv-vllm.unavailable"
    if reason_file.is_file():
        pytest.skip(f"vLLM cannot be installed here: {reason_file.read_text().strip()}")
    message = f"no vLLM environment at {python}: run `bash scripts/setup_vllm.sh`"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@dataclass(frozen=True)
class Server:
    url: str
    fixture: tiny_serving.Fixture
    log: Path | None = None  # what the server writes (stdout and stderr)

    def raw(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            timeout: float = 60) -> tuple[int, bytes]:
        """One request with exactly these headers (urllib would add a Content-Type of its own)."""
        host, port = self.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def post(self, path: str, body: dict, timeout: float = 120, key: bool = True) -> tuple[int, dict]:
        headers = {"Content-Type": "application/json", **(AUTH if key else {})}
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def stream(self, path: str, body: dict, timeout: float = 120) -> list[dict]:
        req = urllib.request.Request(self.url + path, data=json.dumps({**body, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json", **AUTH})
        events = []
        with urllib.request.urlopen(req, timeout=timeout) as r:
            assert r.status == 200
            assert r.headers.get("content-type", "").startswith("text/event-stream")
            for raw in r.read().decode().split("\n\n"):
                raw = raw.strip()
                if raw.startswith("data: ") and raw != "data: [DONE]":
                    events.append(json.loads(raw[6:]))
        return events

    def get(self, path: str, timeout: float = 30) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(urllib.request.Request(self.url + path, headers=AUTH),
                                        timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def metric(self, name: str) -> float:
        """Sum of a Prometheus counter over its labels."""
        _, text = self.get("/metrics")
        total = 0.0
        for line in text.decode().splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total


@contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a socket listening on ``port`` (Linux: /proc/net/tcp and tcp6)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, hex_port = local.split(":")
            if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(addr)
            # the kernel prints each 32-bit word in host order (little-endian here)
            words = [raw[i:i + 4][::-1] for i in range(0, len(raw), 4)]
            found.add(socket.inet_ntop(socket.AF_INET if width == 8 else socket.AF_INET6, b"".join(words)))
    return found


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
            return r.status == 200
    except Exception:
        return False


def start(python: Path, fixture: tiny_serving.Fixture, shared: Path, args: list[str] = SERVER_ARGS,
          log_name: str = "server.log", env: dict[str, str] | None = None) -> dict:
    port = _free_port()
    log = shared / log_name
    env = {**child_env(), **(env or {})}
    cmd = [str(python), "-m", "prefixattn", "serve", str(fixture.model_dir),
           *[a for p in fixture.prefix_args for a in ("--prefix", p)],
           "--port", str(port), *args]  # no --host: the default (127.0.0.1) is under test
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=shared,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while not healthy(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc.pid)
            tail = log.read_text()[-4000:]
            pytest.fail(f"prefixattn serve did not start (exit {proc.poll()}); log tail:\n{tail}")
        time.sleep(2)
    return {"pid": proc.pid, "url": url, "started_s": round(time.monotonic() - deadline + START_TIMEOUT_S, 1),
            "proc": proc, "log": str(log)}


def stop(pid: int) -> None:
    """Stop the server: SIGTERM to the command (it stops vLLM, which stops its engine and workers), then
    SIGKILL to whatever of its process group is left after 30 s."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:  # reap the command if this process started it: a zombie still counts as in the group
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def child_env() -> dict[str, str]:
    """The environment for vLLM processes: without the main suite's Triton interpreter and poisoning."""
    return {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PREFIXATTN_POISON")}
