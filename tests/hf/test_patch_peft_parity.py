"""prefixattn.patch against PEFT prefix tuning itself: same prefix values -> same logits, prefix gradients,
optimizer step and generations, on every tested family, with no / left / right padding.

Most tests run the pure-PyTorch backend (fast on CPU); the ``triton`` ones run the fused kernels (under
TRITON_INTERPRET=1 without a GPU) on tiny shapes.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_rel
from tiny_models import (
    FAMILIES,
    batch,
    generate,
    labels_for,
    patched_twin,
    peft_prefix_as_kv,
    peft_twin,
    tiny_model,
)

TOL = 1e-4  # relative, fp32 (the bar)


def _pair(family, backend="torch", num_virtual_tokens=4, prefix_projection=False):
    peft_model = peft_twin(tiny_model(family), num_virtual_tokens, prefix_projection)
    ours = patched_twin(peft_model, backend=backend)
    return peft_model, ours


def _loss_and_grads(peft_model, ours, padding):
    ids, mask = batch(padding=padding)
    labels = labels_for(ids, mask)
    out_p = peft_model(input_ids=ids, attention_mask=mask, labels=labels)
    out_o = ours(input_ids=ids, attention_mask=mask, labels=labels)
    out_p.loss.backward()
    out_o.loss.backward()
    return ids, mask, out_p, out_o


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_prefix_grads_match_peft(family, padding):
    peft_model, ours = _pair(family)
    _, mask, out_p, out_o = _loss_and_grads(peft_model, ours, padding)
    assert_close_rel(out_o.logits, out_p.logits, TOL, f"{family}/{padding} logits")
    assert_close_rel(out_o.loss, out_p.loss, TOL, f"{family}/{padding} loss")
    grad_p = peft_prefix_as_kv(peft_model, grad=True)
    assert_close_rel(ours.prefixattn_prefix.kv.grad, grad_p, TOL, f"{family}/{padding} prefix grad")
    # only the prefix is trainable, and the frozen model gets no gradient
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable == ["prefixattn_prefix.kv"]
    assert all(p.grad is None for n, p in ours.named_parameters() if not n.startswith("prefixattn_prefix"))


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_triton_kernels_match_peft(family, padding):
    """The fused kernels (interpreter on CPU) inside a real model: logits and prefix grads equal PEFT."""
    peft_model, ours = _pair(family, backend="triton")
    _, _, out_p, out_o = _loss_and_grads(peft_model, ours, padding)
    assert_close_rel(out_o.logits, out_p.logits, TOL, "logits")
    assert_close_rel(ours.prefixattn_prefix.kv.grad, peft_prefix_as_kv(peft_model, grad=True), TOL, "grad")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_prefix_projection_matches_peft(backend):
    """PEFT's MLP reparameterization: same embedding + MLP -> same logits and same MLP/embedding grads."""
    peft_model, ours = _pair("qwen2", backend=backend, prefix_projection=True)
    _, _, out_p, out_o = _loss_and_grads(peft_model, ours, "left")
    assert_close_rel(out_o.logits, out_p.logits, TOL, "logits")
    enc = peft_model.prompt_encoder["default"]
    mod = ours.prefixattn_prefix
    assert_close_rel(mod.embedding.weight.grad, enc.embedding.weight.grad, TOL, "embedding grad")
    for i in (0, 2):
        assert_close_rel(mod.transform[i].weight.grad, enc.transform[i].weight.grad, TOL, f"transform.{i} grad")
        assert_close_rel(mod.transform[i].bias.grad, enc.transform[i].bias.grad, TOL, f"transform.{i} bias grad")


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "opt"])
def test_one_optimizer_step_matches_peft(family):
    peft_model, ours = _pair(family)
    peft_model.train()
    ours.train()
    opt_p = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    opt_o = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    _loss_and_grads(peft_model, ours, "right")
    opt_p.step()
    opt_o.step()
    assert_close_rel(ours.prefixattn_prefix.kv.detach(), peft_prefix_as_kv(peft_model), TOL, "prefix after step")
    peft_model.eval()
    ours.eval()
    ids, mask = batch(padding="left", seed=5)
    with torch.no_grad():
        lp = peft_model(input_ids=ids, attention_mask=mask).logits
        lo = ours(input_ids=ids, attention_mask=mask).logits
    assert_close_rel(lo, lp, TOL, "logits after step")


def _generate(model, ids, mask, **kw):
    return generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_left_padded_matches_peft(family):
    """Left-padded generate(): positions from the mask (+P), decode steps through the same kernel."""
    peft_model, ours = _pair(family)
    ids, mask = batch(padding="left", seed=3)
    expected = _generate(peft_model, ids, mask, do_sample=False)
    got = _generate(ours, ids, mask, do_sample=False)
    assert torch.equal(got, expected)


def test_sampling_and_beam_search_match_peft():
    peft_model, ours = _pair("llama")
    ids, mask = batch(padding="left", seed=4)
    torch.manual_seed(123)
    expected = _generate(peft_model, ids, mask, do_sample=True, top_k=20, temperature=0.9)
    torch.manual_seed(123)
    got = _generate(ours, ids, mask, do_sample=True, top_k=20, temperature=0.9)
    assert torch.equal(got, expected)
    expected = _generate(peft_model, ids, mask, do_sample=False, num_beams=3, num_return_sequences=2)
    got = _generate(ours, ids, mask, do_sample=False, num_beams=3, num_return_sequences=2)
    assert torch.equal(got, expected)


def test_generate_with_triton_decode_matches_peft():
    peft_model, ours = _pair("qwen3", backend="triton")
    ids, mask = batch(batch_size=2, length=5, padding="left", seed=6)
    expected = _generate(peft_model, ids, mask, do_sample=False)
    got = _generate(ours, ids, mask, do_sample=False)
    assert torch.equal(got, expected)


def test_prefix_stays_out_of_the_kv_cache():
    peft_model, ours = _pair("llama")
    ids, mask = batch(padding="none")
    out = ours(input_ids=ids, attention_mask=mask, use_cache=True)
    assert out.past_key_values.get_seq_length() == ids.shape[1]
    # continuing from that cache equals running the whole sequence
    nxt = torch.randint(3, 90, (ids.shape[0], 1))
    step = ours(input_ids=nxt, attention_mask=torch.ones(ids.shape[0], ids.shape[1] + 1, dtype=torch.long),
                past_key_values=out.past_key_values, use_cache=True)
    full = ours(input_ids=torch.cat([ids, nxt], 1))
    assert_close_rel(step.logits[:, -1], full.logits[:, -1], TOL, "decode step vs full")
