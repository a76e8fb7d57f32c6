"""ModernBERT: global layers and local layers that attend within a two-sided window.

ModernBERT's local layers show key j to query i when ``|i - j| <= config.sliding_window`` (=
local_attention // 2; transformers' bidirectional sliding-window mask) and hand the attention function
``sliding_window = config.sliding_window + 1``; the op's two-sided window (``causal=False``) shows key j
when ``|i - j| < W``: the same keys, no conversion. The prefix stays visible to every query.

PEFT cannot run ModernBERT: the model keeps no KV cache (its forward takes no ``past_key_values`` /
``cache``), and PEFT's prefix tuning, which hands its prefix over as a KV cache, refuses it ("Model does not
support past key values"). So the patched model is checked against a float64 reference per attention call
(tests/family_sweep_encdec.compare_with_reference: the layer's inputs over [prefix; keys] with an explicit
two-sided window), and the window itself against ModernBERT's own eager mask (no prefix).
"""

from __future__ import annotations

import pytest
import torch
from family_sweep_encdec import compare_with_reference
from tiny_encdec import P, peft_twin, text_batch

import prefixattn
from prefixattn.hf.attention import register

pytestmark = pytest.mark.usefixtures("one_thread")

LENGTH = 11  # longer than the local window (|i - j| <= 2), so the window shows


def _modernbert(local_attention: int = 4, attn_implementation: str = "eager"):
    """A tiny ModernBertForSequenceClassification: layers global, local, global."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "modernbert", vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=32, local_attention=local_attention, global_attn_every_n_layers=2, num_labels=3,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, cls_token_id=0, sep_token_id=2)
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation=attn_implementation)
    return model.eval()


def _inputs(padding: str = "right") -> dict:
    ids, mask = text_batch(97, length=LENGTH, pad=1, padding=padding)
    return {"input_ids": ids, "attention_mask": mask}


def test_peft_cannot_run_it():
    twin = peft_twin(_modernbert(), "SEQ_CLS")
    with pytest.raises(ValueError, match="does not support past key values"):
        twin(**_inputs())


def test_the_two_sided_window_is_modernberts_own_mask():
    """Without a prefix, prefixattn's attention gives ModernBERT's eager logits (its own local mask); a
    wider window gives other logits, so an off-by-one would show."""
    register()
    assert _modernbert().config.layer_types == ["full_attention", "sliding_attention", "full_attention"]
    batch = _inputs()
    with torch.no_grad():
        eager = _modernbert()(**batch).logits
        ours = _modernbert(attn_implementation="prefixattn")(**batch).logits
        for wider in (6, 8):  # |i - j| <= 3, 4
            assert not torch.allclose(_modernbert(wider)(**batch).logits, eager, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("padding, backend", [("right", "torch"), ("left", "triton")])
def test_every_layer_equals_the_float64_reference(padding, backend):
    model = prefixattn.patch(_modernbert(), num_prefix_tokens=P, backend=backend)
    with torch.no_grad():
        model.prefixattn_prefix.kv.mul_(5.0)
    compare_with_reference(model, _inputs(padding))


def test_the_classifier_trains_with_the_prefix():
    """PEFT's SEQ_CLS rule: the prefix and ``classifier`` train, the rest stays frozen; one AdamW step
    moves both."""
    model = prefixattn.patch(_modernbert(), num_prefix_tokens=P, backend="torch").train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.weight", "classifier.bias", "prefixattn_prefix.kv"}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**_inputs(), labels=torch.tensor([0, 2])).loss.backward()
    assert model.prefixattn_prefix.kv.grad.abs().sum() > 0
    opt.step()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
