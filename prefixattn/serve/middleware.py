"""The HTTP half of prefix serving: an ASGI middleware that vLLM's OpenAI server loads with
``--middleware prefixattn.serve.middleware.PrefixMiddleware`` (``prefixattn serve`` passes it).

For every JSON POST it asks ``admission.admit`` what to do. A request for a prefix is rendered to token ids
by vLLM's own renderer (the chat template, special tokens and tokenizer the base model would use), then
rewritten (``admission.prefixed_body``) and handed on; its response, whole or streamed, is rewritten back
(``admission.rewrite_result``). ``GET /v1/models`` gets a card for every prefix. Everything refused is
answered here with a 4xx, so the engine never sees it. The table of prefixes comes from the run directory
named by the environment variable ``PREFIXATTN_SERVE_MANIFEST``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

from vllm import envs
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware
from vllm.logger import init_logger
from vllm.renderers.chat_utils import has_non_text_content

from .admission import (
    Decision,
    admit,
    error_body,
    prefixed_body,
    rewrite_result,
    rewrite_sse_event,
    with_prefix_models,
)
from .table import ENV_MANIFEST, PrefixTable

logger = init_logger(__name__)

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
        self._entry: Callable[[Scope, Receive, Send], Awaitable[None]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._entry is None:
            self._entry = self._guarded(scope.get("app"))
        await self._entry(scope, receive, send)

    def _guarded(self, app: Any) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
        """``_handle`` behind vLLM's own API-key check when the server has keys: vLLM adds its
        authentication inside the user middlewares, and a client without a key must get its 401, not the
        served names or a refusal."""
        args = getattr(getattr(app, "state", None), "args", None)
        tokens = [k for k in (getattr(args, "api_key", None) or [envs.VLLM_API_KEY]) if k]
        if not tokens:
            return self._handle
        return AuthenticationMiddleware(self._handle, tokens=tokens)

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
            await self.app(scope, receive, _Rewriter(send, lambda obj: with_prefix_models(obj, self.table)))
            return
        if method != "POST" or not _header(scope, b"content-type").startswith(b"application/json"):
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
        app = scope.get("app")
        decision = admit(path, data, self.table, self._repetition_penalty_default(app))
        if decision.action == "refuse":
            body = error_body(decision.status, decision.message, decision.param)
            await _respond(send, decision.status, body)
            return
        if decision.action == "pass":
            await self.app(scope, self._replay(body, receive), send)
            return
        try:
            prompts = await self._render(app, decision, data)
        except _Refused as e:
            await _respond(send, e.status, e.body)
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
