"""HTTP rules of the server that need no vLLM (so they are tested on their own): media types as HTTP
defines them, which routes need the API key, and checking a key.

Media types. ``Content-Type`` is ``type/subtype`` (case-insensitive) with optional parameters
(``; charset=utf-8``). vLLM lowercases it before its own check, and FastAPI parses a body as JSON without
any ``Content-Type`` or with a ``+json`` subtype, so the middleware cannot trust the header to tell which
bodies vLLM will read as JSON: it inspects every POST body that is not a multipart upload, and a body
that parses as a JSON object is admitted (or refused) whatever the header says.

The API key. vLLM's own check (``--api-key`` / ``VLLM_API_KEY``) guards paths under ``/v1``, ``/v2``,
``/inference``, ``/cohere`` only: ``POST /invocations`` (vllm-project/vllm#58144), ``/tokenize``,
``/metrics``, ``/version``, ``/docs``, ``/openapi.json``, the admin routes and the rest stay open. With a key
set, prefixattn requires it on every route but the health checks (``/health``, ``/ping``), which load
balancers call without credentials and which answer nothing but "up". ``OPTIONS`` (CORS preflight, sent by
browsers without credentials) passes to vLLM's CORS handling, which answers it without running anything.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable

OPEN_PATHS = frozenset({"/health", "/ping"})


def media_type(content_type: bytes | str | None) -> str:
    """``Application/JSON; charset=UTF-8`` -> ``application/json`` ("" when absent)."""
    if content_type is None:
        return ""
    text = content_type.decode("latin-1") if isinstance(content_type, bytes) else content_type
    return text.split(";", 1)[0].strip().lower()


def may_be_json(content_type: bytes | str | None) -> bool:
    """Whether vLLM may read a POST body with this Content-Type as JSON (everything but multipart uploads
    and forms: a body that is JSON is inspected whatever its header says)."""
    kind = media_type(content_type)
    return not (kind.startswith("multipart/") or kind == "application/x-www-form-urlencoded")


def needs_key(path: str, method: str | None, root_path: str = "") -> bool:
    """Whether a request must carry the API key (when the server has one)."""
    if method == "OPTIONS":
        return False
    route = path.removeprefix(root_path) if root_path else path
    return route.rstrip("/") not in OPEN_PATHS


def key_hashes(keys: Iterable[str | None]) -> list[bytes]:
    return [hashlib.sha256(k.encode()).digest() for k in keys if k]


def has_key(authorization: bytes | str | None, hashes: list[bytes]) -> bool:
    """``Authorization: Bearer <key>`` with one of the server's keys (compared in constant time)."""
    if not authorization:
        return False
    text = authorization.decode("latin-1") if isinstance(authorization, bytes) else authorization
    scheme, _, token = text.partition(" ")
    if scheme.lower() != "bearer":
        return False
    digest = hashlib.sha256(token.strip().encode()).digest()
    found = False
    for h in hashes:
        found |= secrets.compare_digest(digest, h)
    return found
