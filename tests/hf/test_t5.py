"""The T5 family (T5, mT5, UMT5, Switch Transformers): T5's learned relative position bias with a prefix.

PEFT's SEQ_2_SEQ_LM prefix is a KV cache of length P on decoder self-attention: T5 then computes its bias
over P + Sk keys with P more past tokens, ``compute_bias(Sq, P + Sk, past_seen_tokens=P + past)``, whose
first P columns are the prefix's. prefixattn makes T5 compute that same bias (``hf/position_bias.py``) and
hands it to the op as its score bias: logits, prefix gradients, one AdamW step and generate() equal PEFT's
(generate against the corrected PEFT reference, tests/tiny_models.peft_generate). ``sites="all"`` (each role
its own prefix; the encoder's placed before the sequence, cross-attention's with bias 0) against the float64
reference per attention call (tests/family_sweep_encdec.t5_reference_bias builds the bias from T5's own
table).
"""

from __future__ import annotations

import copy

import pytest
import torch
from family_sweep_encdec import compare_with_reference
from helpers import assert_close_rel
from tiny_encdec import P, peft_prefix_rows, peft_twin, text_batch, tiny_t5
from tiny_models import peft_generate

import prefixattn
from prefixattn.hf.position_bias import ComputeBiasWithPrefix

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5


def _inputs(padding: str = "right", decoder_length: int = 5) -> dict:
    ids, mask = text_batch(97, pad=1, padding=padding)
    decoder = torch.randint(3, 97, (2, decoder_length), generator=torch.Generator().manual_seed(4))
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder}


def _twins(family: str):
    twin = peft_twin(tiny_t5(family), "SEQ_2_SEQ_LM")
    with torch.no_grad():  # a prefix that visibly changes the outputs
        twin.prompt_encoder["default"].embedding.weight.mul_(10.0)
    return twin, prefixattn.patch(copy.deepcopy(twin), backend="torch")


@pytest.mark.parametrize("family", ["t5", "mt5", "umt5", "switch_transformers"])
def test_matches_peft_logits_gradients_and_a_step(family):
    twin, ours = _twins(family)
    batch = _inputs()
    with torch.no_grad():
        assert_close_rel(ours(**batch).logits, twin(**batch).logits, TOL, "logits")
    layers = list(ours.prefixattn_prefix.config.layers)
    grads = []
    for m in (twin, ours):
        m.train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        m(**batch, labels=batch["decoder_input_ids"]).loss.backward()
        grads.append(peft_prefix_rows(twin, grad=True)[layers] if m is twin
                     else m.prefixattn_prefix.kv.grad[:, :, 0])
        opt.step()
        m.eval()
    # AdamW's first step is about lr * sign(grad): compare the gradients themselves first, and make sure
    # they are far above rounding noise
    assert grads[0].abs().max() > 1e-3, "the prefix gradient is too small to compare"
    assert_close_rel(grads[1], grads[0], TOL, "prefix gradient")
    assert_close_rel(ours.prefixattn_prefix.kv.detach()[:, :, 0], peft_prefix_rows(twin)[layers], TOL,
                     "prefix after a step")
    with torch.no_grad():
        assert_close_rel(ours(**batch).logits, twin(**batch).logits, TOL, "logits after a step")


@pytest.mark.parametrize("family, kwargs", [
    ("t5", {"num_beams": 1, "do_sample": False}), ("umt5", {"num_beams": 3, "do_sample": False}),
])
def test_generate_equals_peft(family, kwargs):
    twin, ours = _twins(family)
    batch = {k: v for k, v in _inputs("left").items() if k != "decoder_input_ids"}
    gen = {"max_new_tokens": 6, "min_new_tokens": 6, **kwargs}
    expected = peft_generate(twin, **batch, **gen)
    got = ours.generate(**batch, **gen)
    assert torch.equal(got, expected), (got, expected)
    assert not torch.equal(tiny_t5(family).generate(**batch, **gen), got), "the prefix changed nothing"


@pytest.mark.parametrize("family, calls_per_step", [("t5", 1), ("umt5", 2)])
def test_the_prefix_columns_are_computed_once_per_table_and_step(family, calls_per_step, monkeypatch):
    """T5 computes its bias in decoder layer 0 and shares it: one call per step with the prefix counted in;
    UMT5 has a table per layer: one per layer. The prefix's columns are T5's bias at positions 0..P-1."""
    _, ours = _twins(family)
    results = []
    real = ComputeBiasWithPrefix.__call__

    def recording(self, *args, **kwargs):
        results.append((self.module, real(self, *args, **kwargs)))
        return results[-1][1]

    monkeypatch.setattr(ComputeBiasWithPrefix, "__call__", recording)
    batch = _inputs()
    with torch.no_grad():
        ours(**batch)
    assert len(results) == calls_per_step
    Sq = batch["decoder_input_ids"].shape[1]
    for module, bias in results:
        expected = type(module).compute_bias(module, Sq, P + Sq, past_seen_tokens=P)
        assert torch.equal(bias, expected) and bias.shape[-1] == P + Sq
        assert not torch.equal(bias[..., :P], bias[..., P:2 * P]), "prefix columns look like any others"


@pytest.mark.parametrize("padding", ["right", "left"])
def test_sites_all_equals_the_float64_reference_with_checkpointing(padding):
    """Every role its own prefix: encoder self-attention (T5's bidirectional bias at the prefix's positions
    before the sequence), decoder self-attention (PEFT's placement), cross-attention (bias 0, T5 has none
    there). Gradient checkpointing (T5 then hands cross-attention zeros that require grad) gives the same
    prefix gradient."""
    model = prefixattn.patch(tiny_t5("t5"), num_prefix_tokens=P, sites="all", backend="torch")
    with torch.no_grad():
        model.prefixattn_prefix.kv.mul_(5.0)
    batch = _inputs(padding)
    compare_with_reference(model, batch)
    grads = []
    for checkpointing in (False, True):
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.prefixattn_prefix.kv.grad = None
        model(**batch, labels=batch["decoder_input_ids"]).loss.backward()
        grads.append(model.prefixattn_prefix.kv.grad.clone())
    assert all(g.abs().sum() > 0 for g in grads[0]), "a site got no gradient"
    assert_close_rel(grads[1], grads[0], 1e-5, "prefix gradient with checkpointing")


def test_unpatch_gives_back_t5_as_it_was():
    base = tiny_t5("t5")
    with torch.no_grad():
        expected = base(**_inputs()).logits
    model = prefixattn.patch(base, num_prefix_tokens=P, sites="all", backend="torch")
    prefixattn.unpatch(model)
    assert not [m for m in model.modules() if "compute_bias" in m.__dict__ or any(
        k.startswith("_prefixattn") for k in m.__dict__)]
    with torch.no_grad():
        assert torch.equal(model(**_inputs()).logits, expected)


@pytest.mark.parametrize("family", ["t5", "switch_transformers"])
def test_an_unpatched_model_on_prefixattn_s_attention_is_the_model(family):
    """Loaded with attn_implementation="prefixattn" and not patched (TRL's reference model): T5's bias (and
    Switch's own extended encoder mask) as eager attention takes them."""
    from prefixattn.hf.attention import register

    register()
    batch = _inputs()
    with torch.no_grad():
        expected = tiny_t5(family)(**batch).logits
        model = tiny_t5(family)
        model.set_attn_implementation("prefixattn")
        torch.testing.assert_close(model(**batch).logits, expected, rtol=1e-5, atol=1e-6)
