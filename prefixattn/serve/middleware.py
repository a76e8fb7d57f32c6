"""The HTTP half of prefix serving: an ASGI middleware that vLLM's OpenAI server loads with
``--middleware prefixattn.serve.middleware.PrefixMiddleware`` (``prefixattn serve`` passes it).

For every JSON POST it asks ``admission.admit`` what to do. A request for a prefix is rendered to token ids
by vLLM's own renderer (the chat template, special tokens and tokenizer the base model would use), then
rewritten (``admission.prefixed_body``) and handed on; its response, whole or streamed, is rewritten back
(``admission.rewrite_result``). ``GET /v1/models`` gets a card for every prefix (its context: the model's
less the prefix's P tokens). Everything refused is answered here with a 4xx, logged with its reason, so
the engine never sees it. The table of prefixes comes from the run directory named by the environment
variable ``PREFIXATTN_SERVE_MANIFEST``.

In front of that, for every request: with an API key set, the key on every route but the health checks
(``http_rules``; vLLM's own check leaves most routes open), and the clean stop (``drain``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Awaitable, Callable
from typing import Any

from vllm import envs
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.logger import init_logger
from vllm.renderers.chat_utils import has_non_text_content

from .admission import (
    Decision,
    admit,
    context_message,
    error_body,
    prefixed_body,
    rewrite_result,
    rewrite_sse_event,
    with_prefix_models,
)
from .drain import DEFAULT_DRAIN_TIMEOUT_S, ENV_DRAIN_TIMEOUT, Drain
from .http_rules import has_key, key_hashes, may_be_json, media_type, needs_key
from .table import ENV_MANIFEST, ENV_OWNED_RUN_DIR, PrefixTable

logger = init_logger("vllm.prefixattn.serve")  # under vLLM's logger: its handler and level (INFO) apply

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def _header(scope_or_message: dict[str, Any], name: bytes) -> bytes:
    for key, value in scope_or_message.get("headers") or []:
        if key.lower() == name:
            return value
    return b""


def _with_length(headers: list[tuple[bytes, bytes]], length: int) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in headers if k.lower() != b"content-length"] + [
        (b"content-length", str(length).encode())]


async def _respond(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _error_message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except Exception:
        return body[:300].decode("utf-8", "replace")


async def _refuse(scope: Scope, send: Send, status: int, body: bytes) -> None:
    """Answer a refused request, and log it with its reason."""
    logger.info("prefixattn: refused %s %s (%d): %s", scope.get("method"), scope.get("path"), status,
                _error_message(body))
    await _respond(send, status, body)


class _Rewriter:
    """Wraps ``send``: a 200 JSON response is rewritten whole, an event stream event by event."""

    def __init__(self, send: Send, rewrite_json: Callable[[Any], Any],
                 rewrite_event: Callable[[bytes], bytes] | None = None) -> None:
        self.send, self.rewrite_json, self.rewrite_event = send, rewrite_json, rewrite_event
        self.start: Message | None = None
        self.mode = "pass"
        self.buffer = b""

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            ctype = _header(message, b"content-type")
            if message["status"] != 200:
                self.mode = "pass"
            elif ctype.startswith(b"text/event-stream") and self.rewrite_event is not None:
                self.mode = "events"
            elif ctype.startswith(b"application/json"):
                self.mode, self.start = "json", message
                return
            await self.send(message)
            return
        if message["type"] != "http.response.body" or self.mode == "pass":
            await self.send(message)
            return
        self.buffer += message.get("body", b"")
        more = message.get("more_body", False)
        if self.mode == "json":
            if more:
                return
            try:
                body = json.dumps(self.rewrite_json(json.loads(self.buffer))).encode()
            except ValueError:
                body = self.buffer
            assert self.start is not None
            headers = _with_length(self.start.get("headers") or [], len(body))
            await self.send({**self.start, "headers": headers})
            await self.send({"type": "http.response.body", "body": body})
            return
        assert self.rewrite_event is not None
        *events, self.buffer = self.buffer.split(b"\n\n")
        out = b"".join(self.rewrite_event(e) + b"\n\n" for e in events)
        if not more:
            out, self.buffer = out + self.buffer, b""
        if out or not more:
            await self.send({"type": "http.response.body", "body": out, "more_body": more})


class PrefixMiddleware:
    """Serves every prefix of the table under its own model name (see the module docstring)."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app
        manifest = os.environ.get(ENV_MANIFEST)
        if not manifest:
            raise RuntimeError(f"PrefixMiddleware needs {ENV_MANIFEST} (the run directory `prefixattn serve` "
                               "writes)")
        self.table = PrefixTable.read(manifest)
        self._default_penalty: float | None | bool = False  # False: not read yet
        self._key_hashes: list[bytes] | None = None  # read from the app at the first request
        self.drain = Drain(float(os.environ.get(ENV_DRAIN_TIMEOUT, DEFAULT_DRAIN_TIMEOUT_S)))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self.app(scope, self._lifespan_receive(scope, receive), send)
            return
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if self._key_hashes is None:
            self._key_hashes = self._server_keys(scope.get("app"))
        path, method, root = scope.get("path", ""), scope.get("method"), scope.get("root_path", "")
        if self._key_hashes and needs_key(path, method, root):
            if not has_key(_header(scope, b"authorization"), self._key_hashes):
                await self._unauthorized(scope, send)
                return
        if kind == "websocket":
            await self.app(scope, receive, send)
            return
        await self.drain.run(lambda r, s: self._handle(scope, r, s), receive, send)

    def _lifespan_receive(self, scope: Scope, receive: Receive) -> Receive:
        """At start-up: take over the stop signals (``drain``); at shutdown: remove the run directory when
        this server owns it (so a launcher killed with SIGKILL leaves none behind)."""

        async def wrapped() -> Message:
            message = await receive()
            if message.get("type") == "lifespan.startup":
                self.drain.install(scope.get("app"))
            elif message.get("type") == "lifespan.shutdown":
                owned = os.environ.get(ENV_OWNED_RUN_DIR)
                if owned and owned == self.table.run_dir:
                    shutil.rmtree(owned, ignore_errors=True)
            return message

        return wrapped

    @staticmethod
    def _server_keys(app: Any) -> list[bytes]:
        """The server's API keys (``--api-key``, else ``VLLM_API_KEY``), hashed."""
        args = getattr(getattr(app, "state", None), "args", None)
        return key_hashes(getattr(args, "api_key", None) or [envs.VLLM_API_KEY])

    @staticmethod
    async def _unauthorized(scope: Scope, send: Send) -> None:
        logger.info("prefixattn: refused %s %s (401): no valid API key", scope.get("method", "WEBSOCKET"),
                    scope.get("path"))
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "Unauthorized"})
            return
        await _respond(send, 401, json.dumps({"error": "Unauthorized"}).encode())

    def _repetition_penalty_default(self, app: Any) -> float | None:
        if self._default_penalty is False:
            try:
                defaults = app.state.vllm_config.model_config.get_diff_sampling_param()
                self._default_penalty = defaults.get("repetition_penalty")
            except Exception as e:
                logger.warning("prefixattn: cannot read the model's default sampling parameters: %r", e)
                self._default_penalty = None
        return self._default_penalty  # type: ignore[return-value]

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope.get("method"), scope.get("path", "")
        if method == "GET" and path.rstrip("/") == "/v1/models":
            max_len = self._max_model_len(scope.get("app"))
            await self.app(scope, receive,
                           _Rewriter(send, lambda obj: with_prefix_models(obj, self.table, max_len)))
            return
        if method != "POST" or not may_be_json(_header(scope, b"content-type") or None):
            await self.app(scope, receive, send)
            return
        body, disconnected = await self._read_body(receive)
        if disconnected:
            return
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if not isinstance(data, dict):  # vLLM answers malformed JSON itself
            await self.app(scope, self._replay(body, receive), send)
            return
        if media_type(_header(scope, b"content-type")) == "application/json":
            # vLLM compares the header's text before ";" (lowercased) with "application/json": the
            # whitespace HTTP allows before parameters would get a 400
            headers = [(k, v) for k, v in scope.get("headers") or [] if k.lower() != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        app = scope.get("app")
        decision = admit(path, data, self.table, self._repetition_penalty_default(app))
        if decision.action == "refuse":
            body = error_body(decision.status, decision.message, decision.param)
            await _refuse(scope, send, decision.status, body)
            return
        if decision.action == "pass":
            await self.app(scope, self._replay(body, receive), send)
            return
        try:
            prompts = await self._render(app, decision, data)
            self._check_length(decision, prompts, self._max_model_len(app))
        except _Refused as e:
            await _refuse(scope, send, e.status, e.body)
            return
        new = json.dumps(prefixed_body(data, decision, self.table, prompts)).encode()
        scope = {**scope, "headers": _with_length(list(scope.get("headers") or []), len(new))}
        entry = decision.entry
        assert entry is not None
        P, n = entry.num_tokens, len(prompts)
        rewriter = _Rewriter(send, lambda obj: rewrite_result(obj, entry.name, P, n),
                             lambda ev: rewrite_sse_event(ev, entry.name, P, n))
        await self.app(scope, self._replay(new, receive), rewriter)

    @staticmethod
    def _max_model_len(app: Any) -> int | None:
        try:
            return int(app.state.vllm_config.model_config.max_model_len)
        except Exception:
            return None

    @staticmethod
    def _check_length(decision: Decision, prompts: list[list[int]], max_model_len: int | None) -> None:
        """A prompt that leaves no room for output in the prefix's context (the model's less P), refused
        in the user's tokens (vLLM would count the placeholders in its message)."""
        entry = decision.entry
        assert entry is not None
        if max_model_len is None:
            return
        limit = max_model_len - entry.num_tokens
        longest = max(len(p) for p in prompts)
        if longest >= limit:
            raise _Refused(400, error_body(400, context_message(entry.name, limit, max_model_len,
                                                                entry.num_tokens, longest), "input_tokens"),
                           raw=True)

    @staticmethod
    async def _read_body(receive: Receive) -> tuple[bytes, bool]:
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", True
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        return b"".join(chunks), False

    @staticmethod
    def _replay(body: bytes, receive: Receive) -> Receive:
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls: the client's disconnect

        return replay

    async def _render(self, app: Any, decision: Decision, data: dict[str, Any]) -> list[list[int]]:
        """The prompt(s) as vLLM would tokenize them for the base model."""
        renderer = app.state.online_renderer
        try:
            if decision.endpoint == "completion":
                result = await renderer.render_completion(CompletionRequest.model_validate(data))
                inputs = result
            else:
                if has_non_text_content(data.get("messages")):
                    raise _Refused(400, f"prefix `{data.get('model')}` takes text chat messages only")
                result = await renderer.render_chat(ChatCompletionRequest.model_validate(data))
                inputs = result if isinstance(result, ErrorResponse) else result[1]
        except _Refused:
            raise
        except Exception as e:  # validation errors of the request: the client's to fix
            if getattr(e, "parameter", None) == "input_tokens" and isinstance(getattr(e, "value", None), int):
                # longer than the whole model: say it in the prefix's context
                entry = decision.entry
                assert entry is not None
                max_len = self._max_model_len(app) or 0
                raise _Refused(400, error_body(400, context_message(
                    entry.name, max_len - entry.num_tokens, max_len, entry.num_tokens, e.value,
                    at_least=e.value == max_len + 1), "input_tokens"), raw=True) from e
            raise _Refused(400, f"{type(e).__name__}: {e}") from e
        if isinstance(inputs, ErrorResponse):
            raise _Refused(inputs.error.code, inputs.model_dump_json().encode(), raw=True)
        prompts = []
        for item in inputs:
            ids = item.get("prompt_token_ids") if isinstance(item, dict) else None
            if not ids or item.get("type", "token") != "token":
                raise _Refused(400, f"prefix `{data.get('model')}` takes text or token prompts only")
            prompts.append([int(t) for t in ids])
        return prompts


class _Refused(Exception):
    def __init__(self, status: int, message: str | bytes, raw: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.body = message if raw else error_body(status, str(message))
