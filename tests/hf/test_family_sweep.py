"""Every causal-LM family transformers ships, prefix-tuned from a tiny random config (issue 12).

Per family (tests/family_sweep.py does the work, tests/family_configs.py builds the models), the outcome
must be the one in ``EXPECTED``:

- ``"match_peft"``: logits equal PEFT's on a right-padded batch, and the prefix and logits after one
  AdamW step on both;
- ``"refused: <reason>"``: ``prefixattn.patch`` itself raises a ValueError whose message names the reason;
- ``"match_reference"``: PEFT cannot run the family; every attention layer of the patched model equals a
  float64 reference (the layer's own eager attention over [prefix; keys]);
- ``defect(symptom, what)``: a known defect, still to be fixed: the test xfails while the symptom is seen
  and fails as soon as the family changes class (then the table needs its new class);
- families in ``family_configs.CANNOT_BUILD`` must still fail to build.

So a family that changes class fails the test. The pure-PyTorch backend keeps the sweep fast; a few
families also run the Triton kernels (under the interpreter without a GPU).
"""

from __future__ import annotations

import pytest
from family_configs import CANNOT_BUILD
from family_sweep import BuildError, build, classify, time_limit

LIMIT_S = 300  # per family, against hangs: most take about a second (a first import of a modeling file: more)


def defect(symptom: str, what: str) -> tuple[str, str]:
    return (symptom, what)


EXPECTED: dict[str, str | tuple[str, str]] = {
    "afmoe": "match_peft",
    "apertus": "match_peft",
    "arcee": "match_peft",
    "aria_text": "match_peft",
    "axk1": defect("k and v must have the same shape", "latent attention (Dk != Dv) is refused by an op shape check inside patch(), not with a reason"),
    "axk2": defect("TypeError: 'NoneType' object is not subscriptable", "crashes inside the model instead of a clear refusal at patch()"),
    "bailing_hybrid": defect("k and v must have the same shape", "latent attention (Dk != Dv) is refused by an op shape check inside patch(), not with a reason"),
    "bamba": "match_reference",
    "bart": "refused: takes no position_ids",
    "beam": "match_peft",
    "bert": "refused: takes no position_ids",
    "bert-generation": "refused: takes no position_ids",
    "big_bird": "refused: own attention code",
    "bigbird_pegasus": "refused: takes no position_ids",
    "biogpt": "match_peft",
    "bitnet": "match_peft",
    "blenderbot": "refused: takes no position_ids",
    "blenderbot-small": "refused: takes no position_ids",
    "bloom": "refused: own attention code",
    "camembert": "refused: takes no position_ids",
    "codegen": "refused: own attention code",
    "cohere": "match_peft",
    "cohere2": "match_peft",
    "cohere2_moe": "match_peft",
    "cohere_compass_text": "match_peft",
    "cpmant": "refused: own attention code",
    "ctrl": "match_peft",
    "cwm": "match_peft",
    "data2vec-text": "refused: takes no position_ids",
    "dbrx": "match_reference",
    "deepseek_v2": defect("k and v must have the same shape", "latent attention (Dk != Dv) is refused by an op shape check inside patch(), not with a reason"),
    "deepseek_v3": defect("k and v must have the same shape", "latent attention (Dk != Dv) is refused by an op shape check inside patch(), not with a reason"),
    "deepseek_v32": defect("TypeError: 'NoneType' object is not subscriptable", "crashes inside the model instead of a clear refusal at patch()"),
    "deepseek_v4": defect("RuntimeError: Tensors must have same number of dimensi", "crashes inside the model instead of a clear refusal at patch()"),
    "diffllama": defect("Mismatch: logits", "differential attention calls the interface with a different meaning"),
    "doge": "refused: custom 4-D masks",
    "dots1": "match_peft",
    "dots3_note_text": defect("TypeError: 'NoneType' object is not subscriptable", "crashes inside the model instead of a clear refusal at patch()"),
    "electra": "refused: takes no position_ids",
    "emu3": "match_peft",
    "ernie": "refused: takes no position_ids",
    "ernie4_5": "match_peft",
    "ernie4_5_moe": "match_peft",
    "exaone4": "match_peft",
    "exaone_moe": "match_peft",
    "falcon": "refused: own attention code",
    "falcon_mamba": "refused: takes no position_ids",
    "flex_olmo": "match_peft",
    "flint": defect("Mismatch: logits", "logits differ from PEFT"),
    "fuyu": "match_peft",
    "gemma": "match_peft",
    "gemma2": "match_peft",
    "gemma3": "match_peft",
    "gemma3_text": "match_peft",
    "gemma3n_text": "match_peft",
    "gemma4": defect("Gemma4VisionEncoder.forward takes no position_ids", "the patcher hooks the vision tower's layer list instead of the language model's"),
    "gemma4_text": "refused: different KV shapes",
    "gemma4_unified": "refused: different KV shapes",
    "gemma4_unified_text": "refused: different KV shapes",
    "git": "refused: takes no position_ids",
    "glm": "match_peft",
    "glm4": "match_peft",
    "glm4_moe": "match_peft",
    "glm4_moe_lite": defect("k and v must have the same shape", "latent attention (Dk != Dv) is refused by an op shape check inside patch(), not with a reason"),
    "glm_moe_dsa": defect("TypeError: 'NoneType' object is not subscriptable", "crashes inside the model instead of a clear refusal at patch()"),
    "got_ocr2": "refused: own attention code",
    "gpt-sw3": "match_peft",
    "gpt2": "match_peft",
    "gpt_bigcode": "match_peft",
    "gpt_neo": "refused: own attention code",
    "gpt_neox": "match_peft",
    "gpt_neox_japanese": "refused: own attention code",
    "gpt_oss": defect("Mismatch: logits", "learned attention sinks (module.sinks) are ignored"),
    "gptj": "refused: own attention code",
    "granite": "match_peft",
    "granite_swa": defect("Mismatch: logits", "sliding-window granite: logits differ from PEFT"),
    "granitemoe": "match_peft",
    "granitemoe_swa": defect("Mismatch: logits", "sliding-window granite MoE: logits differ from PEFT"),
    "granitemoehybrid": "match_reference",
    "granitemoeshared": "match_peft",
    "helium": "match_peft",
    "hrm_text": "refused: takes no position_ids",
    "hunyuan_v1_dense": "match_peft",
    "hunyuan_v1_moe": "match_peft",
    "hy_v3": "match_peft",
    "hy_v4": defect("TypeError: 'NoneType' object is not subscriptable", "crashes inside the model instead of a clear refusal at patch()"),
    "hyperclovax": "match_peft",
    "inkling2_text": "refused: different KV shapes",
    "inkling_text": "refused: different KV shapes",
    "internlm3": "match_peft",
    "iquestcoder": "match_peft",
    "jais2": "match_peft",
    "jamba": "match_reference",
    "jetmoe": "refused: does not match the model",
    "kimi_linear": defect("k and v must have the same shape", "latent attention (Dk != Dv) is refused by an op shape check inside patch(), not with a reason"),
    "kolibri1": "match_peft",
    "laguna": "match_peft",
    "lfm2": "match_peft",
    "lfm2_moe": "match_reference",
    "lfm3": "match_reference",
    "llama": "match_peft",
    "llama4": "match_peft",
    "llama4_text": "match_peft",
    "mamba": "refused: takes no position_ids",
    "mamba2": "refused: takes no position_ids",
    "marian": "refused: takes no position_ids",
    "mbart": "refused: takes no position_ids",
    "megatron-bert": "refused: own attention code",
    "mellum": "match_peft",
    "mimo_v2_flash": "refused: different KV shapes",
    "minicpm3": defect("k and v must have the same shape", "latent attention (Dk != Dv) is refused by an op shape check inside patch(), not with a reason"),
    "minimax": "match_reference",
    "minimax_m2": "match_peft",
    "minimax_m3_vl_text": "match_peft",
    "ministral": "match_peft",
    "ministral3": "match_peft",
    "mistral": "match_peft",
    "mixtral": "match_peft",
    "mllama": "match_peft",
    "modernbert-decoder": "match_peft",
    "moshi": "match_peft",
    "moss_transcribe_diarize": "match_peft",
    "mpt": "refused: own attention code",
    "mvp": "refused: own attention code",
    "nanochat": "match_peft",
    "nemotron": "match_peft",
    "nemotron_h": "match_reference",
    "olmo": "match_peft",
    "olmo2": "match_peft",
    "olmo3": "match_peft",
    "olmo_hybrid": "match_reference",
    "olmoe": "match_peft",
    "openai-gpt": "refused: own attention code",
    "opt": "match_peft",
    "pegasus": "refused: takes no position_ids",
    "persimmon": "match_peft",
    "phi": "match_peft",
    "phi3": "match_peft",
    "phi4_multimodal": "match_peft",
    "phimoe": "match_peft",
    "plbart": "refused: takes no position_ids",
    "prophetnet": "refused: own attention code",
    "qwen2": "match_peft",
    "qwen2_moe": "match_peft",
    "qwen3": "match_peft",
    "qwen3_5": "match_reference",
    "qwen3_5_moe": "match_reference",
    "qwen3_5_moe_text": "match_reference",
    "qwen3_5_text": "match_reference",
    "qwen3_moe": "match_peft",
    "qwen3_next": "match_reference",
    "qwen4_exp": defect("AttributeError: 'NoneType' object has no attribute 'dtyp", "crashes inside the model instead of a clear refusal at patch()"),
    "qwen4_exp_text": defect("AttributeError: 'NoneType' object has no attribute 'dtyp", "crashes inside the model instead of a clear refusal at patch()"),
    "recurrent_gemma": "refused: does not match the model",
    "rembert": "refused: own attention code",
    "roberta": "refused: takes no position_ids",
    "roberta-prelayernorm": "refused: takes no position_ids",
    "roc_bert": "refused: takes no position_ids",
    "roformer": "refused: own attention code",
    "rwkv": "refused: own attention code",
    "seed_oss": "match_peft",
    "smollm3": "match_peft",
    "solar_open": "match_peft",
    "stablelm": "match_peft",
    "starcoder2": "match_peft",
    "trocr": "refused: own attention code",
    "vaultgemma": "match_peft",
    "whisper": "match_reference",
    "xglm": "refused: own attention code",
    "xlm": "refused: own attention code",
    "xlm-roberta": "refused: takes no position_ids",
    "xlm-roberta-xl": "refused: takes no position_ids",
    "xlnet": "refused: own attention code",
    "youtu": defect("k and v must have the same shape", "latent attention (Dk != Dv) is refused by an op shape check inside patch(), not with a reason"),
    "zamba2": "match_reference",
    "zaya": "match_reference",
}


def _all_families() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def test_every_family_has_an_expected_outcome():
    families = set(_all_families())
    listed = set(EXPECTED) | set(CANNOT_BUILD)
    assert not set(EXPECTED) & set(CANNOT_BUILD), "a family is both buildable and not"
    assert families - listed == set(), f"families without an expected outcome: {sorted(families - listed)}"
    assert listed - families == set(), f"families transformers no longer ships: {sorted(listed - families)}"


def _outcome(model_type: str, backend: str = "torch") -> str:
    try:
        return classify(model_type, backend=backend)
    except Exception as e:  # the class a defect shows
        return f"{type(e).__name__}: {e}"


def _check(model_type: str, backend: str = "torch") -> None:
    expected = EXPECTED[model_type]
    if isinstance(expected, tuple):
        symptom, what = expected
        got = _outcome(model_type, backend)
        if symptom in got:
            pytest.xfail(f"known defect: {what} ({symptom})")
        pytest.fail(f"{model_type} is listed as a defect ({what}) but now gives {got[:300]!r}: update EXPECTED")
    got = classify(model_type, backend=backend)
    if expected.startswith("refused: "):
        reason = expected.removeprefix("refused: ")
        assert got.startswith("refused: "), f"{model_type}: expected a refusal naming {reason!r}, got {got!r}"
        assert reason in got, f"{model_type}: the refusal does not name {reason!r}: {got!r}"
    else:
        assert got == expected, f"{model_type}: expected {expected!r}, got {got[:300]!r}"


@pytest.mark.parametrize("model_type", sorted(EXPECTED) + sorted(CANNOT_BUILD))
def test_family(model_type):
    with time_limit(LIMIT_S):
        if model_type in CANNOT_BUILD:
            with pytest.raises(BuildError):
                build(model_type)
            return
        _check(model_type)


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "qwen3_next"])
def test_family_with_triton_kernels(model_type):
    """The fused kernels inside a few representative families: plain GQA, softcap, a hybrid."""
    with time_limit(LIMIT_S * 2):
        _check(model_type, backend="triton")
