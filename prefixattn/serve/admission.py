"""The HTTP side's decisions, without vLLM: which requests name a prefix, which are refused (and why),
the body a prefix request is rewritten to, and the response rewritten back.

Every served name is a model name: the base model under its own, each prefix under its own. A request for
a prefix is rewritten to a request for the base model whose prompt starts with P placeholder tokens, with
``kv_transfer_params`` naming the prefix (the KV connector writes the prefix into the placeholders' cache
slots) and the prefix's ``cache_salt``; its response gets the prefix's name back and the placeholders
taken out of the token counts.

Refused with a 4xx before the engine sees them (the engine survives every request; a refused request
never runs silently wrong):

- an unknown model name (404, listing the served names);
- for a prefix: endpoints other than completions and chat completions; prompt logprobs and echo (vLLM
  computes prompt logprobs without the KV connector, and echo returns the prompt); prompt embeddings,
  suffix (fill-in-the-middle), truncate_prompt_tokens (they change the prompt after the placeholders are
  counted); beam search (it builds its own requests without the prefix); a repetition penalty other than
  1 (it would count the placeholders as prompt text; this includes a model default from
  generation_config.json); non-text chat content; a user's own kv_transfer_params;
- for any request: a cache_salt starting with the reserved ``prefixattn:`` (it could read a prefix's
  cached blocks) or kv_transfer_params naming a prefix (only the server sets them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .engine_requests import PARAMS_KEY, prefix_params, requested_prefix
from .table import RESERVED_SALT, PrefixTable, TableEntry

ENDPOINTS = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}

# Request fields refused for a prefix: field -> (is it set?, why it cannot be served)
_REFUSED_FIELDS: dict[str, tuple[Any, str]] = {
    "prompt_logprobs": (lambda v: v is not None,
                        "vLLM computes prompt logprobs without the KV connector, so they would read the "
                        "placeholder tokens as text"),
    "echo": (bool, "echo returns the prompt, which carries the prefix's placeholder tokens"),
    "prompt_embeds": (lambda v: v is not None, "a prefix needs token prompts (it adds placeholder tokens)"),
    "suffix": (lambda v: v is not None, "fill-in-the-middle rendering is not supported with a prefix"),
    "truncate_prompt_tokens": (lambda v: v is not None,
                               "truncation would cut into the prefix's placeholder tokens"),
    "use_beam_search": (bool, "beam search builds its own engine requests, which would not carry the prefix"),
    "kv_transfer_params": (lambda v: v is not None, "the server sets kv_transfer_params for a prefix"),
}


@dataclass(frozen=True)
class Decision:
    """``action``: "pass" (to vLLM as it is), "refuse" (answer ``status`` with ``message``), or "prefix"
    (serve ``entry``: render the prompt, then ``prefixed_body``)."""

    action: str
    status: int = 200
    message: str = ""
    param: str | None = None
    entry: TableEntry | None = None
    endpoint: str = ""


def error_body(status: int, message: str, param: str | None = None) -> bytes:
    """vLLM's (and OpenAI's) error object."""
    kind = {400: "BadRequestError", 404: "NotFoundError"}.get(status, "BadRequestError")
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": status}}).encode()


def _refuse(status: int, message: str, param: str | None = None) -> Decision:
    return Decision("refuse", status, message, param)


def _text_only(messages: Any) -> bool:
    if not isinstance(messages, list):
        return True  # vLLM's own validation answers malformed messages
    for msg in messages:
        content = msg.get("content") if isinstance(msg, dict) else None
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            return False
        for part in content:
            if not (isinstance(part, dict) and part.get("type", "text") == "text"
                    and set(part) <= {"type", "text"}):
                return False
    return True


def admit(path: str, body: dict[str, Any], table: PrefixTable,
          default_repetition_penalty: float | None = None) -> Decision:
    """What to do with a JSON request body posted to ``path``."""
    salt = body.get("cache_salt")
    if isinstance(salt, str) and salt.startswith(RESERVED_SALT):
        return _refuse(400, f"cache_salt values starting with {RESERVED_SALT!r} are reserved for the "
                       "server's prefixes", "cache_salt")
    if requested_prefix(body.get("kv_transfer_params")) is not None:
        return _refuse(400, f"kv_transfer_params[{PARAMS_KEY!r}] is set by the server; choose a prefix with "
                       "the model name", "kv_transfer_params")
    xargs = body.get("vllm_xargs")
    if isinstance(xargs, dict) and "kv_transfer_params" in xargs:
        return _refuse(400, "kv_transfer_params cannot be passed through vllm_xargs", "vllm_xargs")
    model = body.get("model")
    if not isinstance(model, str) or model == table.base_name:
        return Decision("pass")
    entry = table.entries.get(model)
    if entry is None:
        return _refuse(404, f"The model `{model}` does not exist. Served models: "
                       f"{', '.join(table.served_names)}", "model")
    endpoint = ENDPOINTS.get(path)
    if endpoint is None:
        return _refuse(400, f"prefix `{model}` is served on {' and '.join(ENDPOINTS)} only", "model")
    for name, (is_set, why) in _REFUSED_FIELDS.items():
        if name in body and is_set(body[name]):
            return _refuse(400, f"`{name}` is not supported for prefix `{model}`: {why}", name)
    penalty = body.get("repetition_penalty")
    if penalty is None:
        penalty = default_repetition_penalty
    if penalty is not None and float(penalty) != 1.0:
        source = "" if body.get("repetition_penalty") is not None else " (the model's default)"
        return _refuse(400, f"repetition_penalty {penalty}{source} is not supported for prefix `{model}`: it "
                       "would count the prefix's placeholder tokens as prompt text; pass 1.0",
                       "repetition_penalty")
    if endpoint == "chat" and not _text_only(body.get("messages")):
        return _refuse(400, f"prefix `{model}` takes text chat messages only", "messages")
    return Decision("prefix", entry=entry, endpoint=endpoint)


def prefixed_body(body: dict[str, Any], decision: Decision, table: PrefixTable,
                  prompts: list[list[int]]) -> dict[str, Any]:
    """The request vLLM runs for a prefix: the base model, each rendered prompt (token ids) after P
    placeholders, the prefix named in kv_transfer_params, its salt."""
    entry = decision.entry
    assert entry is not None
    placeholders = [table.placeholder_token_id] * entry.num_tokens
    new = dict(body)
    new["model"] = table.base_name
    params = prefix_params(entry.name, entry)
    if decision.endpoint == "completion":
        new["prompt"] = [placeholders + list(ids) for ids in prompts]
    else:
        if len(prompts) != 1:
            raise ValueError(f"a chat request renders to one prompt, got {len(prompts)}")
        # vLLM's decode-side token reuse: the engine takes these ids instead of templating the messages
        params["prompt_token_ids"] = placeholders + list(prompts[0])
    new["kv_transfer_params"] = params
    new["cache_salt"] = entry.cache_salt(body.get("cache_salt"))
    return new


def rewrite_result(obj: Any, name: str, num_placeholders: int, num_prompts: int) -> Any:
    """A response object (or one streamed chunk) of a prefix request as the client should see it: the
    prefix's model name, token counts and ids without the placeholders."""
    if not isinstance(obj, dict):
        return obj
    if "model" in obj:
        obj["model"] = name
    usage = obj.get("usage")
    if isinstance(usage, dict):
        for key in ("prompt_tokens", "total_tokens"):
            if isinstance(usage.get(key), int):
                usage[key] -= num_placeholders * num_prompts
    holders = [obj, *[c for c in obj.get("choices") or [] if isinstance(c, dict)]]
    for holder in holders:
        ids = holder.get("prompt_token_ids")
        if isinstance(ids, list):
            holder["prompt_token_ids"] = ids[num_placeholders:]
    return obj


def rewrite_sse_event(event: bytes, name: str, num_placeholders: int, num_prompts: int) -> bytes:
    """One server-sent event (``data: {...}``) of a streamed prefix response, rewritten."""
    lines = event.split(b"\n")
    for i, line in enumerate(lines):
        if line.startswith(b"data: ") and line[6:].strip() not in (b"[DONE]", b""):
            try:
                obj = json.loads(line[6:])
            except ValueError:
                continue
            lines[i] = b"data: " + json.dumps(rewrite_result(obj, name, num_placeholders, num_prompts),
                                              separators=(",", ":")).encode()
    return b"\n".join(lines)


def context_message(name: str, limit: int, max_model_len: int, num_prefix_tokens: int, prompt_tokens: int,
                    at_least: bool = False) -> str:
    """A prompt too long for a prefix, in the user's tokens: the prefix's context is the model's less its
    P placeholder tokens, and the output needs at least one position of it."""
    return (f"The maximum context length of `{name}` is {limit} tokens (the model's {max_model_len} less "
            f"the prefix's {num_prefix_tokens}). However, your prompt contains {'at least ' * at_least}"
            f"{prompt_tokens} input tokens, which leaves no room for output tokens (at most {limit - 1} "
            "prompt tokens). Please reduce the length of the input prompt.")


def with_prefix_models(models: Any, table: PrefixTable, max_model_len: int | None = None) -> Any:
    """/v1/models with a card for every prefix next to the base model's; a prefix's ``max_model_len`` is
    the model's less its P tokens (what is left for the prompt and the output)."""
    if not isinstance(models, dict) or not isinstance(models.get("data"), list):
        return models
    base = next((m for m in models["data"] if isinstance(m, dict) and m.get("id") == table.base_name), None)
    if base is None:
        return models
    for entry in table.entries.values():
        card = {**base, "id": entry.name, "root": entry.source, "parent": table.base_name,
                "owned_by": "prefixattn"}
        total = base.get("max_model_len", max_model_len)
        if isinstance(total, int):
            card["max_model_len"] = total - entry.num_tokens
        models["data"].append(card)
    return models
