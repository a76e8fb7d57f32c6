"""What a patched model returns besides logits, and the model under torch.compile.

- ``output_attentions=True`` returns each layer's (B, H, Sq, P + Sk) weights, prefix columns first: the same
  matrix PEFT's eager attention returns over its cache-based prefix.
- ``torch.compile(model, fullgraph=True)`` on a padded batch: no data-dependent branch in the step (the
  mask function skips its "any padding?" read under compile), same logits and prefix gradient as eager.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close_rel
from tiny_models import batch, labels_for, peft_twin, tiny_model

import prefixattn

TOL = 1e-5


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "opt"])
def test_output_attentions_equals_peft_eager_weights(family):
    peft_model = peft_twin(tiny_model(family)).eval()
    ours = prefixattn.patch(copy.deepcopy(peft_model), backend="torch")
    ids, mask = batch(padding="left")
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask, output_attentions=True)
        got = ours(input_ids=ids, attention_mask=mask, output_attentions=True)
        plain = ours(input_ids=ids, attention_mask=mask)
    assert len(got.attentions) == len(expected.attentions) == ours.config.num_hidden_layers
    for layer, (a, b) in enumerate(zip(got.attentions, expected.attentions, strict=True)):
        assert_close_rel(a, b, TOL, f"layer {layer} attention weights")
        assert torch.allclose(a.sum(-1), torch.ones(()), atol=1e-5)  # rows are distributions
    assert_close_rel(got.logits, expected.logits, TOL, "logits")
    assert torch.equal(got.logits, plain.logits)  # the weights are computed beside, not instead
    assert plain.attentions is None


def test_output_attentions_of_a_bank_uses_each_rows_entry():
    model = prefixattn.patch(tiny_model("llama"), num_prefix_tokens=3, num_prefixes=2, backend="torch")
    ids, mask = batch(batch_size=2, padding="none")
    ids_of = torch.tensor([0, 1])
    with torch.no_grad():
        both = model(input_ids=ids, prefix_ids=ids_of, output_attentions=True).attentions
        for row in range(2):
            alone = model(input_ids=ids[row:row + 1], prefix_ids=ids_of[row:row + 1],
                          output_attentions=True).attentions
            for a, b in zip(both, alone, strict=True):
                assert_close_rel(a[row:row + 1], b, TOL, f"row {row}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiled_fullgraph_model_on_a_padded_batch_equals_eager(backend):
    model = prefixattn.patch(tiny_model("llama"), num_prefix_tokens=3, backend=backend)
    ids, mask = batch(padding="left")
    labels = labels_for(ids, mask)
    eager = model(input_ids=ids, attention_mask=mask, labels=labels)
    eager.loss.backward()
    eager_grad = model.prefixattn_prefix.kv.grad.clone()
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert_close_rel(out.logits, eager.logits, TOL, "logits")
    assert_close_rel(model.prefixattn_prefix.kv.grad, eager_grad, TOL, "prefix gradient")
