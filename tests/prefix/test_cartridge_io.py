"""A cartridge's native file (save_prefix / load_prefix): its frozen tokens and their count travel with
it (bank entries too), mismatched frozen counts are refused before anything changes, and files written
before cartridges existed (no kind, no frozen count in their config) still load."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from tiny_models import batch, tiny_model

import prefixattn
from prefixattn.prefix import PrefixConfig, find_prefix


def _cartridge(frozen=2, seed=0, **kw):
    model = tiny_model("llama")
    torch.manual_seed(seed)
    return prefixattn.patch(model, num_prefix_tokens=6, cartridge=True, num_frozen_tokens=frozen, backend="torch",
                            **kw)


def _logits(model, **kw):
    ids, mask = batch(padding="left")
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits


def test_round_trip_carries_the_frozen_tokens_and_their_count(tmp_path):
    a, b = _cartridge(seed=1), _cartridge(seed=2)
    path = tmp_path / "c.safetensors"
    prefixattn.save_prefix(a, path)
    with safetensors.safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == ["frozen_kv", "kv"]
        cfg = json.loads(f.metadata()["config"])
    assert cfg["cartridge"] is True and cfg["num_frozen_tokens"] == 2
    assert not torch.equal(find_prefix(b).frozen_kv, find_prefix(a).frozen_kv)
    prefixattn.load_prefix(b, path)
    assert torch.equal(find_prefix(b).frozen_kv, find_prefix(a).frozen_kv)
    assert torch.equal(find_prefix(b).kv, find_prefix(a).kv)
    torch.testing.assert_close(_logits(b), _logits(a), rtol=0, atol=0)

    other = _cartridge(frozen=1)
    before = find_prefix(other).compute().clone()
    with pytest.raises(ValueError, match="num_frozen_tokens: file has 2, model has 1"):
        prefixattn.load_prefix(other, path)
    assert torch.equal(find_prefix(other).compute(), before)


def test_bank_entries_of_a_cartridge(tmp_path):
    bank = _cartridge(num_prefixes=3)
    module = find_prefix(bank)
    assert module.frozen_kv.shape == (2, 2, 3, 2, 2, 16) and module.kv.shape == (2, 2, 3, 2, 4, 16)
    prefixattn.save_prefix(bank, tmp_path / "e2.safetensors", prefix_id=2)
    single = _cartridge(seed=5)
    prefixattn.load_prefix(single, tmp_path / "e2.safetensors")
    assert torch.equal(find_prefix(single).compute()[:, :, 0], module.compute()[:, :, 2])
    prefixattn.load_prefix(bank, tmp_path / "e2.safetensors", prefix_id=0)
    assert torch.equal(module.compute()[:, :, 0], module.compute()[:, :, 2])


def test_plain_prefix_files_keep_the_earlier_format_and_earlier_files_load(tmp_path):
    plain = prefixattn.patch(tiny_model("llama"), num_prefix_tokens=4, backend="torch")
    path = tmp_path / "plain.safetensors"
    prefixattn.save_prefix(plain, path)
    with safetensors.safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["version"] == "1" and not {"cartridge", "num_frozen_tokens"} & set(json.loads(meta["config"]))

    # a file as prefixattn wrote it before cartridges: exactly these config fields
    earlier = {"num_tokens": 4, "num_kv_heads": 2, "head_dim": 16, "layers": [0, 1], "num_layers": 2,
               "num_prefixes": 1, "bank": False, "projection": False, "projection_hidden_size": 0}
    kv = torch.randn(2, 2, 1, 2, 4, 16)
    safetensors.torch.save_file({"kv": kv}, str(tmp_path / "old.safetensors"),
                                metadata={"format": "prefixattn", "version": "1", "config": json.dumps(earlier)})
    prefixattn.load_prefix(plain, tmp_path / "old.safetensors")
    assert torch.equal(find_prefix(plain).kv, kv)
    assert PrefixConfig.from_json(json.dumps(earlier)).num_frozen_tokens == 0


def test_config_checks_the_frozen_count():
    base = dict(num_tokens=4, num_kv_heads=2, head_dim=16, layers=(0,), num_layers=1)
    with pytest.raises(ValueError, match=r"num_frozen_tokens must be in \[0, num_tokens=4\]"):
        PrefixConfig(**base, cartridge=True, num_frozen_tokens=5)
    with pytest.raises(ValueError, match="cannot be MLP-reparameterized"):
        PrefixConfig(**base, projection=True, projection_hidden_size=8, cartridge=True)
    with pytest.raises(TypeError, match="num_frozen_tokens must be an int"):
        PrefixConfig(**base, num_frozen_tokens=1.0)
    every_token = PrefixConfig(**base, cartridge=True, num_frozen_tokens=4)  # PEFT allows it: nothing trains
    assert PrefixConfig.from_json(every_token.to_json()) == every_token
