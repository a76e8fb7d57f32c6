"""save_prefix / load_prefix: safetensors round trips, validation, corrupt files, atomic writes."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tiny_models import batch, tiny_model

import prefixattn


def _patched(family="llama", **kw):
    kw.setdefault("num_prefix_tokens", 4)
    return prefixattn.patch(tiny_model(family), backend="torch", **kw)


def _logits(model, **kw):
    ids, mask = batch(padding="left")
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits


@pytest.mark.parametrize("projection", [False, True])
def test_round_trip(tmp_path, projection):
    a = _patched(prefix_projection=projection)
    path = tmp_path / "prefix.safetensors"
    prefixattn.save_prefix(a, path)
    b = _patched(prefix_projection=projection)
    with torch.no_grad():
        for p in b.prefixattn_prefix.parameters():
            p.normal_()
    assert not torch.allclose(_logits(a), _logits(b))
    prefixattn.load_prefix(b, path)
    torch.testing.assert_close(_logits(b), _logits(a), rtol=0, atol=0)
    assert sorted(os.listdir(tmp_path)) == ["prefix.safetensors"]  # no temp files left
    # only the prefix is written, not the frozen model
    prefix_bytes = sum(p.numel() * 4 for p in a.prefixattn_prefix.parameters())
    assert path.stat().st_size < prefix_bytes + 4096


def test_file_is_plain_safetensors_with_shape_metadata(tmp_path):
    from safetensors import safe_open

    a = _patched()
    path = tmp_path / "p.safetensors"
    prefixattn.save_prefix(a, path)
    with safe_open(str(path), "pt") as f:
        assert list(f.keys()) == ["kv"]
        meta = f.metadata()
    assert meta["format"] == "prefixattn"
    cfg = json.loads(meta["config"])
    assert cfg["num_tokens"] == 4 and cfg["num_kv_heads"] == 2 and cfg["head_dim"] == 16


def test_mismatched_files_are_refused_and_leave_the_model_untouched(tmp_path):
    path = tmp_path / "p.safetensors"
    prefixattn.save_prefix(_patched(num_prefix_tokens=8), path)
    target = _patched()
    before = target.prefixattn_prefix.kv.detach().clone()
    with pytest.raises(ValueError, match="num_tokens: file has 8, model has 4"):
        prefixattn.load_prefix(target, path)
    prefixattn.save_prefix(_patched(layers=[0]), path)
    with pytest.raises(ValueError, match=r"layers: file has \[0\], model has \[0, 1\]"):
        prefixattn.load_prefix(target, path)
    prefixattn.save_prefix(_patched("gpt2"), path)  # 4 KV heads, not 2
    with pytest.raises(ValueError, match="num_kv_heads: file has 4, model has 2"):
        prefixattn.load_prefix(target, path)
    prefixattn.save_prefix(_patched(prefix_projection=True), path)
    with pytest.raises(ValueError, match="projection: file has True, model has False"):
        prefixattn.load_prefix(target, path)
    torch.testing.assert_close(target.prefixattn_prefix.kv, before, rtol=0, atol=0)


def test_corrupt_and_foreign_files_give_clear_errors(tmp_path):
    from safetensors.torch import save_file

    target = _patched()
    before = target.prefixattn_prefix.kv.detach().clone()
    good = tmp_path / "good.safetensors"
    prefixattn.save_prefix(target, good)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        prefixattn.load_prefix(target, truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        prefixattn.load_prefix(target, garbage)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prefixattn.load_prefix(target, tmp_path / "missing.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"kv": torch.zeros(2, 2, 1, 2, 4, 16)}, str(foreign))
    with pytest.raises(ValueError, match="not a prefixattn prefix file"):
        prefixattn.load_prefix(target, foreign)
    # right metadata but a tensor of the wrong shape, and non-finite values
    from safetensors import safe_open

    with safe_open(str(good), "pt") as f:
        meta = f.metadata()
    bad_shape = tmp_path / "bad_shape.safetensors"
    save_file({"kv": torch.zeros(2, 2, 1, 2, 5, 16)}, str(bad_shape), metadata=meta)
    with pytest.raises(ValueError, match=r"tensor 'kv' has shape \(2, 2, 1, 2, 5, 16\)"):
        prefixattn.load_prefix(target, bad_shape)
    nan = tmp_path / "nan.safetensors"
    save_file({"kv": torch.full((2, 2, 1, 2, 4, 16), float("nan"))}, str(nan), metadata=meta)
    with pytest.raises(ValueError, match="non-finite"):
        prefixattn.load_prefix(target, nan)
    torch.testing.assert_close(target.prefixattn_prefix.kv, before, rtol=0, atol=0)


def test_failed_save_leaves_the_previous_file_and_no_temp_files(tmp_path, monkeypatch):
    import safetensors.torch

    model = _patched()
    path = tmp_path / "p.safetensors"
    prefixattn.save_prefix(model, path)
    original = path.read_bytes()

    def boom(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with torch.no_grad():
        model.prefixattn_prefix.kv.add_(1)
    with pytest.raises(OSError, match="disk full"):
        prefixattn.save_prefix(model, path)
    assert path.read_bytes() == original
    assert sorted(os.listdir(tmp_path)) == ["p.safetensors"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_files_get_the_mode_a_plain_open_gives(tmp_path, umask):
    """The atomic write goes through a private temporary file (0600); the output must not stay private
    where the user's umask shares files."""
    model = _patched()
    old = os.umask(umask)
    try:
        prefixattn.save_prefix(model, tmp_path / "p.safetensors")
        prefixattn.save_peft(model, tmp_path / "adapter")
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    for path in (tmp_path / "p.safetensors", *(tmp_path / "adapter").iterdir()):
        assert path.stat().st_mode & 0o777 == expected, path


def test_unpatched_model_is_refused(tmp_path):
    with pytest.raises(TypeError, match="not patched"):
        prefixattn.save_prefix(tiny_model("llama"), tmp_path / "x.safetensors")
