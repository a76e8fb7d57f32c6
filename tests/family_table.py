"""The family sweep's table: the expected outcome of every causal-LM family transformers ships, and the
README section generated from it (``python tests/family_sweep.py --readme`` rewrites it;
tests/hf/test_family_sweep.py checks both).

Outcomes: ``"match_peft"``, ``"match_reference"``, ``"refused: <substring the refusal must name>"``, or
``defect(symptom, what)`` for a known defect still to be fixed (the test xfails while the symptom shows).
Families that cannot be built are in ``family_configs.CANNOT_BUILD``.
"""

from __future__ import annotations

from family_configs import CANNOT_BUILD


def defect(symptom: str, what: str) -> tuple[str, str]:
    return (symptom, what)


# What each refusal means, for the README (the key is the substring the refusal must name).
REFUSALS: dict[str, str] = {
    "own attention code": "attention code of their own, not through transformers' AttentionInterface",
    "takes no position_ids": "the module that runs the layers takes no position_ids and numbers no "
                             "positions from a cache length (state-space models, ...)",
    "attention inputs prefixattn does not implement": "attention inputs of their own that change the scores "
                                                       "(a learned relative position bias, per-token sinks)",
    "key indexer": "sparse attention whose learned indexer chooses the keys",
    "compressed sparse attention": "compressed sparse attention",
    "differential attention": "differential attention (two softmaxes over split heads)",
    "custom 4-D masks": "a custom 4-D attention mask",
    "does not match the model": "PEFT's adapter shape (from the config) does not match the attention layers",
}

EXPECTED: dict[str, str | tuple[str, str]] = {
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

# Families the oldest supported transformers (5.17.0, the GPU machine's) does not ship yet; the table is
# checked in full against the pinned transformers, and these may be missing from an older one.
NEWER_THAN_OLDEST = frozenset({
    "apertus1p5_text", "bailing_hybrid", "beam", "dory", "dots3_note", "dots3_note_text", "exaone", "flint",
    "inkling2_loop_text", "inkling2_text", "internlm3", "iquestcoder", "kolibri1", "lara_mini", "lfm3",
    "moss_transcribe_diarize", "sarvam_mla", "sarvam_moe",
})

# Families whose tiny config builds on the pinned transformers but not on the oldest supported one, why
BUILDS_ONLY_ON_THE_PINNED = {
    "cohere_compass_text": "transformers 5.17's rotary embedding always builds axial (3-D) frequencies, which "
                           "a 16-dim head cannot hold",
}

README_BEGIN = "<!-- family-sweep:begin (generated by `python tests/family_sweep.py --readme`) -->"
README_END = "<!-- family-sweep:end -->"


def _names(families) -> str:
    return ", ".join(f"`{f}`" for f in sorted(families))


def readme_section() -> str:
    """The README's family list, from EXPECTED and CANNOT_BUILD."""
    by_class: dict[str, list[str]] = {"match_peft": [], "match_reference": []}
    refused: dict[str, list[str]] = {key: [] for key in REFUSALS}
    defects: list[str] = []
    for family, outcome in EXPECTED.items():
        if isinstance(outcome, tuple):
            defects.append(family)
        elif outcome.startswith("refused: "):
            refused[outcome.removeprefix("refused: ")].append(family)
        else:
            by_class[outcome].append(family)
    lines = [
        README_BEGIN,
        f"Every causal-LM family transformers ships ({len(EXPECTED) + len(CANNOT_BUILD)}), as the family "
        "sweep (`tests/hf/test_family_sweep.py`, tiny random configs) verifies it:",
        "",
        f"- **Same logits as PEFT prefix tuning**, and the same prefix after an optimizer step "
        f"({len(by_class['match_peft'])}): {_names(by_class['match_peft'])}.",
        f"- **PEFT cannot run them; every attention layer equals a float64 reference** "
        f"({len(by_class['match_reference'])}): {_names(by_class['match_reference'])}.",
        f"- **Refused by `patch()` with the reason** ({sum(map(len, refused.values()))}):",
    ]
    for key, families in refused.items():
        if families:
            lines.append(f"  - {REFUSALS[key]} ({len(families)}): {_names(families)}.")
    if defects:
        lines.append(f"- **Known defects, being fixed** ({len(defects)}): " + "; ".join(
            f"`{f}` ({EXPECTED[f][1]})" for f in sorted(defects)) + ".")
    lines.append(f"- **Not built by the sweep** ({len(CANNOT_BUILD)}): " + "; ".join(
        f"`{f}` ({reason})" for f, reason in sorted(CANNOT_BUILD.items())) + ".")
    lines.append(README_END)
    return "\n".join(lines)
