"""Layers of different shapes (issue 12): latent attention (key head dim != value head dim: DeepSeek V2/V3,
MiniCPM3, ...), per-layer head dims and KV-head counts (Gemma 4), and layers that share another layer's
keys and values (Gemma 4's KV sharing).

Against PEFT where it runs (Gemma 4: its adapter is sized for the largest layer and sliced per layer,
layers larger than it are skipped), against a float64 per-layer reference where it cannot (latent
attention), and through prefixattn's own and PEFT's file formats.
"""

from __future__ import annotations

import copy

import pytest
import torch
from family_configs import tiny_causal_lm
from family_sweep import (
    NUM_VIRTUAL_TOKENS,
    compare_with_peft,
    compare_with_reference,
    peft_twin,
    right_padded_batch,
)
from helpers import assert_close_rel
from tiny_models import generate

import prefixattn
from prefixattn.prefix import PrefixConfig

TOL = 1e-4


def _logits(model, **kw):
    ids, mask = right_padded_batch(128)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits


def _loss(model):
    ids, mask = right_padded_batch(128)
    return model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss


def gemma4_kv_sharing(global_head_dim: int = 32, seed: int = 0):
    """A tiny Gemma 4 whose last two layers attend over the first two layers' keys and values; the
    global (full-attention) layers have a larger head dim than the sliding ones."""
    from transformers import AutoModelForCausalLM, Gemma4TextConfig

    config = Gemma4TextConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, global_head_dim=global_head_dim, intermediate_size=64, sliding_window=128,
        hidden_size_per_layer_input=8, vocab_size_per_layer_input=128,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        num_kv_shared_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=256)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


# ---------------------------------------------------------------------------------------------------
# latent attention
# ---------------------------------------------------------------------------------------------------


def test_latent_attention_gets_keys_and_values_of_their_own_head_dims(tmp_path):
    base = tiny_causal_lm("deepseek_v2")
    model = prefixattn.patch(copy.deepcopy(base), num_prefix_tokens=3, backend="torch")
    c = model.prefixattn_prefix.config
    # qk = nope 16 + rope 8 = 24, v = 16; stored at the larger one, values in the leading 16 dims
    assert (c.num_kv_heads, c.head_dim, c.layer_shapes) == (4, 24, ((4, 24, 16), (4, 24, 16)))
    assert c.latent
    compare_with_reference(model)

    model.train()
    _loss(model).backward()
    grad = model.prefixattn_prefix.kv.grad  # (L, 2, 1, Hkv, P, 24)
    assert grad[:, 0].abs().amin(dim=(-1, -2)).gt(0).all(), "every key dim of every head trains"
    assert grad[:, 1, ..., :16].abs().sum() > 0
    assert torch.equal(grad[:, 1, ..., 16:], torch.zeros_like(grad[:, 1, ..., 16:])), "unused value dims"

    path = tmp_path / "prefix.safetensors"
    prefixattn.save_prefix(model, path)
    other = prefixattn.patch(copy.deepcopy(base), num_prefix_tokens=3, backend="torch")
    assert not torch.allclose(_logits(other), _logits(model))
    prefixattn.load_prefix(other, path)
    torch.testing.assert_close(_logits(other), _logits(model), rtol=0, atol=0)

    with pytest.raises(ValueError, match="latent attention .* PEFT's prefix tuning cannot run"):
        prefixattn.save_peft(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "adapter_config.json").exists()


def test_latent_attention_bank_and_init_from_text():
    base = tiny_causal_lm("minicpm3")
    model = prefixattn.patch(copy.deepcopy(base), num_prefix_tokens=3, num_prefixes=2, init="text",
                             init_text=[[5, 6, 7], [9, 10]], backend="torch")
    ids = torch.tensor([[20, 21, 22, 23], [30, 31, 32, 33]])
    with torch.no_grad():
        got = model(input_ids=ids, prefix_ids=torch.tensor([0, 1])).logits
        # the prefix starts out as if the text preceded the input (PEFT's init-from-text rule)
        want0 = base(input_ids=torch.tensor([[5, 6, 7, 20, 21, 22, 23]])).logits[:, 3:]
        want1 = base(input_ids=torch.tensor([[9, 10, 9, 30, 31, 32, 33]])).logits[:, 3:]
    assert_close_rel(got[0:1], want0, TOL, "entry 0")
    assert_close_rel(got[1:2], want1, TOL, "entry 1")


# ---------------------------------------------------------------------------------------------------
# Gemma 4: per-layer head dims and KV-head counts, PEFT's adapters both ways
# ---------------------------------------------------------------------------------------------------


def test_gemma4_patch_gives_every_layer_a_prefix_of_its_own_shape(tmp_path):
    base = tiny_causal_lm("gemma4_text")  # sliding layer 0: 2 KV heads x 16; global layer 1: 1 x 32
    model = prefixattn.patch(copy.deepcopy(base), num_prefix_tokens=3, backend="torch")
    c = model.prefixattn_prefix.config
    assert (c.layers, c.num_kv_heads, c.head_dim, c.layer_shapes) == ((0, 1), 2, 32, ((2, 16, 16), (1, 32, 32)))
    compare_with_reference(model)
    # PEFT sizes this model's adapter for layer 1 (1 x 32) and skips layer 0: not PEFT's layout
    with pytest.raises(ValueError, match="PEFT sizes this model's prefix as 1 KV heads x head dim 32"):
        prefixattn.save_peft(model, tmp_path / "adapter")


def test_gemma4_adapter_saved_by_peft_loads_and_saves_back(tmp_path):
    from peft import PeftModel

    base = tiny_causal_lm("gemma4_text")
    peft_model = peft_twin(base).eval()  # PEFT gives layer 1 a prefix and skips layer 0 (2 KV heads > 1)
    peft_model.save_pretrained(str(tmp_path / "from_peft"))
    with pytest.warns(UserWarning, match=r"layers \[0\] have more KV heads"):
        ours = prefixattn.load_peft(copy.deepcopy(base), tmp_path / "from_peft", backend="torch")
    assert ours.prefixattn_prefix.config.layers == (1,)
    assert_close_rel(_logits(ours), _logits(peft_model), TOL, "logits of PEFT's adapter")

    ours.train()
    _loss(ours).backward()
    with torch.no_grad():
        ours.prefixattn_prefix.kv.sub_(0.1 * ours.prefixattn_prefix.kv.grad)
    ours.eval()
    prefixattn.save_peft(ours, tmp_path / "from_ours")
    back = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "from_ours")).eval()
    assert_close_rel(_logits(back), _logits(ours), TOL, "PEFT running our adapter")


def test_gemma4_layers_option_gives_peft_layout(tmp_path):
    from peft import PeftModel

    base = tiny_causal_lm("gemma4_text")
    model = prefixattn.patch(copy.deepcopy(base), num_prefix_tokens=3, layers=[1], backend="torch")
    c = model.prefixattn_prefix.config
    assert (c.layers, c.num_kv_heads, c.head_dim, c.layer_shapes) == ((1,), 1, 32, ())
    prefixattn.save_peft(model, tmp_path)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    # layer 0 carries no prefix, so positions start at 0, as PEFT numbers them (layer 0's cache is empty)
    assert_close_rel(_logits(model), _logits(peft_model), TOL, "logits")


def test_gemma4_kv_sharing_layers_read_their_source_layers_prefix():
    base = gemma4_kv_sharing()
    peft_model = peft_twin(base)
    ours = prefixattn.patch(copy.deepcopy(peft_model), backend="torch")
    assert ours._prefixattn_state.shared_kv == {2: 0, 3: 1}
    assert ours.prefixattn_prefix.config.layers == (0, 1)
    compare_with_peft(peft_model, ours)  # padded logits, one AdamW step, logits again
    # generate() slices the queries before the KV-sharing layers (and the mask with them)
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = (ids != 0).long()
    with torch.no_grad():
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(ours.generate(**kw), generate(peft_model, **kw))
    with pytest.raises(ValueError, match="layer 3 attends over layer 1's keys and values"):
        prefixattn.patch(copy.deepcopy(base), num_prefix_tokens=2, layers=[0, 3])


def test_gemma4_kv_sharing_adapter_round_trip(tmp_path):
    """save_peft writes rows for all 4 layers (PEFT's num_layers; the sharing layers' rows are never
    read) and PEFT running it computes the patched model's logits."""
    from peft import PeftModel

    base = gemma4_kv_sharing(seed=3)
    ours = prefixattn.patch(copy.deepcopy(base), num_prefix_tokens=3, backend="torch")
    prefixattn.save_peft(ours, tmp_path)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    assert_close_rel(_logits(ours), _logits(peft_model), TOL, "logits")


def test_save_peft_refuses_hybrids():
    """PEFT keys its adapter and cache by layer index; a hybrid's attention layers are not 0..n-1."""
    model = prefixattn.patch(tiny_causal_lm("jamba"), num_prefix_tokens=2, backend="torch")
    with pytest.raises(ValueError, match=r"attention layers are \[1\] among layers of other kinds"):
        prefixattn.save_peft(model, "unused")


def test_gemma4_kv_sharing_init_from_text_is_the_text_in_front():
    base = gemma4_kv_sharing()
    model = prefixattn.patch(copy.deepcopy(base), num_prefix_tokens=3, init="text", init_text=[5, 6, 7],
                             backend="torch")
    ids = torch.tensor([[20, 21, 22, 23, 24]])
    with torch.no_grad():
        want = base(input_ids=torch.tensor([[5, 6, 7, 20, 21, 22, 23, 24]])).logits[:, 3:]
        assert_close_rel(model(input_ids=ids).logits, want, TOL, "logits")


def test_head_dims_beyond_the_kernels():
    """Gemma 4's global layers have head dim 512 by default: 'auto' runs them in PyTorch (the kernels'
    tiles cover up to 256), 'triton' is refused at patch() naming the layers."""
    base = gemma4_kv_sharing(global_head_dim=272)
    peft_model = peft_twin(base)
    compare_with_peft(peft_model, prefixattn.patch(copy.deepcopy(peft_model), backend="auto"))
    with pytest.raises(ValueError, match=r"layers \[1\] have head dim 272; backend='triton' covers head dims "
                                         "up to 256"):
        prefixattn.patch(copy.deepcopy(base), num_prefix_tokens=2, backend="triton")


# ---------------------------------------------------------------------------------------------------
# the config
# ---------------------------------------------------------------------------------------------------


def test_prefix_config_layer_shapes():
    c = PrefixConfig(num_tokens=3, num_kv_heads=2, head_dim=32, layers=(0, 1), num_layers=2,
                     layer_shapes=((2, 16, 16), (1, 32, 32)))
    assert PrefixConfig.from_json(c.to_json()) == c
    uniform = PrefixConfig(num_tokens=3, num_kv_heads=2, head_dim=16, layers=(0, 1), num_layers=2)
    assert "layer_shapes" not in uniform.to_json()  # files of uniform prefixes are what version 1 wrote
    assert uniform.layer_shape(1) == (2, 16, 16) and not uniform.latent
    with pytest.raises(ValueError, match="does not fit the stored 2 x 16"):
        PrefixConfig(num_tokens=3, num_kv_heads=2, head_dim=16, layers=(0,), num_layers=1,
                     layer_shapes=((2, 24, 16),))
    with pytest.raises(ValueError, match="layer_shapes has 1 entries for 2 layers"):
        PrefixConfig(num_tokens=3, num_kv_heads=2, head_dim=16, layers=(0, 1), num_layers=2,
                     layer_shapes=((2, 16, 16),))


def test_load_prefix_names_a_layer_shape_mismatch(tmp_path):
    a = prefixattn.patch(tiny_causal_lm("gemma4_text"), num_prefix_tokens=NUM_VIRTUAL_TOKENS, backend="torch")
    prefixattn.save_prefix(a, tmp_path / "p.safetensors")
    b = prefixattn.patch(tiny_causal_lm("gemma4_text"), num_prefix_tokens=NUM_VIRTUAL_TOKENS, layers=[1],
                         backend="torch")
    with pytest.raises(ValueError, match="layer_shapes: file has"):
        prefixattn.load_prefix(b, tmp_path / "p.safetensors")


def test_attention_inputs_the_op_does_not_implement_are_refused():
    """A layer handing the attention function a score bias (Inkling's learned relative position bias)
    or per-token sinks is refused, never run with them ignored; other tensors pass through."""
    from prefixattn.hf.attention import unhandled_inputs

    bias = torch.zeros(2, 4, 5, 8)
    assert unhandled_inputs({"position_bias": bias, "sinks": torch.zeros(2, 4, 5, 1)}, 5, 8) == [
        "position_bias", "sinks"]
    assert unhandled_inputs({"my_bias": bias}, 5, 8) == ["my_bias"]  # shaped like scores: a bias
    assert unhandled_inputs({"labels": torch.zeros(2, 5, dtype=torch.long), "s_aux": torch.zeros(4),
                             "position_ids": torch.arange(5)[None], "sliding_window": 4,
                             "cos": torch.zeros(2, 5, 8)}, 5, 8) == []
    with pytest.raises(ValueError, match=r"hands the attention function \['position_bias'\]"):
        prefixattn.patch(tiny_causal_lm("inkling_text"), num_prefix_tokens=2, backend="torch")
