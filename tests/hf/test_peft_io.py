"""PEFT's adapter format: save_peft output loads with peft.PeftModel.from_pretrained (same logits and greedy
generations), load_peft reads adapters PEFT saved, and mismatches/corrupt files give clear errors."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from helpers import assert_close_rel
from tiny_models import batch, generate, patched_twin, peft_twin, tiny_model

import prefixattn

TOL = 1e-4


def _gen(model, ids, mask):
    return generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                    pad_token_id=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_save_peft_loads_in_peft_with_the_same_logits_and_generations(tmp_path, family):
    from peft import PeftModel

    base = tiny_model(family)
    ours = prefixattn.patch(copy.deepcopy(base), num_prefix_tokens=5, backend="torch")
    prefixattn.save_peft(ours, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    ids, mask = batch(padding="left")
    with torch.no_grad():
        assert_close_rel(ours(input_ids=ids, attention_mask=mask).logits,
                         peft_model(input_ids=ids, attention_mask=mask).logits, TOL, "logits")
    assert torch.equal(_gen(ours, ids, mask), _gen(peft_model, ids, mask))


def test_save_peft_bakes_the_mlp_in(tmp_path):
    from peft import PeftModel

    base = tiny_model("qwen2")
    ours = prefixattn.patch(copy.deepcopy(base), num_prefix_tokens=3, prefix_projection=True, backend="torch")
    prefixattn.save_peft(ours, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PREFIX_TUNING" and cfg["prefix_projection"] is False
    assert (cfg["num_virtual_tokens"], cfg["num_layers"], cfg["token_dim"], cfg["num_attention_heads"]) == (3, 2, 32, 2)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    ids, mask = batch(padding="right")
    with torch.no_grad():
        assert_close_rel(ours(input_ids=ids, attention_mask=mask).logits,
                         peft_model(input_ids=ids, attention_mask=mask).logits, TOL, "logits")


@pytest.mark.parametrize("projection", [False, True])
def test_load_peft_reads_adapters_saved_by_peft(tmp_path, projection):
    peft_model = peft_twin(tiny_model("mistral"), num_virtual_tokens=4, prefix_projection=projection).eval()
    peft_model.save_pretrained(str(tmp_path))
    ours = prefixattn.load_peft(tiny_model("mistral"), tmp_path, backend="torch")
    assert prefixattn.is_patched(ours)
    ids, mask = batch(padding="left")
    with torch.no_grad():
        assert_close_rel(ours(input_ids=ids, attention_mask=mask).logits,
                         peft_model(input_ids=ids, attention_mask=mask).logits, TOL, "logits")
    # into an already patched model as well
    again = prefixattn.patch(tiny_model("mistral"), num_prefix_tokens=4, backend="torch")
    prefixattn.load_peft(again, tmp_path)
    torch.testing.assert_close(again.prefixattn_prefix.kv, ours.prefixattn_prefix.kv)


def test_load_peft_validates_against_the_model(tmp_path):
    peft_twin(tiny_model("llama"), num_virtual_tokens=4).save_pretrained(str(tmp_path))
    gpt2 = tiny_model("gpt2")
    with pytest.raises(ValueError, match="num_attention_heads.*adapter has 2, model has 4"):
        prefixattn.load_peft(gpt2, tmp_path)
    assert not prefixattn.is_patched(gpt2)
    patched = prefixattn.patch(tiny_model("llama"), num_prefix_tokens=6, backend="torch")
    before = patched.prefixattn_prefix.kv.detach().clone()
    with pytest.raises(ValueError, match="num_virtual_tokens: adapter has 4, model has 6"):
        prefixattn.load_peft(patched, tmp_path)
    torch.testing.assert_close(patched.prefixattn_prefix.kv, before, rtol=0, atol=0)


def test_load_peft_refuses_corrupt_pickled_and_foreign_adapters(tmp_path):
    good = tmp_path / "good"
    peft_twin(tiny_model("llama"), num_virtual_tokens=4).save_pretrained(str(good))
    model = tiny_model("llama")

    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    (bad / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes()[:50])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        prefixattn.load_peft(model, bad)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="pickle"):
        prefixattn.load_peft(model, pickled)

    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ValueError, match="'LORA' adapter"):
        prefixattn.load_peft(model, lora)

    wrong_shape = tmp_path / "wrong_shape"
    wrong_shape.mkdir()
    cfg = json.loads((good / "adapter_config.json").read_text())
    cfg["num_virtual_tokens"] = 5
    (wrong_shape / "adapter_config.json").write_text(json.dumps(cfg))
    (wrong_shape / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"prompt_embeddings has shape \(4, 128\).*says \(5, 128\)"):
        prefixattn.load_peft(model, wrong_shape)
    with pytest.raises(FileNotFoundError):
        prefixattn.load_peft(model, tmp_path / "nowhere")
    assert not prefixattn.is_patched(model)


def test_save_peft_refuses_partial_layers_and_failed_saves_leave_nothing(tmp_path, monkeypatch):
    ours = prefixattn.patch(tiny_model("llama"), num_prefix_tokens=4, layers=[0], backend="torch")
    with pytest.raises(ValueError, match=r"PEFT puts a prefix on layers \[0, 1\], this prefix covers layers \[0\]"):
        prefixattn.save_peft(ours, tmp_path / "a")
    import safetensors.torch

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    full = prefixattn.patch(tiny_model("llama"), num_prefix_tokens=4, backend="torch")
    with pytest.raises(OSError):
        prefixattn.save_peft(full, tmp_path / "b")
    assert os.listdir(tmp_path / "b") == []


def test_patch_of_a_peft_model_returns_the_patched_base_model():
    peft_model = peft_twin(tiny_model("llama"))
    ours = patched_twin(peft_model)
    assert type(ours).__name__ == "LlamaForCausalLM" and prefixattn.is_patched(ours)
    with pytest.raises(ValueError, match="PrefixTuningConfig"):
        prefixattn.patch(copy.deepcopy(peft_model), num_prefix_tokens=4)
