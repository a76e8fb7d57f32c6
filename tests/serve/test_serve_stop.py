"""Stopping ``prefixattn serve`` with requests in flight, against the real server (each test starts its own:
the shared one must keep serving). SIGTERM: new requests get 503, a running request gets its whole answer,
one still running at ``--drain-timeout`` gets an error event, and the server exits. ``kill -9`` of the
``prefixattn serve`` process: vLLM and its engine exit within seconds and the run directory is removed."""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from serve_env import AUTH, SERVER_ARGS, healthy, start, stop, vllm_python

pytestmark = [pytest.mark.xdist_group("vllm_server"), pytest.mark.usefixtures("one_thread")]

DRAIN_S = 3.0
# the shared server's options, with room for a long answer and a cache that holds both requests (no preemption;
# 1 KiB per token). The long answer must outlast the drain on any machine: 500 tokens did not (a CI machine
# streamed them within the 3 s), 4000 would take 25 s at that speed.
MAX_MODEL_LEN = 4096
_LONGER = {"--max-model-len": str(MAX_MODEL_LEN), "--kv-cache-memory-bytes": str(160 * 32 * 1024)}
ARGS = [_LONGER.get(SERVER_ARGS[i - 1], a) if i else a for i, a in enumerate(SERVER_ARGS)] + [
    "--drain-timeout", str(DRAIN_S)]


def stream(url: str, body: dict, events: list, started: threading.Event) -> None:
    """A streamed completion; every event (parsed JSON, or the string "[DONE]") into ``events``."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                 {"Content-Type": "application/json", **AUTH})
    resp = conn.getresponse()
    events.append(resp.status)
    buffer = b""
    while chunk := resp.read1(65536):
        buffer += chunk
        *done, buffer = buffer.split(b"\n\n")
        for raw in done:
            if raw.startswith(b"data: "):
                events.append("[DONE]" if raw[6:] == b"[DONE]" else json.loads(raw[6:]))
                started.set()
    events.append("closed")
    started.set()


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def run_dir_of(pid: int) -> Path:
    """The run directory the launcher wrote, from vLLM's command line (its connector config)."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    config = json.loads(argv[argv.index(b"--kv-transfer-config") + 1])
    return Path(config["kv_connector_extra_config"]["manifest"])


@pytest.fixture
def own_server(serve_fixture, tmp_path):
    python = vllm_python()
    info = start(python, serve_fixture, tmp_path, ARGS)
    yield info
    stop(info["pid"])
    for pid in children(info["pid"]):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_sigterm_drains_requests_in_flight(own_server, reference):
    url, proc = own_server["url"], own_server["proc"]
    short, long_ = [], []
    short_started, long_started = threading.Event(), threading.Event()
    prompt = [5, 6, 7, 8]
    long_tokens = MAX_MODEL_LEN - len(prompt)
    threads = [
        threading.Thread(target=stream, args=(url, {"model": "base", "prompt": prompt, "max_tokens": long_tokens,
                                                    "temperature": 0, "ignore_eos": True,
                                                    "return_token_ids": True}, long_, long_started)),
        threading.Thread(target=stream, args=(url, {"model": "peft37", "prompt": prompt, "max_tokens": 24,
                                                    "temperature": 0, "ignore_eos": True,
                                                    "return_token_ids": True}, short, short_started))]
    threads[0].start()
    assert long_started.wait(60)
    threads[1].start()
    assert short_started.wait(60)
    stopped = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    host, port = url.removeprefix("http://").split(":")
    late = http.client.HTTPConnection(host, int(port), timeout=30)
    late.request("POST", "/v1/completions", json.dumps({"model": "base", "prompt": [5], "max_tokens": 2}),
                 {"Content-Type": "application/json", **AUTH})
    response = late.getresponse()
    assert response.status == 503, response.read()
    assert b"stopping" in response.read()
    for t in threads:
        t.join(60)
    # the running prefix request got its whole answer, exactly
    assert short[0] == 200 and short[-2:] == ["[DONE]", "closed"], short[-3:]
    ids = [t for e in short[1:-2] for c in e["choices"] for t in c.get("token_ids") or []]
    assert ids == reference.greedy("peft37", prompt, 24)[0]
    assert not any("error" in e for e in short[1:-2])
    # the long one was still running at the drain timeout: ended with an error event
    assert long_[0] == 200 and long_[-1] == "closed"
    tokens = sum(len(c.get("token_ids") or []) for e in long_[1:-1] if isinstance(e, dict)
                 for c in e.get("choices", []))
    assert tokens < long_tokens, "the long request finished within the drain: it should have outlasted it"
    assert long_[-3]["error"]["code"] == 503 and "drain timeout" in long_[-3]["error"]["message"], long_[-3:]
    assert long_[-2] == "[DONE]"
    assert proc.wait(60) == 0
    took = time.monotonic() - stopped
    assert took < DRAIN_S + 30, took
    log = Path(own_server["log"]).read_text()
    assert "prefixattn: SIGTERM: draining 2 requests in flight" in log
    print(f"SIGTERM to exit: {took:.1f} s (drain timeout {DRAIN_S} s); the long request cut at {tokens} tokens")


def test_kill_9_of_the_launcher_stops_vllm(own_server):
    launcher = own_server["pid"]
    (server,) = children(launcher)
    engine = children(server)
    assert engine, "vLLM's engine process"
    run_dir = run_dir_of(server)
    assert (run_dir / "manifest.json").is_file()
    os.kill(launcher, signal.SIGKILL)
    own_server["proc"].wait(10)
    killed = time.monotonic()
    while any(alive(p) for p in [server, *engine]) and time.monotonic() - killed < 30:
        time.sleep(0.2)
    took = time.monotonic() - killed
    assert not any(alive(p) for p in [server, *engine]), f"vLLM outlived prefixattn serve ({took:.0f} s)"
    assert took < 15, took
    assert not healthy(own_server["url"])
    assert not run_dir.exists(), "the run directory was left behind"
    print(f"kill -9 of the launcher: vLLM and its engine gone in {took:.1f} s")
