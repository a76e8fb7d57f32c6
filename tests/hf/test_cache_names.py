"""The KV cache under both of its names.

transformers 5.24 renamed the forward argument ``past_key_values`` to ``cache`` (the old name is a deprecated
alias until 5.40, renamed inside forward, after prefixattn's pre-hook has run). The pre-hook must see a cache
passed either way: positions continue from the cache's length, and every refusal that depends on a cache
(static caches, packed rows) holds under both names. On a transformers that only knows the old name, only
the old name is tested.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close_rel
from tiny_models import batch, cache_is_renamed, peft_generate, peft_twin, tiny_model
from transformers import DataCollatorWithFlattening, DynamicCache, StaticCache

import prefixattn

TOL = 1e-5
CACHE_NAMES = ("cache", "past_key_values") if cache_is_renamed(tiny_model("llama")) else ("past_key_values",)

pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")


def _patched(family: str = "llama"):
    torch.manual_seed(0)
    model = prefixattn.patch(tiny_model(family), num_prefix_tokens=3, backend="torch")
    with torch.no_grad():  # a small prefix: the continuation depends on the tokens, not only the prefix
        model.prefixattn_prefix.kv.mul_(0.3)
    return model


@pytest.mark.parametrize("name", CACHE_NAMES)
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_a_decode_step_without_position_ids_equals_the_full_forward(family, name):
    """``model(next_ids, cache=c)`` by hand, no position_ids: the new token sits at position P + past."""
    model = _patched(family)
    ids, _ = batch(batch_size=2, length=6, seed=11)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        first = model(input_ids=ids[:, :4], use_cache=True)
        cache = first.past_key_values
        assert cache.get_seq_length() == 4  # the prefix stays out of the cache
        step = model(input_ids=ids[:, 4:5], use_cache=True, **{name: cache})
        step2 = model(input_ids=ids[:, 5:6], use_cache=True, **{name: step.past_key_values})
    assert_close_rel(first.logits, full[:, :4], TOL, "prefill")
    assert_close_rel(step.logits[:, 0], full[:, 4], TOL, "decode step 1")
    assert_close_rel(step2.logits[:, 0], full[:, 5], TOL, "decode step 2")


@pytest.mark.parametrize("name", CACHE_NAMES)
def test_a_static_cache_is_refused_under_either_name(name):
    model = _patched()
    ids, _ = batch(batch_size=2, length=5)
    cache = StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad(), pytest.raises(ValueError, match="static"):
        model(input_ids=ids, use_cache=True, **{name: cache})


def test_generate_with_a_static_cache_is_refused_with_or_without_a_mask():
    model = _patched()
    ids, mask = batch(batch_size=2, length=5, padding="left")
    for kw in ({}, {"attention_mask": mask}):
        with pytest.raises(ValueError, match="static"):
            model.generate(input_ids=ids, max_new_tokens=2, cache_implementation="static", pad_token_id=0, **kw)


@pytest.mark.parametrize("name", CACHE_NAMES)
def test_packing_with_a_cache_is_refused_under_either_name(name):
    model = _patched()
    docs = [torch.tensor([5, 6, 7]), torch.tensor([8, 9])]
    packed = DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": d} for d in docs])
    with torch.no_grad(), pytest.raises(ValueError, match="packed rows .*KV cache"):
        model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
              **{name: DynamicCache(config=model.config)})
    with torch.no_grad(), pytest.raises(ValueError, match="packed rows .*KV cache"):
        model(input_ids=packed["input_ids"], cu_seq_lens_q=packed["cu_seq_lens_q"],
              cu_seq_lens_k=packed["cu_seq_lens_k"], **{name: DynamicCache(config=model.config)})


def test_peft_generate_as_shipped():
    """Records what PEFT's own generate() does on the installed transformers, so we notice when it changes.

    PEFT (0.21.2) hands its prefix to the model under ``past_key_values``; transformers >= 5.24 reads
    ``cache`` and drops the old key from generate()'s inputs, so PEFT decodes without its prefix. The
    reference the tests use (``peft_generate``) hands the prefix over as ``cache`` and equals prefixattn.
    When this test fails on a renamed transformers, PEFT has fixed its generate(): drop the fix in
    tiny_models.peft_generate_fixed."""
    base = tiny_model("llama")
    peft_model = peft_twin(base).eval()
    ours = prefixattn.patch(copy.deepcopy(peft_model), backend="torch")
    ids, mask = batch(padding="left", seed=3)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    fixed = peft_generate(peft_model, **kw)
    assert torch.equal(ours.generate(**kw), fixed)
    shipped = peft_model.generate(**kw)
    if cache_is_renamed(base):
        assert not torch.equal(shipped, fixed), "PEFT's generate() now hands its prefix over: drop the fix"
    else:
        assert torch.equal(shipped, fixed)
