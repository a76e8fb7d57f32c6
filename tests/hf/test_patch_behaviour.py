"""patch()/unpatch() behaviour: freezing, options, init from text, refusals with clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close_rel
from tiny_models import VOCAB, batch, tiny_model

import prefixattn


def _patch(model, **kw):
    kw.setdefault("num_prefix_tokens", 4)
    kw.setdefault("backend", "torch")
    return prefixattn.patch(model, **kw)


def test_patch_freezes_base_adds_prefix_and_unpatch_restores():
    base = tiny_model("llama")
    ids, mask = batch(padding="left")
    with torch.no_grad():
        before = base(input_ids=ids, attention_mask=mask).logits
    impl = base.config._attn_implementation
    model = _patch(base)
    assert model is base and prefixattn.is_patched(model)
    assert model.config._attn_implementation == "prefixattn"
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prefixattn_prefix.kv"]
    assert model.prefixattn_prefix.kv.shape == (2, 2, 1, 2, 4, 16)  # (L, k|v, N, Hkv, P, D)
    assert model.prefixattn_prefix.kv.dtype == torch.float32
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids, attention_mask=mask).logits, before)

    prefixattn.unpatch(model)
    assert not prefixattn.is_patched(model)
    assert model.config._attn_implementation == impl
    assert not hasattr(model, "prefixattn_prefix")
    assert all(p.requires_grad for p in model.parameters())
    assert not model.model._forward_pre_hooks
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(after, before)
    # and it can be patched again
    _patch(model)
    assert prefixattn.is_patched(model)


def test_patched_model_equals_concatenated_text_when_initialised_from_it():
    """init='text': the prefix is the frozen model's K/V of the text, so the patched model on x equals the
    unpatched model on [text; x] (positions of x start at P in both)."""
    for family in ("llama", "gpt2", "opt", "gemma2"):
        base = tiny_model(family)
        text = [5, 17, 33, 8, 61]
        x = torch.randint(3, VOCAB, (2, 6))
        with torch.no_grad():
            expected = base(input_ids=torch.cat([torch.tensor([text] * 2), x], 1)).logits[:, len(text):]
        model = _patch(copy.deepcopy(base), num_prefix_tokens=len(text), init="text", init_text=text)
        with torch.no_grad():
            got = model(input_ids=x).logits
        assert_close_rel(got, expected, 1e-5, family)


def test_init_text_is_repeated_to_fill_the_prefix_and_tokenizer_strings():
    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % VOCAB for c in text]}

    a = _patch(tiny_model("llama"), num_prefix_tokens=6, init="text", init_text=[7, 9])
    b = _patch(tiny_model("llama"), num_prefix_tokens=6, init="text", init_text=[7, 9, 7, 9, 7, 9])
    torch.testing.assert_close(a.prefixattn_prefix.kv, b.prefixattn_prefix.kv)
    c = _patch(tiny_model("llama"), num_prefix_tokens=3, init="text", init_text="abc", tokenizer=Tok())
    d = _patch(tiny_model("llama"), num_prefix_tokens=3, init="text", init_text=[ord(ch) % VOCAB for ch in "abc"])
    torch.testing.assert_close(c.prefixattn_prefix.kv, d.prefixattn_prefix.kv)
    with pytest.raises(ValueError, match="tokenizer"):
        _patch(tiny_model("llama"), init="text", init_text="abc")
    with pytest.raises(ValueError, match="init_text"):
        _patch(tiny_model("llama"), init="text")
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 97\)"):
        _patch(tiny_model("llama"), init="text", init_text=[1000])


def test_zeros_init_and_prefix_dtype_and_half_model():
    model = _patch(tiny_model("llama"), init="zeros", dtype=torch.bfloat16)
    assert model.prefixattn_prefix.kv.dtype == torch.bfloat16 and not model.prefixattn_prefix.kv.any()
    # fp32 master prefix on a bf16 model: cast inside the attention function, gradient lands in fp32
    model = _patch(tiny_model("llama").to(torch.bfloat16))
    ids, mask = batch(padding="right")
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    assert model.prefixattn_prefix.kv.grad.dtype == torch.float32
    assert torch.isfinite(model.prefixattn_prefix.kv.grad).all()


def test_layers_option_puts_a_prefix_on_chosen_layers_only():
    base = tiny_model("llama")
    ids, _ = batch()
    with torch.no_grad():
        ref = base(input_ids=ids, output_hidden_states=True).hidden_states
    model = _patch(copy.deepcopy(base), layers=[1])
    assert model.prefixattn_prefix.kv.shape[0] == 1
    out = model(input_ids=ids, output_hidden_states=True, labels=ids)
    # layer 0 has no prefix; RoPE is relative, so starting positions at P changes nothing there
    assert_close_rel(out.hidden_states[1], ref[1], 1e-5, "after layer 0")
    assert not torch.allclose(out.hidden_states[2], ref[2], atol=1e-3)
    out.loss.backward()
    assert model.prefixattn_prefix.kv.grad.abs().sum() > 0
    assert _patch(tiny_model("llama"), layers=[-1]).prefixattn_prefix.config.layers == (1,)
    with pytest.raises(ValueError, match="layer 5 does not exist"):
        _patch(tiny_model("llama"), layers=[5])
    with pytest.raises(ValueError, match="duplicates"):
        _patch(tiny_model("llama"), layers=[0, 0])


def test_deepcopy_of_a_patched_model_is_independent():
    a = _patch(tiny_model("llama"))
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.prefixattn_prefix.kv.mul_(2)
    ids, _ = batch()
    a(input_ids=ids, labels=ids).loss.backward()
    assert a.prefixattn_prefix.kv.grad is not None and b.prefixattn_prefix.kv.grad is None
    prefixattn.unpatch(b)
    assert prefixattn.is_patched(a) and a.config._attn_implementation == "prefixattn"
    with torch.no_grad():
        a(input_ids=ids)


@pytest.mark.parametrize("family", ["falcon", "bloom", "gptj"])
def test_families_with_their_own_attention_are_refused(family):
    import transformers as tf

    cfg = {
        "falcon": lambda: tf.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                          num_attention_heads=4),
        "bloom": lambda: tf.BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4),
        "gptj": lambda: tf.GPTJConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, rotary_dim=8),
    }[family]()
    model = tf.AutoModelForCausalLM.from_config(cfg)
    # the causal LMs the family sweep verified (prefixattn/hf/verified_families.py), not the encoders
    with pytest.raises(ValueError, match=r"own attention code.*Supported: the \d+ verified causal-LM families: "
                                         r"afmoe, apertus, .*gemma, gemma2, .*llama, .*qwen3") as refused:
        _patch(model)
    assert "albert" not in str(refused.value)
    assert not prefixattn.is_patched(model)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        _patch(tiny_model("llama"), num_prefix_tokens=0)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        prefixattn.patch(tiny_model("llama"))
    with pytest.raises(ValueError, match="num_prefixes"):
        _patch(tiny_model("llama"), num_prefixes=0)
    with pytest.raises(ValueError, match="backend"):
        _patch(tiny_model("llama"), backend="cuda")
    with pytest.raises(TypeError, match="dtype"):
        _patch(tiny_model("llama"), dtype=torch.int32)
    with pytest.raises(ValueError, match="init"):
        _patch(tiny_model("llama"), init="uniform")
    with pytest.raises(TypeError, match="PreTrainedModel"):
        _patch(torch.nn.Linear(3, 3))
    model = _patch(tiny_model("llama"))
    with pytest.raises(ValueError, match="already patched"):
        _patch(model)
    ids, _ = batch()
    with pytest.raises(ValueError, match="single prefix"):
        model(input_ids=ids, prefix_ids=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="not patched"):
        prefixattn.unpatch(tiny_model("llama"))


def test_attention_dropout_in_training_is_refused_unless_ignored():
    """A model in training mode with attention dropout is refused at patch() (not at its first step); one
    patched in eval mode (as from_pretrained returns it) runs, reports the dropout its training would
    ask for, and is refused at its first training-mode forward."""
    import transformers as tf

    from prefixattn.hf.patcher import attention_dropout

    cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, attn_pdrop=0.1)
    ids, _ = batch()
    torch.manual_seed(0)
    base = tf.GPT2LMHeadModel(cfg).train()
    with pytest.raises(ValueError, match="GPT2LMHeadModel is in training mode with attention dropout 0.1"):
        _patch(base)
    assert not prefixattn.is_patched(base) and base.training
    torch.manual_seed(1)
    model = _patch(base.eval())
    assert attention_dropout(model) == 0.1
    # the probe's training-mode run leaves the RNG as it was: the random prefix is the one a model without
    # dropout gets from the same seed
    plain = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, attn_pdrop=0.0))
    torch.manual_seed(1)
    plain = _patch(plain.eval())
    assert torch.equal(plain.prefixattn_prefix.kv, model.prefixattn_prefix.kv)
    with torch.no_grad():
        model(input_ids=ids)  # no dropout in eval
    model.train()
    with pytest.raises(ValueError, match="attention dropout 0.1"):
        model(input_ids=ids)
    model = _patch(tf.GPT2LMHeadModel(cfg).train(), ignore_attention_dropout=True)
    model(input_ids=ids, labels=ids).loss.backward()
    assert attention_dropout(_patch(tiny_model("llama"))) == 0.0


def test_four_d_masks_and_static_caches_are_refused():
    model = _patch(tiny_model("llama"))
    ids, _ = batch()
    mask4d = torch.zeros(3, 1, 7, 7)
    with pytest.raises(ValueError, match="4-D"), torch.no_grad():
        model(input_ids=ids, attention_mask=mask4d)
    with pytest.raises(ValueError, match="static"):
        model.generate(input_ids=ids, max_new_tokens=2, cache_implementation="static", pad_token_id=0)


def test_softcap_is_passed_to_the_kernel():
    """Gemma2 caps attention scores; removing the cap changes the output, so it is honoured (the PEFT
    parity tests check the value)."""
    base = tiny_model("gemma2")
    model = _patch(copy.deepcopy(base))
    ids, _ = batch()
    with torch.no_grad():
        capped = model(input_ids=ids).logits
        for layer in model.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        uncapped = model(input_ids=ids).logits
    assert not torch.allclose(capped, uncapped, atol=1e-4)


def test_inputs_past_a_learned_position_table_are_refused_naming_the_lengths():
    """Positions start at P: an input whose last position falls off a learned absolute position table
    raised a bare IndexError inside the embedding. GPT-2 (owner-numbered positions), OPT (mask-numbered,
    offset 2) and BART's decoder (numbered in its embedding, offset 2) refuse it before the forward; a
    rotary model (Llama) has no table and takes inputs past max_position_embeddings as before."""
    from tiny_encdec import tiny_bart

    for family in ("gpt2", "opt"):
        model = _patch(tiny_model(family, n_positions=16) if family == "gpt2"
                       else tiny_model(family, max_position_embeddings=16))
        with torch.no_grad():
            model(input_ids=torch.randint(3, VOCAB, (2, 12)))  # positions 4..15: the last row
            with pytest.raises(ValueError, match="13 tokens do not fit .* learned position table of 16 positions "
                                                 "once the prefix's 4 come first .* at most 12 tokens"):
                model(input_ids=torch.randint(3, VOCAB, (2, 13)))
    bart = _patch(tiny_bart())  # max_position_embeddings=64
    ids = torch.randint(3, 50, (1, 5))
    with torch.no_grad():
        bart(input_ids=ids, decoder_input_ids=torch.randint(3, 50, (1, 60)))
        with pytest.raises(ValueError, match="61 tokens do not fit BartDecoder's learned position table of 64"):
            bart(input_ids=ids, decoder_input_ids=torch.randint(3, 50, (1, 61)))
    llama = _patch(tiny_model("llama", max_position_embeddings=16))
    with torch.no_grad():
        llama(input_ids=torch.randint(3, VOCAB, (1, 20)))
