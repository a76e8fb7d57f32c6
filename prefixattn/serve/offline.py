"""Tuned prefixes with vLLM's offline ``vllm.LLM``: the same connector as the server, no HTTP.

    from vllm import LLM, SamplingParams
    from prefixattn.serve.offline import OfflinePrefixes

    prefixes = OfflinePrefixes.prepare("path/to/model", {"sql": "runs/sql/adapter"}, run_dir="serve-run")
    llm = LLM("path/to/model", kv_transfer_config=prefixes.kv_transfer_config())
    ids = llm.get_tokenizer()("Show all users").input_ids
    params = SamplingParams(max_tokens=32, temperature=0)
    out = llm.generate([prefixes.prompt("sql", ids), prefixes.prompt(None, ids)],     # a prefix, the base
                       [prefixes.sampling_params("sql", params), params])

``prompt`` puts the prefix's placeholder tokens in front of the token ids and sets its cache salt;
``sampling_params`` names the prefix for the connector and refuses what cannot be served (prompt logprobs,
a repetition penalty). A request built otherwise is failed by the connector, never run wrong.
"""

from __future__ import annotations

import os
from typing import Any

from vllm import SamplingParams

from .engine_requests import prefix_params
from .launch import Prepared, kv_transfer_config, prepare
from .table import RESERVED_SALT, TableEntry


class OfflinePrefixes:
    def __init__(self, prepared: Prepared) -> None:
        self.prepared = prepared
        self.table = prepared.table

    @classmethod
    def prepare(cls, model_dir: str, prefixes: dict[str, str], run_dir: str | os.PathLike,
                placeholder_token_id: int = 0) -> OfflinePrefixes:
        """Check the model and every adapter (``{name: adapter path}``, as ``--prefix NAME=PATH``) and write
        the table into ``run_dir``."""
        specs = [f"{name}={path}" for name, path in prefixes.items()]
        return cls(prepare(model_dir, specs, run_dir=str(run_dir), placeholder_token_id=placeholder_token_id))

    def kv_transfer_config(self) -> dict[str, Any]:
        return kv_transfer_config(self.prepared.run_dir)

    def _entry(self, name: str) -> TableEntry:
        entry = self.table.entries.get(name)
        if entry is None:
            raise ValueError(f"no prefix named {name!r} (served: {', '.join(self.table.entries)})")
        return entry

    def prompt(self, name: str | None, prompt_token_ids: list[int],
               cache_salt: str | None = None) -> dict[str, Any]:
        """A ``TokensPrompt`` for prefix ``name`` (None: the base model)."""
        if cache_salt is not None and cache_salt.startswith(RESERVED_SALT):
            raise ValueError(f"cache_salt values starting with {RESERVED_SALT!r} are reserved")
        ids = [int(t) for t in prompt_token_ids]
        if not ids:
            raise ValueError("the prompt is empty")
        if name is None:
            return {"prompt_token_ids": ids, **({"cache_salt": cache_salt} if cache_salt else {})}
        entry = self._entry(name)
        return {"prompt_token_ids": [self.table.placeholder_token_id] * entry.num_tokens + ids,
                "cache_salt": entry.cache_salt(cache_salt)}

    def sampling_params(self, name: str | None, params: SamplingParams) -> SamplingParams:
        """``params`` for prefix ``name`` (a copy naming the prefix; None: ``params`` itself)."""
        if name is None:
            return params
        entry = self._entry(name)
        if params.prompt_logprobs is not None:
            raise ValueError("prompt logprobs are not supported with a prefix (vLLM computes them without "
                             "the KV connector)")
        if params.repetition_penalty != 1.0:
            raise ValueError("repetition_penalty must be 1.0 with a prefix (it would count the placeholder "
                             "tokens as prompt text)")
        out = params.clone()
        out.extra_args = {**(params.extra_args or {}), "kv_transfer_params": prefix_params(name, entry)}
        return out
