"""``prefixattn serve`` as a production user meets it, against the shared real server (started with
``--api-key test-key``, no ``--host``, ``--max-model-len 256``): the bind address, the API key on every
route, media types as HTTP defines them, each prefix's own context limit, refusals in the log."""

from __future__ import annotations

import json
import time

import pytest
from serve_env import AUTH, listening_addresses

pytestmark = [pytest.mark.xdist_group("vllm_server"), pytest.mark.usefixtures("one_thread")]

MAX_MODEL_LEN = 256  # serve_env.SERVER_ARGS
PREFIX_TOKENS = {"peft37": 37, "file37": 37, "same37": 37, "bank8/0": 8, "bank8/1": 8, "proj5": 5}
# Routes vLLM's server has that its schema leaves out, or that matter most
EXTRA_ROUTES = [("GET", "/metrics"), ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/version"),
                ("POST", "/invocations"), ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/v1/models"),
                ("GET", "/load"), ("GET", "/server_info"), ("POST", "/reset_prefix_cache"), ("GET", "/redoc")]
OPEN_ROUTES = {"/health", "/ping"}


def test_listens_on_localhost_only_by_default(server):
    """Started without --host; vLLM's own default is every interface (0.0.0.0)."""
    port = int(server.url.rsplit(":", 1)[1])
    assert listening_addresses(port) == {"127.0.0.1"}


def every_route(server) -> list[tuple[str, str]]:
    status, body = server.get("/openapi.json")
    assert status == 200
    routes = set(EXTRA_ROUTES)
    for path, methods in json.loads(body)["paths"].items():
        for method in methods:
            routes.add((method.upper(), path.replace("{", "").replace("}", "")))  # {id} -> id
    return sorted(routes)


def test_every_route_but_health_needs_the_key(server):
    """Route by route (every route of vLLM's schema and those it leaves out): without the key or with a
    wrong one, 401 before anything runs; the health checks stay open. vLLM's own check guards /v1 only."""
    body = json.dumps({"model": "nope", "prompt": "x", "tokens": [5]}).encode()
    routes = every_route(server)
    checked = []
    for method, path in routes:
        if path in OPEN_ROUTES:
            continue
        for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": "test-key"}):
            status, out = server.raw(method, path, body if method == "POST" else None,
                                     {"Content-Type": "application/json", **headers})
            assert status == 401, (method, path, headers, status, out[:300])
            assert b"nope" not in out and b"peft37" not in out
        checked.append((method, path))
    assert len(checked) >= 20, checked
    for path in ("/invocations", "/tokenize", "/metrics", "/version", "/docs", "/openapi.json"):
        assert any(p == path for _, p in checked), path
    for path in sorted(OPEN_ROUTES):
        assert server.raw("GET", path)[0] == 200, path
    # with the key: the routes answer (the served names only to a caller with the key)
    for method, path, expected in (("GET", "/version", 200), ("GET", "/metrics", 200), ("GET", "/docs", 200)):
        assert server.raw(method, path, headers=AUTH)[0] == expected, path
    status, out = server.raw("POST", "/tokenize", json.dumps({"model": "nope", "prompt": "x"}).encode(),
                             {"Content-Type": "application/json", **AUTH})
    assert status == 404 and b"peft37" in out
    status, out = server.raw("POST", "/invocations", json.dumps({"prompt": "x", "max_tokens": 1}).encode(),
                             {"Content-Type": "application/json"})
    assert status == 401


@pytest.mark.parametrize("content_type", ["Application/JSON", "application/json; charset=utf-8",
                                          "APPLICATION/JSON ; Charset=UTF-8", None])
def test_media_types_parse_as_http_says(server, reference, content_type):
    """``Application/JSON`` and parameters (vLLM accepts them), or no Content-Type at all (FastAPI parses JSON
    then): a prefix is served exactly, and what the middleware refuses is refused (never a 500)."""
    headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
    prompt = [7, 8, 9, 10, 11]
    status, out = server.raw("POST", "/v1/completions", json.dumps(
        {"model": "peft37", "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
         "return_token_ids": True}).encode(), headers)
    if content_type is None:  # vLLM refuses a body without a media type (400); never a 500
        assert status in (200, 400), out
    else:
        assert status == 200, out
    if status == 200:
        body = json.loads(out)
        assert body["model"] == "peft37" and body["usage"]["prompt_tokens"] == len(prompt)
        assert body["choices"][0]["token_ids"] == reference.greedy("peft37", prompt, 6)[0]
    for request, code, fragment in (
            ({"model": "base", "prompt": "x", "cache_salt": "prefixattn:0123"}, 400, "reserved"),
            ({"model": "nope", "prompt": "x"}, 404, "Served models"),
            ({"model": "peft37", "prompt": "x", "echo": True}, 400, "echo")):
        status, out = server.raw("POST", "/v1/completions", json.dumps(request).encode(), headers)
        assert status == code, (request, status, out)
        assert fragment in json.loads(out)["error"]["message"]


def test_each_prefix_card_shows_its_own_context(server):
    _, body = server.get("/v1/models")
    cards = {c["id"]: c for c in json.loads(body)["data"]}
    assert cards["base"]["max_model_len"] == MAX_MODEL_LEN
    for name, p in PREFIX_TOKENS.items():
        assert cards[name]["max_model_len"] == MAX_MODEL_LEN - p, name


def test_limits_speak_of_the_users_tokens(server):
    """peft37's context is 256 - 37 = 219 tokens: a 218-token prompt leaves one output token (as the base
    model with a 219-token context would: vLLM shortens max_tokens to what is left), 219 tokens none."""
    limit = MAX_MODEL_LEN - 37
    status, out = server.post("/v1/completions", {"model": "peft37", "prompt": [5] * (limit - 1), "max_tokens": 5,
                                                  "temperature": 0, "ignore_eos": True})
    assert status == 200, out
    assert out["usage"] == {**out["usage"], "prompt_tokens": limit - 1, "completion_tokens": 1}
    assert out["choices"][0]["finish_reason"] == "length"
    for n, fragment in ((limit, f"contains {limit} input tokens"), (300, "contains 300 input tokens")):
        status, out = server.post("/v1/completions", {"model": "peft37", "prompt": [5] * n, "max_tokens": 5})
        assert status == 400, out
        message = out["error"]["message"]
        assert f"maximum context length of `peft37` is {limit} tokens" in message, message
        assert fragment in message and "(the model's 256 less the prefix's 37)" in message, message
    status, out = server.post("/v1/chat/completions", {"model": "bank8/0", "max_tokens": 2, "messages": [
        {"role": "user", "content": "y" * 260}]})
    assert status == 400 and "`bank8/0` is 248 tokens" in out["error"]["message"], out


def test_refusals_are_logged_with_their_reason(server):
    assert server.log is not None
    marker = f"log-marker-{time.time_ns()}"
    status, _ = server.post("/v1/completions", {"model": marker, "prompt": "x"})
    assert status == 404
    status, _ = server.post("/v1/completions", {"model": "peft37", "prompt": "x", "echo": True})
    assert status == 400
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        log = server.log.read_text()
        if marker in log:
            break
        time.sleep(0.2)
    assert f"refused POST /v1/completions (404): The model `{marker}` does not exist" in log
    assert "refused POST /v1/completions (400): `echo` is not supported for prefix `peft37`" in log
