"""patch()'s word on a family agrees with the family sweep's tables (prefixattn/hf/verified_families.py, which
the README's lists are generated from): a family verified as the kind of model it is given patches silently,
any other family that can be patched warns, and a family that cannot names the verified families of its kind.
"""

from __future__ import annotations

import warnings

import pytest
from family_sweep_encdec import build_encoder, build_seq2seq

import prefixattn
from prefixattn.hf.verified_families import CAUSAL_LM, ENCODERS, SEQ2SEQ, verified_families

NOT_VERIFIED = "not among the families verified"


def _patch_recording(model) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prefixattn.patch(model, num_prefix_tokens=2, backend="torch")
    return [str(w.message) for w in caught if "prefixattn:" in str(w.message)]


@pytest.mark.parametrize("model_type", ["bart", "marian", "pegasus", "t5", "whisper"])
def test_verified_encoder_decoders_patch_without_a_warning(model_type):
    assert SEQ2SEQ[model_type].startswith("match_peft")
    model, _ = build_seq2seq(model_type)
    assert _patch_recording(model) == []


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_verified_encoders_patch_without_a_warning(model_type):
    assert ENCODERS[model_type] == "match_peft"
    model, _ = build_encoder(model_type)
    assert _patch_recording(model) == []


def test_a_verified_causal_lm_patches_without_a_warning():
    from tiny_models import tiny_model

    assert CAUSAL_LM["llama"] == "match_peft"
    assert _patch_recording(tiny_model("llama")) == []


def test_a_family_the_tables_do_not_list_warns():
    """A family newer than the tables (or a model of one's own) whose attention uses the interface."""
    from transformers import LlamaConfig, LlamaForCausalLM

    class UnlistedConfig(LlamaConfig):
        model_type = "unlisted_llama"

    class UnlistedForCausalLM(LlamaForCausalLM):
        config_class = UnlistedConfig

    model = UnlistedForCausalLM(UnlistedConfig(vocab_size=64, hidden_size=32, intermediate_size=32,
                                               num_hidden_layers=1, num_attention_heads=2,
                                               num_key_value_heads=1))
    messages = _patch_recording(model)
    assert len(messages) == 1 and NOT_VERIFIED in messages[0] and "'unlisted_llama'" in messages[0]
    assert "do not list it" in messages[0] and "check it against PEFT" in messages[0]
    assert prefixattn.is_patched(model)


def test_a_family_verified_as_another_kind_warns():
    """T5 is verified as an encoder-decoder; its encoder alone (T5EncoderModel) is not."""
    from family_configs import tiny_config
    from transformers import T5EncoderModel

    model = T5EncoderModel(tiny_config("t5")).eval()
    messages = _patch_recording(model)
    assert len(messages) == 1 and NOT_VERIFIED in messages[0] and "as encoder models" in messages[0]
    assert "verified as encoder-decoder only" in messages[0]


def test_deberta_is_refused_naming_the_verified_encoders():
    from family_configs import tiny_config
    from transformers import DebertaV2ForSequenceClassification

    model = DebertaV2ForSequenceClassification(tiny_config("deberta-v2")).eval()
    with pytest.raises(ValueError) as refused:
        prefixattn.patch(model, num_prefix_tokens=2)
    message = str(refused.value)
    assert "own attention code" in message
    encoders = verified_families("encoder")
    assert f"{len(encoders)} verified encoder families: {', '.join(encoders)}" in message
    assert "llama" not in message and "gpt2" not in message
    assert not prefixattn.is_patched(model)


def test_the_verified_lists_follow_the_tables():
    """What counts as verified, per kind (a refused family or a known defect never does)."""
    assert "llama" in verified_families("causal") and "dory" in verified_families("causal")
    assert "qwen2_audio" in verified_families("causal")  # a decoder-only LM of the seq2seq mappings
    assert "falcon" not in verified_families("causal") and "kolibri1_1" not in verified_families("causal")
    assert "bart" in verified_families("seq2seq") and "longt5" in verified_families("seq2seq")
    assert "qwen2_audio" not in verified_families("seq2seq") and "led" not in verified_families("seq2seq")
    assert "bert" in verified_families("encoder") and "deberta" not in verified_families("encoder")
