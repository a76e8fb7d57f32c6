"""generate() on the torch backend keeps each row's prefix in the KV cache, in front of the sequence (PEFT's
layout; ``prefixattn/hf/decode_cache.py``), and a plain decode step is one SDPA call over it.

What must hold: the generations and their logits equal PEFT's (the fixed reference, ``tiny_models.generate``)
and the full forward's; the cache counts the sequence only (positions, masks, crop, reset); the layers that
cache another form than their keys (latent attention) or transform them keep the prefix out; a cache that
holds the prefix is refused under grad.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close_rel
from tiny_models import batch, generate, patched_twin, peft_twin, tiny_model
from transformers import DynamicCache

import prefixattn
import prefixattn.hf.attention as attention_module
from prefixattn.hf.decode_cache import PrefixedCacheLayer
from prefixattn.hf.state import get_state

TOL = 1e-5  # relative, fp32 logits


@pytest.fixture
def decode_calls(monkeypatch):
    """Counts the decode steps that ran as one SDPA call over a cache that holds the prefix."""
    calls = []
    real = attention_module.decode_over_cache

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_module, "decode_over_cache", counting)
    return calls


def _pair(family: str):
    peft_model = peft_twin(tiny_model(family), num_virtual_tokens=4)
    with torch.no_grad():  # a prefix that visibly moves the logits
        peft_model.prompt_encoder["default"].embedding.weight.normal_(0, 1.0)
    return peft_model.eval(), patched_twin(peft_model, backend="torch").eval()


def _cache_of(out):
    return getattr(out, "past_key_values", None) or getattr(out, "cache", None)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2", "opt"])
def test_generate_holds_the_prefix_in_the_cache_and_matches_peft(family, decode_calls):
    peft_model, ours = _pair(family)
    ids, mask = batch(padding="left", seed=7)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
              return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        expected = generate(peft_model, **kw)
        got = ours.generate(**kw)
    assert torch.equal(got.sequences, expected.sequences)
    for step, (lo, lp) in enumerate(zip(got.logits, expected.logits, strict=True)):
        assert_close_rel(lo, lp, TOL, f"logits of step {step}")
    cache = _cache_of(got)
    layers = [layer for layer in cache.layers if isinstance(layer, PrefixedCacheLayer)]
    assert layers and all(layer.prefix_len == 4 for layer in layers)
    # the cache counts the sequence only; its tensors hold the prefix in front
    assert cache.get_seq_length() == ids.shape[1] + 5 - 1
    assert layers[0].keys.shape[-2] == 4 + cache.get_seq_length()
    # every decode step of every held layer was one SDPA call (left padding included)
    assert len(decode_calls) == 4 * len(layers)


def _model(dtype=torch.float64):
    model = tiny_model("llama").to(dtype)
    ours = prefixattn.patch(model, num_prefix_tokens=3, backend="torch").eval()
    with torch.no_grad():
        ours.prefixattn_prefix.kv.normal_(0, 1.0)
    return ours


def _step(model, ids, mask, cache):
    return model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits


def test_decode_steps_and_chunks_equal_the_full_forward(decode_calls):
    """float64: prefill, decode steps (one SDPA call), a two-token chunk (the op over the cached prefix
    rows as views), all against one forward over the whole left-padded sequence without a cache."""
    ours = _model()
    ids, mask = batch(batch_size=3, length=9, padding="left", seed=3)
    with torch.no_grad():
        full = ours(input_ids=ids, attention_mask=mask).logits
        cache = DynamicCache(config=ours.config)
        parts = [_step(ours, ids[:, :5], mask[:, :5], cache)]
        parts.append(_step(ours, ids[:, 5:6], mask[:, :6], cache))
        parts.append(_step(ours, ids[:, 6:8], mask[:, :8], cache))  # a chunk of two
        parts.append(_step(ours, ids[:, 8:9], mask, cache))
    assert all(isinstance(layer, PrefixedCacheLayer) for layer in cache.layers)
    real = mask.bool()
    got = torch.cat(parts, 1)
    assert_close_rel(got[real], full[real], 1e-10, "cached steps vs full forward")
    assert len(decode_calls) == 2 * len(cache.layers)  # the two one-token steps


def test_crop_and_reset_count_the_sequence_only():
    ours = _model()
    ids, mask = batch(batch_size=2, length=8, padding="none", seed=4)
    with torch.no_grad():
        full = ours(input_ids=ids, attention_mask=mask).logits
        cache = DynamicCache(config=ours.config)
        _step(ours, ids, mask, cache)
        assert cache.get_seq_length() == 8
        cache.crop(-3)  # assisted decoding's rollback
        assert cache.get_seq_length() == 5
        assert cache.layers[0].keys.shape[-2] == 3 + 5
        again = _step(ours, ids[:, 5:6], mask[:, :6], cache)
        assert_close_rel(again[:, -1], full[:, 5], 1e-10, "step after crop")
        cache.crop(4)  # the legacy form: the length to keep
        assert cache.get_seq_length() == 4 and cache.layers[0].keys.shape[-2] == 3 + 4
        cache.crop(10)  # longer than the cache: nothing to cut
        assert cache.get_seq_length() == 4
        cache.crop(-100)  # never into the prefix
        assert cache.get_seq_length() == 0 and cache.layers[0].keys.shape[-2] == 3
        cache.reset()
        assert cache.get_seq_length() == 0
        fresh = _step(ours, ids[:, :4], mask[:, :4], cache)
        assert cache.layers[0].keys.shape[-2] == 3 + 4
    assert_close_rel(fresh, full[:, :4], 1e-10, "prefill after reset")


def test_a_cache_that_holds_the_prefix_is_refused_under_grad():
    ours = _model(torch.float32)
    ids, mask = batch(batch_size=2, length=5, padding="none")
    with torch.no_grad():
        cache = DynamicCache(config=ours.config)
        _step(ours, ids, mask, cache)
    with pytest.raises(ValueError, match="holds the prefix rows"):
        _step(ours, ids[:, :1], torch.ones(2, 6, dtype=torch.long), cache)
    # under grad a fresh cache keeps the prefix out (the prefix gets its gradient)
    fresh = DynamicCache(config=ours.config)
    _step(ours, ids, mask, fresh).sum().backward()
    assert not any(isinstance(layer, PrefixedCacheLayer) for layer in fresh.layers)
    assert ours.prefixattn_prefix.kv.grad is not None


def test_a_cache_made_inside_forward_or_by_the_caller_before_keeps_the_prefix_out():
    ours = _model()
    ids, mask = batch(batch_size=2, length=5, padding="none")
    with torch.no_grad():
        out = ours(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = _cache_of(out)
        assert not any(isinstance(layer, PrefixedCacheLayer) for layer in cache.layers)
        step = _step(ours, ids[:, :1], torch.ones(2, 6, dtype=torch.long), cache)
        full = ours(input_ids=torch.cat([ids, ids[:, :1]], 1)).logits
    assert_close_rel(step[:, -1], full[:, -1], 1e-10, "decode over a sequence-only cache")


@pytest.mark.parametrize("family", ["deepseek_v3", "dory"])
def test_layers_that_cache_another_form_keep_the_prefix_out(family):
    """Latent attention caches its compressed keys, Dory copies its cache: the patch-time probe leaves
    them out and generate() runs as before, equal to the full forward."""
    from family_configs import tiny_causal_lm
    from transformers import CONFIG_MAPPING

    if family not in CONFIG_MAPPING:
        pytest.skip(f"{family} is newer than this transformers")
    ours = prefixattn.patch(copy.deepcopy(tiny_causal_lm(family)).eval(), num_prefix_tokens=3, backend="torch")
    assert get_state(ours).cache_layers == frozenset()
    ids = torch.randint(3, 60, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = ours.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2,
                            do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
        full = ours(input_ids=out.sequences[:, :-1]).logits
    assert not any(isinstance(layer, PrefixedCacheLayer) for layer in getattr(_cache_of(out), "layers", []))
    assert_close_rel(out.logits[1], full[:, -1], 1e-4, "second generated token's logits")


def test_appends_in_place_and_grows_past_the_spare_rows():
    """80 one-token steps (past MIN_GROWTH spare rows, so the buffers grow) and a beam-style reorder (the
    layer then re-buffers) equal the full forward, float64."""
    from prefixattn.hf.decode_cache import MIN_GROWTH

    ours = _model()
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(3, 90, (2, 4 + MIN_GROWTH + 16), generator=g)
    order = torch.tensor([1, 0])
    with torch.no_grad():
        full = ours(input_ids=ids).logits
        full_swapped = ours(input_ids=ids[order]).logits
        cache = DynamicCache(config=ours.config)
        got = [_step(ours, ids[:, :4], None, cache)]
        layer = cache.layers[0]
        first_buffer = layer._k_buf
        for t in range(4, ids.shape[1] - 1):
            got.append(_step(ours, ids[:, t:t + 1], None, cache))
            assert layer.keys.data_ptr() == layer._k_buf.data_ptr()  # a view of the buffer, no copy
        assert layer._k_buf is not first_buffer and layer._k_buf.shape[-2] >= 3 + ids.shape[1] - 1
        cache.reorder_cache(order)
        last = _step(ours, ids[order, -1:], None, cache)
    assert_close_rel(torch.cat(got, 1), full[:, :-1], 1e-10, "one-token steps vs full forward")
    assert_close_rel(last[:, -1], full_swapped[:, -1], 1e-10, "step after reordering the batch")
