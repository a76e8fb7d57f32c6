"""``prefixattn serve`` end to end: vLLM's server (in .venv-vllm) against transformers + prefixattn.

Greedy outputs are compared token for token, and their logprobs to 1e-3, with the reference of
``tiny_serving`` (the patched model, no KV cache). The cases the issue lists: mixed batches of different
prefixes and none, prefixes longer than a KV block (37 > 32), vLLM prefix-cache hits (whole and partial),
chunked prefill (64 tokens per step), preemption (a 16-block cache), prefixes of equal length (their
blocks must not be shared), every adapter kind, completions and chat, streamed or not; then the refused
requests, each answered 4xx with the server still serving.
"""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import tiny_serving

pytestmark = [pytest.mark.xdist_group("vllm_server"), pytest.mark.usefixtures("one_thread")]

NAMES = [None, "peft37", "file37", "same37", "bank8/0", "bank8/1", "proj5"]
MAX_TOKENS = 12


def tokens(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, tiny_serving.VOCAB) for _ in range(length)]


def complete(server, name, prompt, **extra):
    body = {"model": name or "base", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, "logprobs": 1, **extra}
    return server.post("/v1/completions", body)


def check_choice(choice, expected, what):
    ids, logprobs = expected
    assert choice["token_ids"] == ids, f"{what}: served {choice['token_ids']}, reference {ids}"
    served = choice["logprobs"]["token_logprobs"]
    worst = max(abs(a - b) for a, b in zip(served, logprobs, strict=True))
    assert worst < 1e-3, f"{what}: logprobs differ by {worst:.2e}"


def test_models_lists_every_name(server):
    status, body = server.get("/v1/models")

    cards = json.loads(body)["data"]
    assert status == 200
    assert [c["id"] for c in cards] == ["base", "peft37", "file37", "same37", "bank8/0", "bank8/1", "proj5"]
    assert all(c["parent"] == "base" for c in cards[1:])


def test_mixed_batch_equals_reference(server, reference):
    """Every prefix and the base at once, prompts of 1..150 tokens: concurrent requests share steps, long
    prompts are prefilled in chunks, and the small cache preempts some requests (checked)."""
    cases = [(name, tokens(100 + i, length)) for i, name in enumerate(NAMES) for length in (1, 45, 150)]
    preempted = server.metric("vllm:num_preemptions_total")
    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(lambda c: complete(server, *c), cases))
    for (name, prompt), (status, body) in zip(cases, results, strict=True):
        assert status == 200, body
        assert body["model"] == (name or "base")
        assert body["usage"]["prompt_tokens"] == len(prompt)
        assert body["choices"][0]["prompt_token_ids"] == prompt
        check_choice(body["choices"][0], reference.greedy(name, prompt, MAX_TOKENS), f"{name}, {len(prompt)}")
    assert server.metric("vllm:num_preemptions_total") > preempted, "the batch should have been preempted"
    # the prefix changes the output: a connector that wrote nothing would be caught above
    outputs = {name: reference.greedy(name, cases[3 * i + 1][1], MAX_TOKENS)[0] for i, name in enumerate(NAMES)}
    assert len({tuple(v) for k, v in outputs.items() if k != "same37"}) == len(NAMES) - 1


def test_prefix_cache_hits_are_exact(server, reference):
    """The same request again is served from vLLM's prefix cache (the prefix's slots included); another
    prompt with the same prefix reuses the prefix's first full block and writes only the rest."""
    prompt, other = tokens(7, 40), tokens(8, 20)
    hits = server.metric("vllm:prefix_cache_hits_total")
    for p in (prompt, prompt, other):
        status, body = complete(server, "peft37", p)
        assert status == 200, body
        check_choice(body["choices"][0], reference.greedy("peft37", p, MAX_TOKENS), "peft37 cached")
    assert server.metric("vllm:prefix_cache_hits_total") >= hits + 64


def test_equal_length_prefixes_never_share_blocks(server, reference):
    """file37 and peft37 have 37 tokens each: without distinct cache salts, the second would be handed the
    first one's cached blocks. same37 is file37's content under another name: sharing is right there."""
    prompt = tokens(9, 30)
    for name in ("file37", "peft37", "same37", "file37"):
        status, body = complete(server, name, prompt)
        assert status == 200, body
        check_choice(body["choices"][0], reference.greedy(name, prompt, MAX_TOKENS), name)
    assert reference.greedy("file37", prompt, MAX_TOKENS)[0] != reference.greedy("peft37", prompt, MAX_TOKENS)[0]


def test_user_cache_salt_and_n(server, reference):
    """n > 1 (vLLM fans one request out; greedy through top_k=1, since it refuses n > 1 at temperature 0) and
    a user's own cache salt (kept after the prefix's)."""
    prompt = tokens(10, 12)
    expected = reference.greedy("bank8/1", prompt, MAX_TOKENS)[0]
    status, body = complete(server, "bank8/1", prompt, cache_salt="tenant-a", n=2, temperature=1.0, top_k=1)
    assert status == 200, body
    assert [c["token_ids"] for c in body["choices"]] == [expected, expected]
    assert body["usage"]["prompt_tokens"] == len(prompt) and body["usage"]["completion_tokens"] == 2 * MAX_TOKENS


def test_text_prompt_and_streaming(server, reference):
    tok = tiny_serving.tokenizer()
    text = "Prefix tuning, served."
    ids = tok(text).input_ids  # what vLLM's renderer makes of it (the byte tokenizer appends </s>)
    expected = reference.greedy("proj5", ids, MAX_TOKENS)[0]
    status, body = complete(server, "proj5", text)
    assert status == 200, body
    assert body["choices"][0]["prompt_token_ids"] == ids and body["choices"][0]["token_ids"] == expected
    events = server.stream("/v1/completions", {"model": "proj5", "prompt": text, "max_tokens": MAX_TOKENS,
                                               "temperature": 0, "ignore_eos": True,
                                               "stream_options": {"include_usage": True}})
    assert all(e["model"] == "proj5" for e in events)
    assert "".join(c["text"] for e in events for c in e["choices"]) == body["choices"][0]["text"]
    assert events[-1]["usage"]["prompt_tokens"] == len(ids)
    texts = ["first", "and a second prompt"]  # a batch of prompts in one request: each after the placeholders
    status, body = complete(server, "bank8/0", texts)
    assert status == 200, body
    for choice in body["choices"]:
        ids = tok(texts[choice["index"]]).input_ids
        assert choice["prompt_token_ids"] == ids
        assert choice["token_ids"] == reference.greedy("bank8/0", ids, MAX_TOKENS)[0]
    assert body["usage"]["prompt_tokens"] == sum(len(tok(t).input_ids) for t in texts)


def test_chat_equals_reference(server, reference):
    tok = tiny_serving.tokenizer()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False).input_ids
    for name in ("peft37", "bank8/0", None):
        expected = reference.greedy(name, ids, MAX_TOKENS)[0]
        body = {"model": name or "base", "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0,
                "ignore_eos": True}
        status, out = server.post("/v1/chat/completions", {**body, "return_token_ids": True})
        assert status == 200, out
        assert out["model"] == (name or "base")
        assert out["prompt_token_ids"] == ids, "the chat prompt was rendered differently"
        assert out["choices"][0]["token_ids"] == expected, name
        assert out["usage"]["prompt_tokens"] == len(ids)
        events = server.stream("/v1/chat/completions", body)
        streamed = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
        assert streamed == out["choices"][0]["message"]["content"]
        assert all(e["model"] == (name or "base") for e in events)


BAD_REQUESTS = [
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "Served models: base, peft37"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "bank8/0"),
    ("/v1/completions", {"model": "peft37", "prompt": "x", "prompt_logprobs": 1}, 400, "prompt_logprobs"),
    ("/v1/completions", {"model": "peft37", "prompt": "x", "echo": True}, 400, "echo"),
    ("/v1/completions", {"model": "peft37", "prompt": "x", "use_beam_search": True, "n": 2}, 400, "beam"),
    ("/v1/completions", {"model": "peft37", "prompt": "x", "truncate_prompt_tokens": 3}, 400, "truncat"),
    ("/v1/completions", {"model": "peft37", "prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("/v1/completions", {"model": "peft37", "prompt": "x", "repetition_penalty": 1.3}, 400, "repetition_penalty"),
    ("/v1/completions", {"model": "peft37", "prompt": "x", "kv_transfer_params": {"a": 1}}, 400, "kv_transfer"),
    ("/v1/completions", {"model": "base", "prompt": "x", "kv_transfer_params": {"prefixattn": {"name": "peft37"}}},
     400, "set by the server"),
    ("/v1/completions", {"model": "base", "prompt": "x", "cache_salt": "prefixattn:0123"}, 400, "reserved"),
    ("/v1/completions", {"model": "peft37", "prompt": [], "max_tokens": 2}, 400, ""),
    ("/v1/completions", {"model": "peft37", "prompt": [5] * 250, "max_tokens": 10}, 400, ""),
    ("/v1/completions", {"model": "peft37", "prompt": [99999], "max_tokens": 2}, 400, ""),
    ("/v1/chat/completions", {"model": "peft37", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]}]}, 400, "text"),
    ("/tokenize", {"model": "peft37", "prompt": "x"}, 400, "served on"),
    ("/v1/completions", {"model": "peft37", "prompt": "x", "max_tokens": -1}, 400, ""),
]


def test_api_key_comes_first(server):
    """With --api-key, a client without the key gets vLLM's 401, not the served names or a refusal."""
    for body in ({"model": "nope", "prompt": "x"}, {"model": "peft37", "prompt": "x", "echo": True},
                 {"model": "peft37", "prompt": [5, 6], "max_tokens": 2}):
        assert server.post("/v1/completions", body, key=False)[0] == 401
    assert server.post("/v1/completions", {"model": "peft37", "prompt": [5, 6], "max_tokens": 2})[0] == 200


def test_bad_requests_are_refused_and_the_server_stays_up(server, reference):
    for path, body, status, fragment in BAD_REQUESTS:
        got, out = server.post(path, body)
        assert got == status, (path, body, got, out)
        assert fragment in out["error"]["message"], (body, out)
        # the next good request is served, exactly
        prompt = tokens(11, 9)
        ok, out = complete(server, "file37", prompt)
        assert ok == 200, (body, out)
        check_choice(out["choices"][0], reference.greedy("file37", prompt, MAX_TOKENS), f"after {body}")
    assert server.get("/health")[0] == 200
