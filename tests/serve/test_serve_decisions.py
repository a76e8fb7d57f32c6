"""The server's decisions without vLLM (main environment): which HTTP requests are refused and how a prefix
request is rewritten (``admission``), and which engine requests the connector serves, how many prefix
slots it writes and where (``engine_requests``)."""

from __future__ import annotations

import json

import pytest

from prefixattn.serve.admission import (
    admit,
    context_message,
    error_body,
    prefixed_body,
    rewrite_result,
    rewrite_sse_event,
    with_prefix_models,
)
from prefixattn.serve.engine_requests import (
    EngineRequest,
    engine_request_problem,
    external_tokens,
    prefix_params,
    slot_mapping,
)
from prefixattn.serve.http_rules import has_key, key_hashes, may_be_json, media_type, needs_key
from prefixattn.serve.table import PrefixTable, TableEntry


@pytest.fixture
def table():
    entries = {n: TableEntry(n, p, d, f"/x/{n}", f"prefix.{i}")
               for i, (n, p, d) in enumerate([("a", 3, "d1"), ("b", 3, "d2"), ("bank/0", 5, "d3")])}
    return PrefixTable("base", "/m", 2, 2, 32, placeholder_token_id=0, entries=entries)


def decision(table, body, path="/v1/completions", penalty=None):
    return admit(path, body, table, penalty)


def test_base_requests_pass(table):
    for body in ({"prompt": "x"}, {"model": "base", "prompt": "x", "prompt_logprobs": 1, "echo": True},
                 {"model": "base", "cache_salt": "mine", "kv_transfer_params": {"other": 1}}):
        assert decision(table, body).action == "pass"
    assert decision(table, {"model": "base"}, "/tokenize").action == "pass"


def test_unknown_model_lists_the_served_names(table):
    d = decision(table, {"model": "c", "prompt": "x"})
    assert (d.action, d.status) == ("refuse", 404)
    assert "Served models: base, a, b, bank/0" in d.message
    body = json.loads(error_body(d.status, d.message, d.param))
    assert body["error"]["code"] == 404 and body["error"]["type"] == "NotFoundError"


@pytest.mark.parametrize("extra, field", [
    ({"prompt_logprobs": 0}, "prompt_logprobs"), ({"echo": True}, "echo"), ({"prompt_embeds": "e"}, "prompt_embeds"),
    ({"suffix": ""}, "suffix"), ({"truncate_prompt_tokens": 4}, "truncate_prompt_tokens"),
    ({"use_beam_search": True}, "use_beam_search"), ({"kv_transfer_params": {}}, "kv_transfer_params"),
    ({"repetition_penalty": 1.1}, "repetition_penalty"),
])
def test_what_a_prefix_cannot_serve_is_refused(table, extra, field):
    d = decision(table, {"model": "a", "prompt": "x", **extra})
    assert (d.action, d.status, d.param) == ("refuse", 400, field)
    assert "prefix `a`" in d.message
    ok = decision(table, {"model": "a", "prompt": "x", "echo": False, "prompt_logprobs": None,
                          "repetition_penalty": 1.0, "use_beam_search": False})
    assert ok.action == "prefix"


def test_model_default_repetition_penalty_is_refused(table):
    d = decision(table, {"model": "a", "prompt": "x"}, penalty=1.2)
    assert d.action == "refuse" and "the model's default" in d.message
    assert decision(table, {"model": "a", "prompt": "x", "repetition_penalty": 1.0}, penalty=1.2).action == "prefix"


def test_reserved_salt_and_params_are_refused_for_everyone(table):
    for model in ("base", "a"):
        assert decision(table, {"model": model, "cache_salt": "prefixattn:d1"}).param == "cache_salt"
        d = decision(table, {"model": model, "kv_transfer_params": {"prefixattn": {"name": "a"}}})
        assert d.action == "refuse" and "set by the server" in d.message
        assert decision(table, {"model": model, "vllm_xargs": {"kv_transfer_params": 1}}).action == "refuse"


def test_prefix_endpoints_and_chat_content(table):
    assert decision(table, {"model": "a", "prompt": "x"}, "/tokenize").status == 400
    assert decision(table, {"model": "a", "input": "x"}, "/v1/responses").status == 400
    text = [{"role": "user", "content": "hi"}, {"role": "user", "content": [{"type": "text", "text": "x"}]}]
    assert decision(table, {"model": "a", "messages": text}, "/v1/chat/completions").endpoint == "chat"
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]
    assert decision(table, {"model": "a", "messages": image}, "/v1/chat/completions").status == 400


def test_prefixed_bodies(table):
    d = decision(table, {"model": "a", "prompt": ["x", "y"], "cache_salt": "u"})
    new = prefixed_body({"model": "a", "prompt": ["x", "y"], "cache_salt": "u", "n": 1}, d, table, [[5, 6], [7]])
    assert new["model"] == "base" and new["n"] == 1
    assert new["prompt"] == [[0, 0, 0, 5, 6], [0, 0, 0, 7]]
    assert new["cache_salt"] == "prefixattn:d1:u"
    assert new["kv_transfer_params"] == prefix_params("a", table.entries["a"])
    d = decision(table, {"model": "bank/0", "messages": []}, "/v1/chat/completions")
    new = prefixed_body({"model": "bank/0", "messages": []}, d, table, [[9, 8]])
    assert new["kv_transfer_params"]["prompt_token_ids"] == [0] * 5 + [9, 8]
    assert new["cache_salt"] == "prefixattn:d3" and "prompt" not in new
    with pytest.raises(ValueError):
        prefixed_body({}, d, table, [[1], [2]])


def test_responses_are_rewritten_back():
    body = {"model": "base", "choices": [{"prompt_token_ids": [0, 0, 0, 5], "text": "t"}],
            "usage": {"prompt_tokens": 10, "total_tokens": 14, "completion_tokens": 4}}
    out = rewrite_result(body, "a", 3, 2)
    assert out["model"] == "a" and out["choices"][0]["prompt_token_ids"] == [5]
    assert out["usage"] == {"prompt_tokens": 4, "total_tokens": 8, "completion_tokens": 4}
    chat = rewrite_result({"model": "base", "prompt_token_ids": [0, 0, 0, 1, 2]}, "a", 3, 1)
    assert chat["prompt_token_ids"] == [1, 2]
    event = b'data: {"model":"base","choices":[]}'
    assert json.loads(rewrite_sse_event(event, "a", 3, 1)[6:])["model"] == "a"
    assert rewrite_sse_event(b"data: [DONE]", "a", 3, 1) == b"data: [DONE]"
    assert rewrite_sse_event(b": keep-alive", "a", 3, 1) == b": keep-alive"
    error = b'data: {"error": {"message": "m"}}'
    assert json.loads(rewrite_sse_event(error, "a", 3, 1)[6:]) == {"error": {"message": "m"}}


def test_models_list_gets_a_card_per_prefix(table):
    models = {"object": "list", "data": [{"id": "base", "root": "/m", "parent": None, "max_model_len": 99}]}
    out = with_prefix_models(models, table)
    assert [c["id"] for c in out["data"]] == ["base", "a", "b", "bank/0"]
    # a prefix's context: the model's less its P tokens (bank/0 has 5)
    assert out["data"][3] == {"id": "bank/0", "root": "/x/bank/0", "parent": "base", "max_model_len": 94,
                              "owned_by": "prefixattn"}
    assert out["data"][1]["max_model_len"] == 96


def test_context_message_counts_the_users_tokens():
    message = context_message("a", 96, 99, 3, 120, at_least=True)
    assert "context length of `a` is 96 tokens (the model's 99 less the prefix's 3)" in message
    assert "contains at least 120 input tokens" in message and "at most 95 prompt tokens" in message


def test_media_types_parse_as_http_says():
    for header in (b"application/json", b"Application/JSON", b"application/json; charset=utf-8",
                   "APPLICATION/JSON ; Charset=UTF-8"):
        assert media_type(header) == "application/json"
    assert media_type(None) == "" and media_type(b"text/event-stream; charset=utf-8") == "text/event-stream"
    # every body vLLM may read as JSON is inspected: no header, any case, +json, even text/plain
    for header in (None, b"Application/JSON", b"application/vnd.api+json", b"text/plain"):
        assert may_be_json(header)
    assert not may_be_json(b"multipart/form-data; boundary=x") and not may_be_json(
        b"Application/X-WWW-Form-Urlencoded")


def test_every_route_but_health_needs_the_key():
    for path, method in (("/invocations", "POST"), ("/tokenize", "POST"), ("/metrics", "GET"), ("/version", "GET"),
                         ("/docs", "GET"), ("/openapi.json", "GET"), ("/v1/models", "GET"), ("/", "GET")):
        assert needs_key(path, method), path
    assert not needs_key("/health", "GET") and not needs_key("/ping", "POST") and not needs_key("/health/", "GET")
    assert not needs_key("/v1/models", "OPTIONS")  # CORS preflight: no credentials, answered by CORS
    assert needs_key("/api/health", "GET", root_path="") and not needs_key("/api/health", "GET", root_path="/api")
    hashes = key_hashes(["k1", None, "k2"])
    assert len(hashes) == 2
    assert has_key(b"Bearer k1", hashes) and has_key("bearer k2", hashes)
    for header in (None, b"", b"k1", b"Bearer k3", b"Basic k1", b"Bearer k1x"):
        assert not has_key(header, hashes), header


def engine_request(table, name="a", ids=None, salt=None, **kw):
    entry = table.entries.get(name)
    params = prefix_params(name, entry) if entry else {"prefixattn": {"name": name, "digest": "?"}}
    return EngineRequest(prompt_token_ids=ids if ids is not None else [0, 0, 0, 7, 8],
                         cache_salt=salt if salt is not None else (entry.salt if entry else None),
                         kv_transfer_params=params, prompt_logprobs=kw.get("prompt_logprobs", False),
                         repetition_penalty=kw.get("repetition_penalty", 1.0))


def test_engine_requests_the_connector_serves(table):
    entry, problem = engine_request_problem(engine_request(table), table)
    assert entry is table.entries["a"] and problem is None
    assert engine_request_problem(engine_request(table, salt="prefixattn:d1:user"), table)[1] is None
    base = EngineRequest([1, 2], None, None, False, 1.0)
    assert engine_request_problem(base, table) == (None, None)


@pytest.mark.parametrize("change, fragment", [
    ({"name": "zz"}, "no served prefix"),
    ({"ids": [0, 0, 0]}, "no tokens after"),
    ({"ids": [0, 4, 0, 7]}, "placeholder tokens"),
    ({"salt": "prefixattn:d2"}, "cache_salt must start"),
    ({"salt": ""}, "cache_salt must start"),
    ({"prompt_logprobs": True}, "prompt logprobs"),
    ({"repetition_penalty": 1.5}, "repetition_penalty"),
])
def test_engine_requests_the_connector_fails(table, change, fragment):
    entry, problem = engine_request_problem(engine_request(table, **change), table)
    assert entry is None and fragment in problem


def test_engine_request_params_are_checked(table):
    for params in ({"prefixattn": "a"}, {"prefixattn": {"name": 3}}, {"prefixattn": {"name": "a", "digest": "x"}}):
        req = EngineRequest([0, 0, 0, 1], "prefixattn:d1", params, False, 1.0)
        assert engine_request_problem(req, table)[1] is not None
    reserved = EngineRequest([1], "prefixattn:d1", None, False, 1.0)
    assert "reserved" in engine_request_problem(reserved, table)[1]


def test_external_tokens_and_slots():
    assert [external_tokens(37, c) for c in (0, 32, 36, 37, 64)] == [37, 5, 1, 0, 0]
    blocks, size = [7, 2, 9], 4
    slots = slot_mapping(blocks, size, 3, 10)
    assert slots == [blocks[t // size] * size + t % size for t in range(3, 10)] == [31, 8, 9, 10, 11, 36, 37]
    assert slot_mapping(blocks, size, 5, 5) == []
    with pytest.raises(ValueError):
        slot_mapping(blocks, size, 0, 13)
