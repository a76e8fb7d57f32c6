"""vLLM's side of prefix serving: a KV connector that writes a tuned prefix into the paged cache.

Loaded by vLLM itself (``kv_transfer_config = {"kv_connector": "PrefixKVConnector",
"kv_connector_module_path": "prefixattn.serve.connector", ...}``), once in the scheduler and once in every
worker. Both read the served-prefix table (``kv_connector_extra_config["manifest"]``).

Scheduler side: a request for a prefix starts with P placeholder tokens. ``get_num_new_matched_tokens``
reports them as externally cached, minus what vLLM's prefix cache already holds (a hit of the same
prefix, salted by its content); after allocation the slots of the missing positions go to the workers
in the step's metadata. After a preemption vLLM asks again and the prefix is written again.

Worker side: before the forward, ``start_load_kv`` writes the prefix's keys and values of every layer
into those slots through the attention backend's own cache write (``impl.do_kv_cache_update``), which
knows the backend's layout (the CPU backend splits K and V inside each block) and its KV-cache dtype.
With tensor parallelism every rank's worker gets the same slots (one scheduler, one block table) and
writes the KV heads its rank holds (``rank_kv_heads``: vLLM's split of the K/V projection).

Never down: nothing here raises on a request. A request the connector must not serve
(``engine_requests.engine_request_problem``) is reported as an asynchronous load of its remaining tokens
that fails; with ``kv_load_failure_policy="fail"`` vLLM finishes it with an error and carries on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
)
from vllm.logger import init_logger
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.kv_cache_interface import FullAttentionSpec

from .engine_requests import (
    EngineRequest,
    engine_request_problem,
    external_tokens,
    requested_prefix,
    slot_mapping,
)
from .model_layout import rank_kv_heads
from .table import PrefixTable

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = init_logger(__name__)


@dataclass
class PrefixLoad:
    request_id: str
    name: str
    start: int  # first prefix position to write (the ones before are in vLLM's prefix cache)
    slots: list[int]  # cache slots of positions start..P-1
    block_ids: list[int]  # the request's blocks, reported as failed if the write fails


@dataclass
class PrefixLoadMetadata(KVConnectorMetadata):
    loads: list[PrefixLoad] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # request ids to fail


def layout_problems(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig | None,
                    table: PrefixTable) -> list[str]:
    """Why this engine's cache cannot hold the table's prefixes (empty: it can)."""
    out = []
    par = vllm_config.parallel_config
    for what, size in (("pipeline", par.pipeline_parallel_size),
                       ("decode context", getattr(par, "decode_context_parallel_size", 1))):
        if size != 1:
            out.append(f"{what} parallelism ({size}) is not supported by prefix serving yet (a stage or a "
                       "context rank holds a part of the layers or positions; the connector writes all)")
    tp = par.tensor_parallel_size
    try:
        per_rank_heads = len(rank_kv_heads(table.num_kv_heads, tp, 0))
    except ValueError as e:
        out.append(str(e))
        return out
    if kv_cache_config is None:
        return out
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        out.append(f"the model's cache has {len(groups)} groups (layers of different kinds); a prefix needs "
                   "one kind of full-attention cache in every layer")
        return out
    spec, names = groups[0].kv_cache_spec, groups[0].layer_names
    if type(spec) is not FullAttentionSpec:
        out.append(f"the cache is {type(spec).__name__}, not plain full attention: it holds no per-head "
                   "keys and values for every position")
        return out
    if spec.sliding_window is not None or spec.attention_chunk_size is not None:
        out.append("the cache drops positions (sliding window / chunked local attention), the prefix's too")
    if (spec.num_kv_heads, spec.head_size, spec.head_size_v) != (per_rank_heads, table.head_dim,
                                                                 table.head_dim):
        ranks = f" ({per_rank_heads} on each of {tp} tensor-parallel ranks)" if tp > 1 else ""
        out.append(f"the cache holds {spec.num_kv_heads} KV heads x head dim {spec.head_size} (values "
                   f"{spec.head_size_v}); the prefixes are {table.num_kv_heads} x {table.head_dim}{ranks}")
    indices = sorted(extract_layer_index(n) for n in names)
    if indices != list(range(table.num_layers)):
        out.append(f"the cache's attention layers are {indices}; the prefixes cover layers "
                   f"0..{table.num_layers - 1}")
    return out


class PrefixKVConnector(KVConnectorBase_V1):
    """Writes served prefixes into vLLM's paged KV cache (see the module docstring)."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig | None = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        manifest = self._kv_transfer_config.get_from_extra_config("manifest", None)
        if not manifest:
            raise ValueError("PrefixKVConnector needs kv_connector_extra_config={'manifest': ...}: the run "
                             "directory `prefixattn serve` writes (or prefixattn.serve.offline builds)")
        self.table = PrefixTable.read(manifest)
        problems = layout_problems(vllm_config, kv_cache_config, self.table)
        if problems:
            raise ValueError("prefixattn cannot serve prefixes on this engine: " + "; ".join(problems))
        self.block_size = vllm_config.cache_config.block_size
        # scheduler side
        self._pending: list[PrefixLoad] = []
        self._refused: dict[str, str] = {}  # request id -> why
        self._refused_to_send: list[str] = []
        # worker side
        self._kv: dict[str, torch.Tensor] | None = None  # name -> (L, 2, P, Hkv, D), cast and placed
        self._dtype = vllm_config.model_config.dtype
        self._layer_names: list[str] = []
        self._failed_blocks: set[int] = set()
        self._failed_requests: set[str] = set()
        if role == KVConnectorRole.WORKER:
            self._host_kv = self.table.load_kv()

    # ---------------------------------------------------------------- scheduler side

    def on_new_request(self, request: Request) -> None:
        # vLLM skips connectors for requests with prompt logprobs (skip_reading_prefix_cache); the
        # connector must see every request that names a prefix, to serve or fail it, never let it run as
        # text.
        if (requested_prefix(request.kv_transfer_params) is not None
                and getattr(request, "skip_reading_prefix_cache", False)):
            request.skip_reading_prefix_cache = False

    def _view(self, request: Request) -> EngineRequest:
        sp = request.sampling_params
        return EngineRequest(
            prompt_token_ids=list(request.prompt_token_ids or []),
            cache_salt=request.cache_salt,
            kv_transfer_params=request.kv_transfer_params,
            prompt_logprobs=sp is not None and (sp.prompt_logprobs is not None
                                                or getattr(sp, "prompt_logprob_token_ids", None) is not None),
            repetition_penalty=float(sp.repetition_penalty) if sp is not None else 1.0,
        )

    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        try:
            entry, problem = engine_request_problem(self._view(request), self.table)
        except Exception as e:  # never let a request take the engine down
            entry, problem = None, f"internal error while checking the request: {e!r}"
        if problem is not None:
            if request.request_id not in self._refused:
                logger.error("prefixattn: refusing request %s: %s", request.request_id, problem)
            self._refused[request.request_id] = problem
            remaining = request.num_tokens - num_computed_tokens
            # an asynchronous load of everything left, reported failed by the worker: vLLM fails the
            # request (kv_load_failure_policy="fail") without running it
            return (remaining, True) if remaining > 0 else (0, False)
        if entry is None:
            return 0, False
        return external_tokens(entry.num_tokens, num_computed_tokens), False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        if num_external_tokens <= 0:
            return
        rid = request.request_id
        if rid in self._refused:
            self._refused_to_send.append(rid)
            return
        try:
            entry, _ = engine_request_problem(self._view(request), self.table)
            assert entry is not None
            P = entry.num_tokens
            block_ids = list(blocks.get_block_ids()[0])
            start = P - num_external_tokens
            self._pending.append(PrefixLoad(rid, entry.name, start,
                                            slot_mapping(block_ids, self.block_size, start, P), block_ids))
        except Exception as e:
            logger.error("prefixattn: cannot plan the prefix load of request %s: %r", rid, e)
            self._refused[rid] = repr(e)
            self._refused_to_send.append(rid)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = PrefixLoadMetadata(loads=self._pending, refused=self._refused_to_send)
        self._pending, self._refused_to_send = [], []
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._refused.pop(request.request_id, None)
        return False, None

    # ---------------------------------------------------------------- worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._layer_names = list(kv_caches)

    def _placed(self, device: torch.device) -> dict[str, torch.Tensor]:
        if self._kv is None:
            from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

            heads = rank_kv_heads(self.table.num_kv_heads, get_tensor_model_parallel_world_size(),
                                  get_tensor_model_parallel_rank())
            # (L, 2, Hkv, P, D) -> this rank's heads, (L, 2, P, Hkv_rank, D): a layer's rows are what the
            # cache write takes
            self._kv = {name: kv[:, :, heads.start:heads.stop].permute(0, 1, 3, 2, 4)
                        .to(device=device, dtype=self._dtype).contiguous()
                        for name, kv in self._host_kv.items()}
        return self._kv

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, PrefixLoadMetadata)
        self._failed_requests.update(meta.refused)
        if not meta.loads:
            return
        layers = [(extract_layer_index(n), forward_context.no_compile_layers[n]) for n in self._layer_names]
        for load in meta.loads:
            try:
                self._write(load, layers)
            except Exception as e:  # a failed write fails the request, never the engine
                logger.error("prefixattn: writing prefix %r for request %s failed: %r", load.name,
                             load.request_id, e)
                self._failed_blocks.update(load.block_ids)

    def _write(self, load: PrefixLoad, layers: list[tuple[int, Any]]) -> None:
        device = layers[0][1].kv_cache.device
        kv = self._placed(device)[load.name]
        slots = torch.tensor(load.slots, dtype=torch.int64, device=device)
        for index, layer in layers:
            layer.impl.do_kv_cache_update(layer, kv[index, 0, load.start:], kv[index, 1, load.start:],
                                          layer.kv_cache, slots)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any,
                      **kwargs: Any) -> None:
        return

    def wait_for_save(self) -> None:
        return

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        failed, self._failed_requests = self._failed_requests, set()
        # a failed receive is also a finished one, so the scheduler releases the request's blocks
        return KVConnectorTransferResults(finished_recving=set(failed), failed_recving=set(failed))

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed
