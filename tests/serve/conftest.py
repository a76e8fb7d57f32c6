"""The serving tests' fixtures: the tiny model and its adapters (built once per run, shared by the
pytest-xdist workers), the reference, and one ``prefixattn serve`` in the vLLM environment shared by every
test that needs it, also across workers (a file lock in the run's shared temporary directory; the last
worker to finish stops it). See ``serve_env`` for how the vLLM environment is found."""

from __future__ import annotations

import json

import pytest
import tiny_serving
from serve_env import Server, healthy, locked, start, stop, vllm_python


@pytest.fixture(scope="session")
def serve_fixture(tmp_path_factory, worker_id) -> tiny_serving.Fixture:
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if worker_id != "master" else base) / "prefixattn-serve"
    with locked(shared / "lock"):
        if (shared / "fixture" / "fixture.json").is_file():
            return tiny_serving.load(shared / "fixture")
        return tiny_serving.build(shared / "fixture")


@pytest.fixture(scope="session")
def server(serve_fixture, worker_id) -> Server:
    python = vllm_python()
    shared = serve_fixture.root.parent
    users = shared / "users"
    with locked(shared / "lock"):
        info_path = shared / "server.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else None
        if info is None or not healthy(info["url"]):
            info = start(python, serve_fixture, shared)
            info.pop("proc")
            info_path.write_text(json.dumps(info))
        users.mkdir(exist_ok=True)
        (users / worker_id).touch()
    yield Server(info["url"], serve_fixture, shared / "server.log")
    with locked(shared / "lock"):
        (users / worker_id).unlink(missing_ok=True)
        if not any(users.iterdir()):
            stop(info["pid"])
            info_path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def reference(serve_fixture) -> tiny_serving.Reference:
    return tiny_serving.Reference(serve_fixture)
