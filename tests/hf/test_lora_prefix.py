"""LoRA and a prefix on one model (PEFT cannot combine them): ``prefixattn.patch(lora_model, P)``.

References: PEFT's LoRA merged into the weights + PEFT's own (cache-based) prefix tuning; the patched
base model (a LoRA whose B is zero changes nothing); the triton backend against the torch one.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close_rel
from tiny_models import batch, generate, labels_for, peft_prefix_as_kv, peft_twin, tiny_model

import prefixattn
from prefixattn.prefix import find_prefix

P = 3


def _lora(base, *, random_b: bool = True, seed: int = 1, **config):
    """A PEFT LoRA model over a copy of ``base``; with random_b, B is nonzero so LoRA changes the output."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, **config)
    model = get_peft_model(copy.deepcopy(base), cfg)
    if random_b:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.2)
    return model


def _set_prefix(model, kv):
    find_prefix(model).set_values(kv)


def _loss(model, padding="left", seed=2):
    ids, mask = batch(padding=padding, seed=seed)
    out = model(input_ids=ids, attention_mask=mask, labels=labels_for(ids, mask))
    return out.loss, out.logits


def _trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def test_patch_keeps_lora_trainable_adds_a_trainable_prefix_and_one_step_trains_both():
    from peft import PeftModel

    lora = _lora(tiny_model("llama"))
    lora_flags = {n: p.requires_grad for n, p in lora.named_parameters()}
    model = prefixattn.patch(lora, num_prefix_tokens=P, backend="torch")
    assert isinstance(model, PeftModel) and model is lora and prefixattn.is_patched(model)
    for n, p in model.named_parameters():
        if n in lora_flags:
            assert p.requires_grad == lora_flags[n], n  # exactly as PEFT set them
    names = set(_trainable(model))
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    assert "base_model.model.prefixattn_prefix.modules_to_save.default.kv" in names
    assert all("lora_" in n or "prefixattn_prefix.modules_to_save.default" in n for n in names), names

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(_trainable(model).values(), lr=1e-2)
    model.train()
    loss, _ = _loss(model)
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (n in names), n  # LoRA and prefix changed, the base did not
    # the prefix the model reads is the trained copy
    assert find_prefix(model) is model.base_model.model.prefixattn_prefix.modules_to_save["default"]


def test_zero_lora_b_gives_the_patched_base_models_logits():
    base = tiny_model("llama")
    plain = prefixattn.patch(copy.deepcopy(base), num_prefix_tokens=P, backend="torch")
    lora = prefixattn.patch(_lora(base, random_b=False), num_prefix_tokens=P, backend="torch")
    _set_prefix(lora, find_prefix(plain).kv.detach().clone())
    for padding in ("none", "left", "right"):
        ids, mask = batch(padding=padding)
        expected = plain(input_ids=ids, attention_mask=mask).logits
        got = lora(input_ids=ids, attention_mask=mask).logits
        assert_close_rel(got, expected, 1e-6, padding)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_matches_merged_lora_plus_peft_prefix_tuning(padding):
    """Independent reference: PEFT's LoRA merged into the weights, then PEFT's own prefix tuning with the
    same prefix values."""
    base = tiny_model("llama")
    lora = _lora(base)
    merged = copy.deepcopy(lora).merge_and_unload()
    reference = peft_twin(merged, num_virtual_tokens=P)
    ours = prefixattn.patch(lora, num_prefix_tokens=P, backend="torch")
    _set_prefix(ours, peft_prefix_as_kv(reference).clone())
    ids, mask = batch(padding=padding)
    expected = reference(input_ids=ids, attention_mask=mask).logits
    got = ours(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert_close_rel(got[real], expected[real], 1e-5, "logits")
    if padding == "left":  # generate(): positions from the mask (+P), decode steps with LoRA and prefix
        kw = dict(attention_mask=mask, max_new_tokens=5, pad_token_id=0, do_sample=False)
        assert torch.equal(ours.generate(input_ids=ids, **kw), generate(reference, input_ids=ids, **kw))
    # the base logits differ with the LoRA: the comparison can fail
    plain = prefixattn.patch(copy.deepcopy(base), num_prefix_tokens=P, backend="torch")
    _set_prefix(plain, peft_prefix_as_kv(reference).clone())
    assert (plain(input_ids=ids, attention_mask=mask).logits[real] - expected[real]).abs().max() > 1e-3


def test_triton_backend_matches_torch_backend_loss_and_gradients():
    base = tiny_model("llama")
    torch.manual_seed(5)
    a = prefixattn.patch(_lora(base), num_prefix_tokens=P, backend="torch")
    b = prefixattn.patch(_lora(base), num_prefix_tokens=P, backend="triton")
    _set_prefix(b, find_prefix(a).kv.detach().clone())
    grads = []
    for model in (a, b):
        model.train()
        loss, _ = _loss(model)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in _trainable(model).items()}))
    (la, ga), (lb, gb) = grads
    assert_close_rel(lb, la, 1e-5, "loss")
    assert ga.keys() == gb.keys() and any("lora_B" in n for n in ga) and any("prefixattn" in n for n in ga)
    for n in ga:
        assert_close_rel(gb[n], ga[n], 2e-4, n)


def _step(model, seed=3):
    opt = torch.optim.SGD(_trainable(model).values(), lr=0.5)
    model.train()
    loss, _ = _loss(model, seed=seed)
    loss.backward()
    opt.step()
    model.eval()


def test_save_pretrained_and_save_prefix_rebuild_the_same_model(tmp_path):
    from peft import PeftModel
    from safetensors import safe_open

    base = tiny_model("llama")
    model = prefixattn.patch(_lora(base), num_prefix_tokens=P, backend="torch")
    _step(model)
    model.save_pretrained(str(tmp_path / "lora"))
    prefixattn.save_prefix(model, tmp_path / "prefix.safetensors")  # takes the PeftModel
    with safe_open(str(tmp_path / "lora" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.prefixattn_prefix.kv" in keys and any("lora_B" in k for k in keys)
    ids, mask = batch(padding="left")
    expected = model(input_ids=ids, attention_mask=mask).logits

    # base -> PeftModel.from_pretrained -> patch -> load_prefix
    rebuilt = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lora"))
    rebuilt = prefixattn.patch(rebuilt, num_prefix_tokens=P, backend="torch")
    prefixattn.load_prefix(rebuilt, tmp_path / "prefix.safetensors")
    torch.testing.assert_close(rebuilt(input_ids=ids, attention_mask=mask).logits, expected)

    # or the adapter file alone: load_adapter after patching restores LoRA and prefix
    again = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lora"))
    again = prefixattn.patch(again, num_prefix_tokens=P, backend="torch")
    assert not torch.allclose(again(input_ids=ids, attention_mask=mask).logits, expected)
    again.load_adapter(str(tmp_path / "lora"), "default")
    torch.testing.assert_close(again(input_ids=ids, attention_mask=mask).logits, expected)


def test_merge_and_unload_keeps_the_trained_prefix():
    model = prefixattn.patch(_lora(tiny_model("llama")), num_prefix_tokens=P, backend="torch")
    _step(model)
    ids, mask = batch(padding="left")
    expected = model(input_ids=ids, attention_mask=mask).logits
    merged = model.merge_and_unload()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert_close_rel(merged(input_ids=ids, attention_mask=mask).logits, expected, 1e-5, "merged")


def test_unpatch_removes_the_prefix_and_its_modules_to_save_entry():
    base = tiny_model("llama")
    lora = _lora(base)
    ids, mask = batch()
    expected = lora(input_ids=ids, attention_mask=mask).logits
    model = prefixattn.patch(lora, num_prefix_tokens=P, backend="torch")
    prefixattn.unpatch(model)
    assert not prefixattn.is_patched(model)
    assert "prefixattn_prefix" not in (model.peft_config["default"].modules_to_save or [])
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, expected)


def test_gradient_checkpointing_gives_the_same_gradients():
    base = tiny_model("llama")
    a = prefixattn.patch(_lora(base), num_prefix_tokens=P, backend="torch")
    b = prefixattn.patch(_lora(base), num_prefix_tokens=P, backend="torch")
    _set_prefix(b, find_prefix(a).kv.detach().clone())
    kwargs = {"use_reentrant": False}
    if hasattr(b, "activation_checkpointing_enable"):  # transformers >= 5.2x
        b.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        b.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in b.modules())
    out = []
    for model in (a, b):
        model.train()
        loss, _ = _loss(model)
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in _trainable(model).items()}))
    (la, ga), (lb, gb) = out
    assert_close_rel(lb, la, 1e-6, "loss")
    assert ga.keys() == gb.keys()
    for n in ga:
        assert_close_rel(gb[n], ga[n], 1e-5, n)


def test_get_peft_model_on_a_patched_model_is_refused_when_it_freezes_the_prefix():
    from peft import LoraConfig, get_peft_model

    patched = prefixattn.patch(tiny_model("llama"), num_prefix_tokens=P, backend="torch")
    model = get_peft_model(patched, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert not find_prefix(model).kv.requires_grad  # what PEFT did
    ids, mask = batch()
    model.eval()
    model(input_ids=ids, attention_mask=mask)  # inference is fine
    model.train()
    with pytest.raises(ValueError, match=r"prefixattn.patch\(get_peft_model\(base"):
        model(input_ids=ids, attention_mask=mask, labels=ids)
    with pytest.raises(ValueError, match=r"already patched.*prefixattn.patch\(get_peft_model\(base"):
        prefixattn.patch(model, num_prefix_tokens=P)


def test_get_peft_model_with_modules_to_save_trains_the_copy_the_model_reads(tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors import safe_open

    patched = prefixattn.patch(tiny_model("llama"), num_prefix_tokens=P, backend="torch")
    original = patched.prefixattn_prefix
    model = get_peft_model(patched, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                               modules_to_save=["prefixattn_prefix"]))
    copy_ = find_prefix(model)
    assert copy_ is not original and copy_.kv.requires_grad and not original.kv.requires_grad
    before = original.kv.detach().clone()
    _step(model)
    assert torch.equal(original.kv, before) and not torch.equal(copy_.kv, before)
    # the model reads the copy: the original's values do not matter, the copy's do
    ids, mask = batch()
    logits = model(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        original.kv.zero_()
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, logits)
    with torch.no_grad():
        copy_.kv.mul_(0.5)
    assert not torch.allclose(model(input_ids=ids, attention_mask=mask).logits, logits)
    model.save_pretrained(str(tmp_path))
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.prefixattn_prefix.kv" in set(f.keys())


def test_a_bank_of_prefixes_next_to_lora():
    base = tiny_model("llama")
    model = prefixattn.patch(_lora(base), num_prefix_tokens=P, num_prefixes=3, backend="torch")
    ids, mask = batch(padding="left")
    index = torch.tensor([2, 0, 2])
    got = model(input_ids=ids, attention_mask=mask, prefix_ids=index).logits
    bank = find_prefix(model).kv.detach()
    for entry in (0, 2):
        single = prefixattn.patch(_lora(base), num_prefix_tokens=P, backend="torch")
        _set_prefix(single, bank[:, :, entry : entry + 1].clone())
        rows = index == entry
        expected = single(input_ids=ids[rows], attention_mask=mask[rows]).logits
        assert_close_rel(got[rows], expected, 1e-6, f"entry {entry}")
    out = model.generate(input_ids=ids, attention_mask=mask, prefix_ids=index, max_new_tokens=3, pad_token_id=0)
    assert out.shape == (3, ids.shape[1] + 3)


def test_other_weight_tuners_train_with_the_prefix():
    from peft import IA3Config, get_peft_model

    model = get_peft_model(tiny_model("llama"), IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                          feedforward_modules=["down_proj"]))
    model = prefixattn.patch(model, num_prefix_tokens=P, backend="torch")
    names = set(_trainable(model))
    assert any("ia3_l" in n for n in names) and any("prefixattn_prefix" in n for n in names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _step(model)
    for n, p in model.named_parameters():
        assert (not torch.equal(p, before[n])) == (n in names), n


def test_refused_peft_methods():
    from peft import PromptTuningConfig, get_peft_model

    prompt = get_peft_model(tiny_model("llama"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(ValueError, match="PROMPT_TUNING"):
        prefixattn.patch(prompt, num_prefix_tokens=P)
    model = prefixattn.patch(_lora(tiny_model("llama")), num_prefix_tokens=P, backend="torch")
    with pytest.raises(ValueError, match="already patched"):
        prefixattn.patch(model, num_prefix_tokens=P)
