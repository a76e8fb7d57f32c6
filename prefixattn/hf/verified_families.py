"""The model families prefixattn is verified on, and how: the family sweeps' tables.

The family sweeps (``tests/family_sweep.py``, ``tests/family_sweep_encdec.py``, checked by
``tests/hf/test_family_sweep*.py``) build every family transformers ships from a tiny random config and
prefix-tune it; the tests assert that each family still gives the outcome listed here. This is the one list
read by ``patch()`` (its warning for a family not verified as the kind of model it is given, and the
families a refusal names) and by the README's "Model families" sections (generated from it), so the three
cannot disagree.

Outcomes: ``"match_peft"`` (the same logits as PEFT's prefix tuning, and the same prefix after an optimizer
step), ``"match_peft_prompt"`` (the same against PEFT's own prompt handed to the model as its cache: PEFT's
forward cannot take the model's inputs), ``"match_reference"`` (PEFT cannot run it; every attention layer
equals a float64 reference), ``"decoder_only"`` (listed among sequence-to-sequence models but a decoder-only
LM, verified as such), ``"all_only: <why>"`` / ``"decoder_only_sites: <why>"`` (one sites option verified,
the other refused), ``"refused: <substring the refusal names>"``; a tuple ``(symptom, what)`` is a known
defect still to be fixed (not verified).
"""

from __future__ import annotations

from typing import Literal

Outcome = str | tuple[str, str]
Kind = Literal["causal", "encoder", "seq2seq"]

CAUSAL_LM: dict[str, Outcome] = {  # tests/family_sweep.py: AutoModelForCausalLM
    "afmoe": "match_peft",
    "apertus": "match_peft",
    "apertus1p5_text": "match_peft",
    "arcee": "match_peft",
    "aria_text": "match_peft",
    "axk1": "match_reference",
    "axk2": "refused: key indexer",
    "bailing_hybrid": "match_reference",
    "bamba": "match_reference",
    "bart": "match_peft",
    "beam": "match_peft",
    "bert": "match_peft",
    "bert-generation": "match_peft",
    "big_bird": "refused: own attention code",
    "bigbird_pegasus": "match_peft",
    "biogpt": "match_peft",
    "bitnet": "match_peft",
    "blenderbot": "match_peft",
    "blenderbot-small": "match_peft",
    "bloom": "refused: own attention code",
    "camembert": "match_peft",
    "codegen": "refused: own attention code",
    "cohere": "match_peft",
    "cohere2": "match_peft",
    "cohere2_moe": "match_peft",
    "cohere_compass_text": "match_peft",
    "cpmant": "refused: own attention code",
    "ctrl": "match_peft",
    "cwm": "match_peft",
    "data2vec-text": "match_peft",
    "dbrx": "match_reference",
    "deepseek_v2": "match_reference",
    "deepseek_v3": "match_reference",
    "deepseek_v32": "refused: key indexer",
    "deepseek_v4": "refused: compressed sparse attention",
    "diffllama": "refused: differential attention",
    "doge": "refused: custom 4-D masks",
    "dory": "match_reference",
    "dots1": "match_peft",
    "dots3_note_text": "refused: key indexer",
    "electra": "match_peft",
    "emu3": "match_peft",
    "ergo": "match_peft",
    "ernie": "match_peft",
    "ernie4_5": "match_peft",
    "ernie4_5_moe": "match_peft",
    "exaone": "match_peft",
    "exaone4": "match_peft",
    "exaone_moe": "match_peft",
    "falcon": "refused: own attention code",
    "falcon_mamba": "refused: takes no position_ids",
    "flex_olmo": "match_peft",
    "flint": "match_peft",
    "fuyu": "match_peft",
    "gemma": "match_peft",
    "gemma2": "match_peft",
    "gemma3": "match_peft",
    "gemma3_text": "match_peft",
    "gemma3n_text": "match_peft",
    "gemma4": "match_peft",
    "gemma4_text": "match_peft",
    "gemma4_unified": "match_peft",
    "gemma4_unified_text": "match_peft",
    "git": "refused: takes no position_ids",
    "glm": "match_peft",
    "glm4": "match_peft",
    "glm4_moe": "match_peft",
    "glm4_moe_lite": "match_reference",
    "glm_moe_dsa": "refused: key indexer",
    "got_ocr2": "refused: own attention code",
    "gpt-sw3": "match_peft",
    "gpt2": "match_peft",
    "gpt_bigcode": "match_peft",
    "gpt_neo": "refused: own attention code",
    "gpt_neox": "match_peft",
    "gpt_neox_japanese": "refused: own attention code",
    "gpt_oss": "match_peft",
    "gptj": "refused: own attention code",
    "granite": "match_peft",
    "granite_swa": "match_peft",
    "granitemoe": "match_peft",
    "granitemoe_swa": "match_peft",
    "granitemoehybrid": "match_reference",
    "granitemoeshared": "match_peft",
    "helium": "match_peft",
    "hrm_text": "refused: takes no position_ids",
    "hunyuan_v1_dense": "match_peft",
    "hunyuan_v1_moe": "match_peft",
    "hy_v3": "match_peft",
    "hy_v4": "refused: key indexer",
    "hyperclovax": "match_peft",
    "inkling2_loop_text": "refused: attention inputs prefixattn does not implement",
    "inkling2_text": "refused: attention inputs prefixattn does not implement",
    "inkling_text": "refused: attention inputs prefixattn does not implement",
    "internlm3": "match_peft",
    "iquestcoder": "match_peft",
    "jais2": "match_peft",
    "jamba": "match_reference",
    "jetmoe": "refused: does not match the model",
    "kimi_linear": "match_reference",
    "kolibri1": "match_peft",
    "kolibri1_1": "refused: key indexer",
    "laguna": "match_peft",
    "lara_mini": "match_reference",
    "lfm2": "match_peft",
    "lfm2_moe": "match_reference",
    "lfm3": "match_reference",
    "llama": "match_peft",
    "llama4": "match_peft",
    "llama4_text": "match_peft",
    "mamba": "refused: takes no position_ids",
    "mamba2": "refused: takes no position_ids",
    "marian": "match_peft",
    "mbart": "match_peft",
    "megatron-bert": "refused: own attention code",
    "mellum": "match_peft",
    "mimo_v2_flash": "match_reference",
    "minicpm3": "match_reference",
    "minicpm5_moe": "match_peft",
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
    "param2moe": "match_peft",
    "pegasus": "match_peft",
    "persimmon": "match_peft",
    "phi": "match_peft",
    "phi3": "match_peft",
    "phi4_multimodal": "match_peft",
    "phimoe": "match_peft",
    "plbart": "match_peft",
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
    "qwen4_exp": "refused: key indexer",
    "qwen4_exp_text": "refused: key indexer",
    "recurrent_gemma": "refused: does not match the model",
    "rembert": "refused: own attention code",
    "roberta": "match_peft",
    "roberta-prelayernorm": "match_peft",
    "roc_bert": "match_peft",
    "roformer": "refused: own attention code",
    "rwkv": "refused: own attention code",
    "sarvam_mla": "match_reference",
    "sarvam_moe": "match_peft",
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
    "xlm-roberta": "match_peft",
    "xlm-roberta-xl": "match_peft",
    "xlnet": "refused: own attention code",
    "youtu": "match_reference",
    "zamba2": "match_reference",
    "zaya": "match_reference",
}

ENCODERS: dict[str, Outcome] = {  # tests/family_sweep_encdec.py: a classification / QA / masked-LM head
    "albert": "match_reference",
    "bert": "match_peft",
    "big_bird": "refused: own attention code",
    "camembert": "match_peft",
    "convbert": "refused: own attention code",
    "data2vec-text": "match_peft",
    "deberta": "refused: own attention code",
    "deberta-v2": "refused: own attention code",
    "distilbert": "match_reference",
    "electra": "match_peft",
    "ernie": "match_peft",
    "esm": "match_reference",
    "eurobert": "match_reference",
    "flaubert": "refused: own attention code",
    "fnet": "refused: no attention module",
    "funnel": "refused: own attention code",
    "gte": "match_reference",
    "ibert": "refused: own attention code",
    "jina_embeddings_v3": "match_reference",
    "layoutlm": "refused: 4-D attention mask of its own",
    "longformer": "refused: own attention code",
    "luke": "refused: own attention code",
    "markuplm": "refused: 4-D attention mask of its own",
    "megatron-bert": "refused: own attention code",
    "mobilebert": "match_reference",
    "modernbert": "match_reference",
    "modernvbert": "match_reference",
    "mpnet": "refused: own attention code",
    "mra": "refused: own attention code",
    "neomme": "match_reference",
    "nomic_bert": "match_reference",
    "nystromformer": "refused: own attention code",
    "openai_privacy_filter": "match_reference",
    "rembert": "refused: own attention code",
    "roberta": "match_peft",
    "roberta-prelayernorm": "match_peft",
    "roc_bert": "match_peft",
    "roformer": "refused: own attention code",
    "splinter": "match_reference",
    "tapas": "refused: own attention code",
    "ultrabert": "match_reference",
    "ultravbert": "match_reference",
    "xlm": "refused: own attention code",
    "xlm-roberta": "match_peft",
    "xlm-roberta-xl": "match_peft",
    "yoso": "refused: own attention code",
}

SEQ2SEQ: dict[str, Outcome] = {  # tests/family_sweep_encdec.py: the sequence-to-sequence mappings
    "audioflamingo3": "decoder_only",
    "bart": "match_peft",
    "bigbird_pegasus": "refused: reads the attention masks",
    "blenderbot": "match_peft",
    "blenderbot-small": "match_peft",
    "canary": "refused: no num_hidden_layers",
    "cohere_asr": "refused: 4-D attention mask of its own",
    "encoder-decoder": "all_only: no num_hidden_layers",
    "fsmt": "refused: own attention code",
    "glmasr": "decoder_only",
    "granite_speech": "decoder_only",
    "granite_speech_plus": "decoder_only",
    "kyutai_speech_to_text": "decoder_only",
    "led": "refused: own attention code",
    "longt5": "decoder_only_sites: its encoder's attention does not go through",
    "m2m_100": "match_peft",
    "marian": "match_peft",
    "mbart": "match_peft",
    "moonshine": "match_reference",
    "moss_transcribe_diarize": "decoder_only",
    "mt5": "match_peft",
    "musicflamingo": "decoder_only",
    "mvp": "refused: own attention code",
    "nemo_speechlm": "decoder_only",
    "nllb-moe": "match_peft",
    "omniasr": "decoder_only",
    "pegasus": "match_peft",
    "pegasus_x": "decoder_only_sites: its encoder's attention does not go through",
    "plbart": "match_peft",
    "pop2piano": "match_reference",
    "prophetnet": "refused: own attention code",
    "qwen2_audio": "decoder_only",
    "qwen3_asr": "decoder_only",
    "seamless_m4t": "match_peft",
    "seamless_m4t_v2": "match_peft",
    "speech_to_text": "match_peft_prompt",
    "speecht5": "refused: own attention code",
    "switch_transformers": "match_peft",
    "t5": "match_peft",
    "t5gemma": "refused: no num_hidden_layers",
    "umt5": "match_peft",
    "vibevoice": "decoder_only",
    "vibevoice_asr": "decoder_only",
    "voxtral": "decoder_only",
    "voxtral_realtime": "decoder_only",
    "whisper": "match_peft_prompt",
}

# The versions the tables were swept with (a test checks them against scripts/constraints.txt's pins).
SWEPT_WITH: dict[str, str] = {"transformers": "5.25.0", "peft": "0.21.2"}

# Causal LMs whose forward is written for ``cache`` alone: PEFT (0.21.2) hands its prompt over as
# ``past_key_values``, which such a forward swallows into ``**kwargs``, so PEFT itself runs without its
# prefix. They are verified against PEFT's semantics built by hand (PEFT's own prompt handed to the model as
# ``cache``); the sweep checks that PEFT still drops its prefix exactly for these.
PEFT_DROPS_ITS_PREFIX: frozenset[str] = frozenset({"ergo"})

# Remarks on how a family was verified, shown with its table in the README.
NOTES: dict[str, str] = {
    family: f"PEFT {SWEPT_WITH['peft']} hands its prompt over as `past_key_values`, which this model's "
            "forward (written for `cache` alone) swallows, so PEFT itself runs without its prefix: compared "
            "against PEFT's prompt handed to the model as `cache`"
    for family in PEFT_DROPS_ITS_PREFIX
}


# Outcomes that count as verified for the kind of model the table is about
_VERIFIED = ("match_peft", "match_peft_prompt", "match_reference", "all_only:", "decoder_only_sites:")


def _verified(outcome: Outcome) -> bool:
    return isinstance(outcome, str) and outcome.startswith(_VERIFIED)


def verified_families(kind: Kind) -> list[str]:
    """The families verified as that kind of model: causal LMs (the decoder-only LMs of the
    sequence-to-sequence mappings included), encoders, encoder-decoders."""
    if kind == "causal":
        names = {f for f, o in CAUSAL_LM.items() if _verified(o)}
        names |= {f for f, o in SEQ2SEQ.items() if o == "decoder_only"}
    elif kind == "encoder":
        names = {f for f, o in ENCODERS.items() if _verified(o)}
    else:
        names = {f for f, o in SEQ2SEQ.items() if _verified(o)}
    return sorted(names)


def is_verified(model_type: str, kind: Kind) -> bool:
    return model_type in verified_families(kind)


def listed_kinds(model_type: str) -> list[Kind]:
    """The kinds whose table lists the family, whatever its outcome."""
    kinds: list[Kind] = []
    if model_type in CAUSAL_LM or SEQ2SEQ.get(model_type) == "decoder_only":
        kinds.append("causal")
    if model_type in ENCODERS:
        kinds.append("encoder")
    if model_type in SEQ2SEQ and SEQ2SEQ[model_type] != "decoder_only":
        kinds.append("seq2seq")
    return kinds
