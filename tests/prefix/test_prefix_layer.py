"""The prefix layer stands alone: importing it (or the package) loads no transformers, it finds a model's
prefix by the submodule name (also through DDP-style ``.module`` wrappers), and its files round-trip on a
plain torch module that carries a ``PrefixKV``, with no patcher involved."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from prefixattn.prefix import MODULE_NAME, PrefixConfig, PrefixKV, find_prefix, load_prefix, save_prefix


def test_importing_the_package_and_the_prefix_layer_loads_no_transformers():
    code = ("import sys, prefixattn, prefixattn.prefix; "
            "print(sorted(m for m in ('transformers', 'peft', 'prefixattn.hf') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _holder(seed: int, bank: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    config = PrefixConfig(num_tokens=3, num_kv_heads=2, head_dim=5, layers=(0, 2), num_layers=3,
                          num_prefixes=4 if bank else 1, bank=bank)
    holder = nn.Module()
    holder.add_module(MODULE_NAME, PrefixKV(config))
    return holder


class _Wrapper(nn.Module):  # what DDP / accelerate look like from outside: the model in .module
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def test_find_prefix_through_a_wrapper_and_refuses_a_model_without_one():
    holder = _holder(0)
    assert find_prefix(holder) is holder._modules[MODULE_NAME]
    assert find_prefix(_Wrapper(holder)) is holder._modules[MODULE_NAME]
    with pytest.raises(TypeError, match="not patched"):
        find_prefix(nn.Linear(2, 2))


def test_round_trip_on_a_plain_module_and_one_bank_entry(tmp_path):
    a, b = _holder(0, bank=True), _holder(1, bank=True)
    save_prefix(_Wrapper(a), tmp_path / "all.safetensors")
    save_prefix(a, tmp_path / "two.safetensors", prefix_id=2)
    load_prefix(b, tmp_path / "two.safetensors", prefix_id=0)
    kv_a, kv_b = find_prefix(a).kv, find_prefix(b).kv
    torch.testing.assert_close(kv_b[:, :, 0], kv_a[:, :, 2], rtol=0, atol=0)
    assert not torch.equal(kv_b[:, :, 1], kv_a[:, :, 1])
    load_prefix(b, tmp_path / "all.safetensors")
    torch.testing.assert_close(kv_b, kv_a, rtol=0, atol=0)
