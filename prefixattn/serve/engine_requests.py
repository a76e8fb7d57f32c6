"""What the KV connector decides for an engine request, without vLLM (so it is tested on its own).

An engine request for a prefix carries ``kv_transfer_params = {"prefixattn": {"name": ..., "digest": ...}}``
and a prompt that starts with P placeholder tokens. The connector reports those P tokens as externally
cached (minus what vLLM's own prefix cache already holds) and writes the prefix's keys and values into
their slots. Positions: the placeholders take positions 0..P-1, so the prompt's tokens sit at P, P+1, ...,
PEFT's and prefixattn's numbering; vLLM caches keys after RoPE, so the written prefix keys act unrotated.

A request that asks for a prefix but cannot be served exactly (unknown name, missing placeholders, a salt
that would share blocks across prefixes, prompt logprobs, a repetition penalty that would count the
placeholders) is never run: the connector fails it (``engine_request_problem`` says why). The HTTP
middleware refuses such requests before they reach the engine; this is the second line, for
``vllm.LLM`` users and anything that gets past the first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .table import RESERVED_SALT, PrefixTable, TableEntry

PARAMS_KEY = "prefixattn"


@dataclass(frozen=True)
class EngineRequest:
    """The parts of a vLLM engine request the connector reads."""

    prompt_token_ids: list[int]
    cache_salt: str | None
    kv_transfer_params: Any
    prompt_logprobs: bool  # prompt logprobs (or prompt logprob token ids) asked for
    repetition_penalty: float


def prefix_params(name: str, entry: TableEntry) -> dict[str, Any]:
    """The ``kv_transfer_params`` entry that names a prefix."""
    return {PARAMS_KEY: {"name": name, "digest": entry.digest}}


def requested_prefix(kv_transfer_params: Any) -> Any:
    """What the request names under our key (None: a request for the base model)."""
    if not isinstance(kv_transfer_params, dict):
        return None
    return kv_transfer_params.get(PARAMS_KEY)


def engine_request_problem(req: EngineRequest, table: PrefixTable) -> tuple[TableEntry | None, str | None]:
    """(the prefix entry, None) for a request to serve with a prefix, (None, None) for a base-model
    request, or (None, why) for a request that must not run."""
    asked = requested_prefix(req.kv_transfer_params)
    if asked is None:
        if (req.cache_salt or "").startswith(RESERVED_SALT):
            return None, (f"a request without a prefix carries the reserved cache_salt prefix "
                          f"{RESERVED_SALT!r}; it could read a prefix's cached blocks")
        return None, None
    if not isinstance(asked, dict) or not isinstance(asked.get("name"), str):
        return None, f"kv_transfer_params[{PARAMS_KEY!r}] must be {{'name': ..., 'digest': ...}}"
    entry = table.entries.get(asked["name"])
    if entry is None:
        return None, f"no served prefix is named {asked['name']!r} (served: {', '.join(table.entries)})"
    if asked.get("digest") != entry.digest:
        return None, f"prefix {entry.name!r}: the request was built for other prefix contents (digest)"
    if not entry.owns_salt(req.cache_salt):
        return None, (f"prefix {entry.name!r}: cache_salt must start with {entry.salt!r}, or vLLM's prefix "
                      "cache could hand the request another prefix's blocks")
    P, ids = entry.num_tokens, req.prompt_token_ids
    if len(ids) <= P:
        return None, f"prefix {entry.name!r}: the prompt has no tokens after the {P} placeholders"
    if any(t != table.placeholder_token_id for t in ids[:P]):
        return None, (f"prefix {entry.name!r}: the prompt must start with {P} placeholder tokens "
                      f"(id {table.placeholder_token_id})")
    if req.prompt_logprobs:
        return None, (f"prefix {entry.name!r}: prompt logprobs are computed without the KV connector, so "
                      "they would treat the placeholders as text")
    if req.repetition_penalty != 1.0:
        return None, (f"prefix {entry.name!r}: repetition_penalty {req.repetition_penalty} would count the "
                      "placeholder tokens as prompt text")
    return entry, None


def external_tokens(num_prefix_tokens: int, num_computed_tokens: int) -> int:
    """Prefix slots still to write: P minus what vLLM's prefix cache already holds (it may hold a part
    of them, or all of them and more)."""
    return max(0, num_prefix_tokens - num_computed_tokens)


def slot_mapping(block_ids: list[int], block_size: int, start: int, stop: int) -> list[int]:
    """Cache slots of token positions start..stop-1 of a request whose blocks are ``block_ids``."""
    if not 0 <= start <= stop or stop > len(block_ids) * block_size:
        raise ValueError(f"positions {start}..{stop} do not fit {len(block_ids)} blocks of {block_size}")
    return [block_ids[t // block_size] * block_size + t % block_size for t in range(start, stop)]
