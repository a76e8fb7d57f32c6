"""Test set-up: run the Triton kernels through the interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported, so it is decided here, before any
test module imports prefixattn.kernels.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 could be set")
    os.environ["TRITON_INTERPRET"] = "1"

# Every kernel output starts as NaN, so a slot a kernel forgets to write fails the comparison.
os.environ.setdefault("PREFIXATTN_POISON", "1")

# Run on the GPU when there is one, else on the CPU through the interpreter.
from helpers import DEVICE  # noqa: E402  (after TRITON_INTERPRET is set)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One intra-op thread while a test runs: the xdist workers already share the cores, and
    oversubscribed OpenMP threads spin, making tiny models many times slower. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

