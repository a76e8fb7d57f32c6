"""``prefixattn serve --tensor-parallel-size 2`` on vLLM's CPU build: two worker processes, each holding one
of the tiny model's two KV heads, and the connector in each writing its rank's head of every prefix. Greedy
outputs of every adapter kind, sent at once, equal the reference (transformers + prefixattn, no KV cache)
token for token; a rank that wrote the other rank's head, or both, would change them (the prefixes change
every output: test_serve_server checks that).

vLLM's CPU workers pin their OpenMP threads to cores; on a single NUMA node it cannot choose them itself,
so the test names one core per rank (``VLLM_CPU_OMP_THREADS_BIND``), as a user on such a machine must.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
from serve_env import SERVER_ARGS, Server, start, stop, vllm_python
from test_serve_server import NAMES, check_choice, complete, tokens

from prefixattn.serve.model_layout import rank_kv_heads

pytestmark = [pytest.mark.xdist_group("vllm_server"), pytest.mark.usefixtures("one_thread")]


def test_rank_kv_heads_follows_vllms_split():
    # at least as many heads as ranks: contiguous slices (vLLM's QKVParallelLinear, shard_rank = tp_rank)
    assert [list(rank_kv_heads(8, 4, r)) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert list(rank_kv_heads(2, 1, 0)) == [0, 1]
    # fewer heads than ranks: each head on tp/heads consecutive ranks (shard_rank = tp_rank // replicas)
    assert [list(rank_kv_heads(2, 4, r)) for r in range(4)] == [[0], [0], [1], [1]]
    assert [list(rank_kv_heads(1, 2, r)) for r in range(2)] == [[0], [0]]
    with pytest.raises(ValueError, match="3 KV heads do not split over 2"):
        rank_kv_heads(3, 2, 0)
    with pytest.raises(ValueError, match="6 tensor-parallel ranks do not replicate 4"):
        rank_kv_heads(4, 6, 0)


def one_core_per_rank(ranks: int) -> str:
    cores = sorted(os.sched_getaffinity(0))
    return "|".join(str(cores[r % len(cores)]) for r in range(ranks))


@pytest.fixture
def tp_server(serve_fixture, tmp_path):
    info = start(vllm_python(), serve_fixture, tmp_path, [*SERVER_ARGS, "--tensor-parallel-size", "2"],
                 env={"VLLM_CPU_OMP_THREADS_BIND": one_core_per_rank(2)})
    yield Server(info["url"], serve_fixture, tmp_path / "server.log")
    stop(info["pid"])


def test_two_ranks_serve_every_prefix_exactly(tp_server, reference):
    cases = [(name, tokens(300 + i, length)) for i, name in enumerate(NAMES) for length in (1, 45)]
    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(lambda c: complete(tp_server, *c), cases))
    for (name, prompt), (status, body) in zip(cases, results, strict=True):
        assert status == 200, body
        check_choice(body["choices"][0], reference.greedy(name, prompt, 12), f"{name}, {len(prompt)}, 2 ranks")
    log = tp_server.log.read_text()
    assert "world_size=2" in log or "TP1" in log, "the server did not run two tensor-parallel ranks"
