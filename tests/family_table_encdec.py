"""The expected outcome of every encoder and encoder-decoder family transformers ships (the sweep of
tests/family_sweep_encdec.py; tests/hf/test_family_sweep_encdec.py checks it), and the README section
generated from it (``python tests/family_sweep_encdec.py --readme``).

Outcomes: ``"match_peft"``, ``"match_peft_prompt"``, ``"match_reference"``, ``"decoder_only"``,
``"all_only: <substring>"``, ``"decoder_only_sites: <substring>"``, ``"refused: <substring the refusal
must name>"`` (see family_sweep_encdec's docstring). Families that cannot be built: ``CANNOT_BUILD``.
"""

from __future__ import annotations

# What each refusal means, for the README (the key is the substring the refusal must name).
REFUSALS: dict[str, str] = {
    "own attention code": "attention code of their own, not through transformers' AttentionInterface",
    "4-D attention mask of its own": "an extended 4-D attention mask of their own (LayoutLM style, Cohere ASR)",
    "reads the attention masks": "an encoder with attention code of its own that reads the masks transformers "
                                 "builds (BigBird-Pegasus)",
    "no attention module": "no attention at all (FNet mixes tokens with Fourier transforms)",
    "no num_hidden_layers": "no num_hidden_layers for PEFT's layout, and an encoder prefixattn cannot probe "
                            "or whose two-sided window disagrees with its own mask (T5Gemma)",
}

ENCODERS: dict[str, str] = {
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

SEQ2SEQ: dict[str, str] = {
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

# Families whose tiny model the sweep cannot build or run, and why (the test checks they still cannot).
CANNOT_BUILD: dict[str, str] = {
    "bros": "needs bounding boxes (bbox) with every input",
    "canine": "character-level: no input embedding matrix to draw tokens from",
    "esmc": "its config refuses the generic tiny override of grouped-query attention",
    "layoutlmv2": "needs the detectron2 library, which is not installed",
    "layoutlmv3": "its visual embedding's default sizes do not follow the tiny hidden size",
    "lilt": "its layout embedding's sizes do not follow the tiny hidden size",
    "lxmert": "needs visual features with every input",
    "mistral4": "a decoder model (its tiny latent-attention shapes do not line up)",
    "perceiver": "its input embeddings are a bare parameter (no token embedding module)",
    "reformer": "axial position embeddings must sum to hidden_size; LSH attention of its own",
    "squeezebert": "its embedding size must equal the tiny intermediate size",
    "xmod": "needs set_default_language() before any forward",
    "dia": "an audio-token decoder without an input embedding matrix",
    "fun_asr_nano": "its adaptor config's validation needs sizes the generic tiny overrides do not set",
    "moonshine_streaming": "its config lacks the num_key_value_heads the generic tiny overrides read",
    "speech-encoder-decoder": "a composite of two pretrained models (encoder and decoder configs of its own)",
    "t5gemma2": "its config validation refuses an encoder and a decoder of different widths",
}

# Families the oldest supported transformers (5.17.0) does not ship; the table is checked in full against
# the pinned transformers
NEWER_THAN_OLDEST: frozenset[str] = frozenset({"gte", "moss_transcribe_diarize", "nemo_speechlm", "omniasr",
                                               "ultrabert", "ultravbert"})

# Families whose tiny model builds on the pinned transformers but not on the oldest supported one, and why
BUILDS_ONLY_ON_THE_PINNED: dict[str, str] = {
    "canary": "transformers 5.17's Canary encoder does not follow the tiny sizes",
    "cohere_asr": "transformers 5.17's Cohere ASR encoder does not follow the tiny sizes",
    "encoder-decoder": "transformers 5.17's EncoderDecoderConfig needs encoder and decoder sub-configs",
    "vibevoice": "transformers 5.17's VibeVoice config validation needs sizes the tiny overrides do not set",
}

README_BEGIN = "<!-- encdec-sweep:begin (generated by `python tests/family_sweep_encdec.py --readme`) -->"
README_END = "<!-- encdec-sweep:end -->"


def _names(families) -> str:
    return ", ".join(f"`{f}`" for f in sorted(families))


def _reason(outcome: str) -> str:
    return outcome.split(": ", 1)[1]


def readme_section() -> str:
    """The README's list of encoder and encoder-decoder families, from the tables."""
    def of(table: dict[str, str], outcome: str) -> list[str]:
        return [f for f, o in table.items() if o == outcome or o.startswith(outcome + ":")]

    refused: dict[str, list[str]] = {key: [] for key in REFUSALS}
    for table in (ENCODERS, SEQ2SEQ):
        for family, outcome in table.items():
            if outcome.startswith("refused: "):
                refused[_reason(outcome)].append(family)
    total = len(ENCODERS) + len(SEQ2SEQ) + len(CANNOT_BUILD)
    lines = [
        README_BEGIN,
        f"Every encoder and encoder-decoder family transformers ships ({total}), as the family sweep "
        "(`tests/hf/test_family_sweep_encdec.py`, tiny random configs) verifies it:",
        "",
        f"- **Encoders with the same logits as PEFT's prefix tuning** (SEQ_CLS, TOKEN_CLS, QUESTION_ANS with a "
        f"restored `past_key_values` argument; FEATURE_EXTRACTION), and the same prefix and task head after an "
        f"optimizer step ({len(of(ENCODERS, 'match_peft'))}): {_names(of(ENCODERS, 'match_peft'))}.",
        f"- **Encoders PEFT cannot run; every attention layer equals a float64 reference** "
        f"({len(of(ENCODERS, 'match_reference'))}): {_names(of(ENCODERS, 'match_reference'))}.",
        f"- **Encoder-decoders with the same logits as PEFT's SEQ_2_SEQ_LM prefix tuning** and the same prefix "
        f"after an optimizer step; `sites=\"all\"` equals the float64 reference "
        f"({len(of(SEQ2SEQ, 'match_peft'))}): {_names(of(SEQ2SEQ, 'match_peft'))}.",
        f"- **Speech encoder-decoders: the same against PEFT's own prompt handed to the model as its cache** "
        f"(PEFT's forward passes `input_ids`, which they do not take) "
        f"({len(of(SEQ2SEQ, 'match_peft_prompt'))}): {_names(of(SEQ2SEQ, 'match_peft_prompt'))}.",
        f"- **Encoder-decoders PEFT cannot run; both sites options equal the float64 reference** "
        f"({len(of(SEQ2SEQ, 'match_reference'))}): {_names(of(SEQ2SEQ, 'match_reference'))}.",
    ]
    for key, label in (("all_only", "**PEFT's layout cannot hold them (no num_hidden_layers); `sites=\"all\"` "
                                    "equals the float64 reference**"),
                       ("decoder_only_sites", "**PEFT's layout matches PEFT; `sites=\"all\"` refused (an "
                                              "encoder with attention code of its own)**")):
        families = of(SEQ2SEQ, key)
        if families:
            lines.append(f"- {label} ({len(families)}): {_names(families)}.")
    lines.append(f"- **In the sequence-to-sequence mappings but decoder-only** (an LM reading an audio "
                 f"encoder's output; prefix-tuned as causal LMs, `sites` does not apply) "
                 f"({len(of(SEQ2SEQ, 'decoder_only'))}): {_names(of(SEQ2SEQ, 'decoder_only'))}.")
    lines.append(f"- **Refused by `patch()` with the reason** ({sum(map(len, refused.values()))}):")
    for key, families in refused.items():
        if families:
            lines.append(f"  - {REFUSALS[key]} ({len(families)}): {_names(families)}.")
    lines.append(f"- **Not built by the sweep** ({len(CANNOT_BUILD)}): " + "; ".join(
        f"`{f}` ({reason})" for f, reason in sorted(CANNOT_BUILD.items())) + ".")
    lines.append(README_END)
    return "\n".join(lines)
