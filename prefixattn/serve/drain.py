"""A clean stop for the HTTP server (no vLLM imports): on SIGTERM or SIGINT, stop taking requests (503),
let the running ones finish within a bound, end what is left with an error, then let vLLM shut down.

vLLM 0.32.0 on its own: a stop signal aborts the engine's requests at once (``--shutdown-timeout 0``) and
uvicorn then waits, without a bound, for the clients of the aborted requests to give up; they get no body,
no error, no final stream event. Here the middleware installs its own SIGTERM/SIGINT handlers on the event
loop when the app starts (replacing vLLM's) and counts the requests in flight:

1. the signal: every new request (health checks included, so a load balancer takes the server out) is
   answered 503 with ``Connection: close``;
2. the requests in flight run to their end, for at most ``drain_timeout`` seconds;
3. at the bound (or on a second signal), what still runs is ended: a response not started gets a 503, an
   event stream an error event and ``data: [DONE]``; the request's later output is dropped and it sees a
   disconnect, so vLLM aborts it in the engine;
4. then uvicorn's ``should_exit``, the path vLLM itself takes when the engine dies: uvicorn closes its
   sockets, the engine is shut down, the process exits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .http_rules import media_type

# under vLLM's logger: its handler and level (INFO) apply
logger = logging.getLogger("vllm.prefixattn.serve")

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

ENV_DRAIN_TIMEOUT = "PREFIXATTN_SERVE_DRAIN_TIMEOUT"
DEFAULT_DRAIN_TIMEOUT_S = 30.0
_AFTER_CUT_S = 5.0  # how long the cut requests get to see their disconnect before the server stops


def error_json(status: int, message: str) -> bytes:
    kind = "ServiceUnavailableError" if status == 503 else "BadRequestError"
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}).encode()


async def respond(send: Send, status: int, body: bytes,
                  extra_headers: list[tuple[bytes, bytes]] = ()) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *extra_headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Tracked:
    """One request in flight: its ``send`` and ``receive`` as the app sees them, and how to end it early."""

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive, self._send = receive, send
        self.started = self.streaming = self.finished = self.cut = False

    async def send(self, message: Message) -> None:
        if self.cut:
            return  # the response was ended at the cut; the app's later output has nowhere to go
        if message["type"] == "http.response.start":
            self.started = True
            ctype = dict((k.lower(), v) for k, v in message.get("headers") or []).get(b"content-type")
            self.streaming = media_type(ctype) == "text/event-stream"
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.finished = True
        await self._send(message)

    async def receive(self) -> Message:
        if self.cut:
            return {"type": "http.disconnect"}
        return await self._receive()

    async def end(self, reason: str) -> None:
        """End the response now: a 503, or an error event in a stream."""
        if self.finished or self.cut:
            return
        self.cut = True
        try:
            if not self.started:
                await respond(self._send, 503, error_json(503, reason), [(b"connection", b"close")])
            elif self.streaming:
                event = b"data: " + error_json(503, reason) + b"\n\ndata: [DONE]\n\n"
                await self._send({"type": "http.response.body", "body": event, "more_body": False})
            else:
                await self._send({"type": "http.response.body", "body": b"", "more_body": False})
        except Exception as e:  # the client may be gone already
            logger.debug("prefixattn: ending a request at shutdown: %r", e)


class Drain:
    """The server's stop: see the module docstring. One per middleware (one per API-server process)."""

    def __init__(self, timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self.draining = False
        self.in_flight: set[Tracked] = set()
        self._app: Any = None
        self._task: asyncio.Task | None = None

    def install(self, app: Any) -> None:
        """Take over SIGTERM and SIGINT (call in the server's event loop once the app has started)."""
        self._app = app
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._signalled, sig)

    def _signalled(self, sig: int) -> None:
        if self.draining:
            logger.warning("prefixattn: %s again: ending %d requests now", signal.Signals(sig).name,
                           len(self.in_flight))
            asyncio.get_running_loop().create_task(self._end_all("the server is stopping (stopped again)"))
            return
        self.draining = True
        logger.info("prefixattn: %s: draining %d requests in flight (at most %.0f s; new requests get 503)",
                    signal.Signals(sig).name, len(self.in_flight), self.timeout_s)
        self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        start = time.monotonic()
        deadline = start + self.timeout_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.in_flight:
            await self._end_all(f"the server is stopping: the request did not finish within the drain "
                                f"timeout ({self.timeout_s:g} s)")
            cut_until = time.monotonic() + _AFTER_CUT_S
            while self.in_flight and time.monotonic() < cut_until:
                await asyncio.sleep(0.05)
        logger.info("prefixattn: drained in %.1f s; stopping", time.monotonic() - start)
        self.stop_server()

    async def _end_all(self, reason: str) -> None:
        pending = [t for t in self.in_flight if not t.finished]
        if pending:
            logger.warning("prefixattn: ending %d requests: %s", len(pending), reason)
        await asyncio.gather(*(t.end(reason) for t in pending))

    def stop_server(self) -> None:
        server = getattr(getattr(self._app, "state", None), "server", None)
        if server is not None:
            server.should_exit = True  # uvicorn stops; vLLM then shuts its engine down
        else:  # not under vLLM's launcher: the signal's own action, without this handler
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            signal.raise_signal(signal.SIGTERM)

    async def run(self, app: Callable[[Receive, Send], Awaitable[None]], receive: Receive,
                  send: Send) -> None:
        """Run one HTTP request, counted as in flight (503 once the server is stopping)."""
        if self.draining:
            await respond(send, 503, error_json(503, "the server is stopping"), [(b"connection", b"close")])
            return
        tracked = Tracked(receive, send)
        self.in_flight.add(tracked)
        try:
            await app(tracked.receive, tracked.send)
        finally:
            self.in_flight.discard(tracked)
