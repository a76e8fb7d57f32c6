"""Sliding-window layers (Mistral, Gemma 2 and Gemma 3 alternating local/global layers, Qwen2 with
use_sliding_window): each layer's ``sliding_window`` reaches the op, every layer's output equals the
float64 reference with that window (the prefix stays visible to every query), and where prefix +
sequence fit in the window the patched model equals PEFT (there the two agree; beyond it PEFT's prefix
slots fall out of the window, prefixattn keeps them)."""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import assert_close_rel, concat_reference
from tiny_models import _COMMON, batch, labels_for, patched_twin, peft_prefix_as_kv, peft_twin, tiny_model

attention_module = importlib.import_module("prefixattn.hf.attention")

W = 5  # the window of the sliding layers in the reference tests (sequence length 9 > W: it bites)
TOL = 1e-4


def _model(family: str, window: int):
    """A tiny model whose sliding layers use ``window``; returns (model, expected window per layer)."""
    import transformers as tf

    torch.manual_seed(0)
    if family == "mistral":
        model = tiny_model("mistral", sliding_window=window)
        return model, {0: window, 1: window}
    if family == "gemma2":
        model = tiny_model("gemma2", sliding_window=window)
        return model, {0: window, 1: None}  # alternating: local, global
    if family == "gemma3":
        cfg = tf.Gemma3TextConfig(**_COMMON, intermediate_size=128, num_key_value_heads=2, head_dim=16,
                                  sliding_window=window, query_pre_attn_scalar=16,
                                  layer_types=["sliding_attention", "full_attention"])
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**_COMMON, intermediate_size=128, num_key_value_heads=2, use_sliding_window=True,
                             sliding_window=window, max_window_layers=1)
    else:
        raise ValueError(family)
    cfg._attn_implementation = "eager"
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    windows = {i: (window if t == "sliding_attention" else None) for i, t in enumerate(cfg.layer_types)}
    return model, windows


def _spy(monkeypatch) -> list:
    calls = []
    real = attention_module.prefix_attention

    def spy(q, k, v, pk, pv, **kw):
        out = real(q, k, v, pk, pv, **kw)
        calls.append(dict(q=q.detach(), k=k.detach(), v=v.detach(), pk=pk.detach(), pv=pv.detach(), kw=kw,
                          out=out.detach()))
        return out

    monkeypatch.setattr(attention_module, "prefix_attention", spy)
    return calls


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3", "qwen2"])
def test_every_layer_attends_within_its_window_and_sees_the_prefix(family, monkeypatch):
    import prefixattn

    base, windows = _model(family, W)
    assert any(w is not None for w in windows.values())
    model = prefixattn.patch(base, num_prefix_tokens=3, backend="torch")
    calls = _spy(monkeypatch)
    ids, mask = batch(batch_size=2, length=9, padding="left")
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert [c["kw"]["sliding_window"] for c in calls] == [windows[i] for i in sorted(windows)]
    for layer, c in enumerate(calls):
        kw = c["kw"]
        ref = concat_reference(c["q"], c["k"], c["v"], c["pk"], c["pv"], key_padding_mask=kw["key_padding_mask"],
                               scale=kw["scale"], softcap=kw["softcap"], sliding_window=kw["sliding_window"])
        assert_close_rel(c["out"], ref, TOL, f"{family} layer {layer}")
        if kw["sliding_window"] is not None:  # the window bites: without it the result differs
            full = concat_reference(c["q"], c["k"], c["v"], c["pk"], c["pv"],
                                    key_padding_mask=kw["key_padding_mask"], scale=kw["scale"],
                                    softcap=kw["softcap"])
            assert (full - ref).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3", "qwen2"])
def test_equals_peft_where_prefix_and_sequence_fit_the_window(family):
    base, _ = _model(family, window=4 + 7)  # P + S = 11 = W: no key falls out of the window
    peft_model = peft_twin(base, num_virtual_tokens=4)
    ours = patched_twin(peft_model, backend="torch")
    ids, mask = batch(batch_size=3, length=7, padding="left")
    labels = labels_for(ids, mask)
    out_p = peft_model(input_ids=ids, attention_mask=mask, labels=labels)
    out_o = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert_close_rel(out_o.logits, out_p.logits, TOL, f"{family} logits")
    out_p.loss.backward()
    out_o.loss.backward()
    assert_close_rel(ours.prefixattn_prefix.kv.grad, peft_prefix_as_kv(peft_model, grad=True), TOL, "grad")


def test_generation_past_the_window_keeps_the_prefix_visible(monkeypatch):
    """Decoding beyond the window (4 + 6 tokens > W; the sliding cache keeps the last keys only): every
    step's output matches the reference, prefix included."""
    import prefixattn

    base, _ = _model("mistral", W)
    model = prefixattn.patch(base, num_prefix_tokens=2, backend="torch")
    calls = _spy(monkeypatch)
    ids, mask = batch(batch_size=2, length=4, padding="left")
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    decode = [c for c in calls if c["q"].shape[2] == 1]
    assert len(decode) == 5 * 2  # 5 decode steps x 2 layers, the later ones past the window
    for c in decode:
        kw = c["kw"]
        ref = concat_reference(c["q"], c["k"], c["v"], c["pk"], c["pv"], key_padding_mask=kw["key_padding_mask"],
                               scale=kw["scale"], sliding_window=W)
        assert_close_rel(c["out"], ref, TOL, "decode step")
