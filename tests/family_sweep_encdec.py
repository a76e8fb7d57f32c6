"""The family sweep of encoders and encoder-decoders: classify one transformers family against PEFT's prefix
tuning (its SEQ_CLS / TOKEN_CLS / QUESTION_ANS / FEATURE_EXTRACTION and SEQ_2_SEQ_LM task types).

``classify_encoder(model_type)`` / ``classify_seq2seq(model_type)`` build the family's tiny model
(tests/family_configs.py's tiny config, with the family's task head) and return:

- ``"match_peft"``: a PEFT PrefixTuning twin runs; ``prefixattn.patch(peft_model)`` gives the same logits on
  a right-padded batch, and after one AdamW step on both the same prefix (the blocks PEFT's layout reads),
  task head and logits. Encoder-decoders also patched with ``sites="all"``: every attention call equals the
  float64 reference (below);
- ``"match_peft_prompt"``: encoder-decoders whose inputs PEFT's forward cannot take (speech models: PEFT
  passes ``input_ids``): the same comparison against PEFT's own prompt (``get_prompt``) handed to the base
  model as its cache, which is what PEFT's forward does with a text model;
- ``"match_reference"``: PEFT cannot run the family; every attention call of the patched model (every
  role) equals a float64 reference: the layer's eager attention over [prefix; keys] with an explicit mask,
  no prefix where the module carries none;
- ``"all_only: <message>"``: PEFT's layout cannot hold the model (the default ``patch`` refuses with the
  message); ``sites="all"`` equals the float64 reference;
- ``"decoder_only_sites: <message>"``: the default matches PEFT (or the reference); ``sites="all"`` is
  refused with the message (an encoder whose attention is code of its own);
- ``"decoder_only"``: in transformers' sequence-to-sequence mappings, but its config is not an
  encoder-decoder (a decoder-only LM reading an audio encoder's output): ``sites`` does not apply;
- ``"refused: <message>"``: ``prefixattn.patch`` raised a ValueError (or the first forward did, for
  attention masks of the model's own that only a padded batch shows);
- anything else raises (``BuildError``: no tiny model; ``Mismatch``; the crash itself).

``python tests/family_sweep_encdec.py [model_type ...]`` prints every family's class.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys

import torch
from family_sweep import (
    BuildError,
    FamilyTimeout,
    Mismatch,
    check,
    classify_timed,
    record_attention_calls,
    reference_layer,
    replace_readme_section,
)
from tiny_encdec import P, peft_prefix_rows, peft_twin

# (PEFT task type, transformers Auto class) in the order a family's head is chosen
ENCODER_HEADS = (
    ("SEQ_CLS", "AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("TOKEN_CLS", "AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    ("QUESTION_ANS", "AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
    ("FEATURE_EXTRACTION", "AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
)
SEQ2SEQ_MAPPINGS = ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES")


# sizes the generic tiny overrides do not reach (so that building stays cheap)
OVERRIDES: dict[str, dict] = {"perceiver": {"d_latents": 32, "num_latents": 4, "num_blocks": 1,
                                            "num_self_attends_per_block": 1},
                               "luke": {"entity_vocab_size": 16, "entity_emb_size": 16}}


def _mapping(name: str) -> dict:
    from transformers.models.auto import modeling_auto

    return getattr(modeling_auto, name)


def seq2seq_families() -> list[str]:
    """Every family of transformers' sequence-to-sequence mappings (text and speech)."""
    return sorted(set().union(*(_mapping(m) for m in SEQ2SEQ_MAPPINGS)))


def encoder_families() -> list[str]:
    """Every family with a masked-LM head, and every family with a classification / QA head that is neither a
    causal LM nor a sequence-to-sequence model."""
    heads = set().union(*(_mapping(m) for _, _, m in ENCODER_HEADS[:3]))
    others = heads - set(_mapping("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES")) - set(seq2seq_families())
    return sorted((set(_mapping("MODEL_FOR_MASKED_LM_MAPPING_NAMES")) | others) - set(seq2seq_families()))


def _vocab(model) -> int:
    return model.get_input_embeddings().weight.shape[0]


def _pad(model) -> int:
    pad = getattr(model.config, "pad_token_id", None)
    return pad if isinstance(pad, int) and 0 <= pad < _vocab(model) else 0


def _batch(model, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, min(_vocab(model), 100), (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    return ids.masked_fill(mask == 0, _pad(model)), mask


@contextlib.contextmanager
def _refusals_at_forward():
    """A ValueError prefixattn raises on the first forward (an attention mask of the model's own, which
    only a padded batch shows) is a refusal with its reason: yields a list that receives it."""
    refusal: list[str] = []
    try:
        yield refusal
    except ValueError as e:
        if not str(e).startswith("prefixattn"):
            raise
        refusal.append(f"refused: {e}")


# ---------------------------------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------------------------------


def build_encoder(model_type: str):
    """(tiny model with the family's first head of ENCODER_HEADS, PEFT task type)."""
    import transformers
    from family_configs import tiny_config

    try:
        config = tiny_config(model_type)
        config.num_labels = 3
        for key, value in OVERRIDES.get(model_type, {}).items():
            setattr(config, key, value)
        heads = [(task, auto) for task, auto, mapping in ENCODER_HEADS if model_type in _mapping(mapping)]
        if not heads:
            raise BuildError("no task head")
        task, auto = heads[0]
        torch.manual_seed(0)
        model = getattr(transformers, auto).from_config(config, attn_implementation="eager").eval()
        ids, mask = _batch(model)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    except (FamilyTimeout, BuildError):
        raise
    except Exception as e:
        raise BuildError(f"{type(e).__name__}: {e}") from e
    return model, task


def _encoder_labels(task: str, model, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    g = torch.Generator().manual_seed(5)
    B, S = ids.shape
    if task == "SEQ_CLS":
        return {"labels": torch.randint(0, 3, (B,), generator=g)}
    if task == "TOKEN_CLS":
        return {"labels": torch.randint(0, 3, (B, S), generator=g).masked_fill(mask == 0, -100)}
    if task == "QUESTION_ANS":
        return {"start_positions": torch.tensor([1, 2]), "end_positions": torch.tensor([3, 3])}
    return {"labels": ids.masked_fill(mask == 0, -100)}


def _runs(twin, inputs: dict, labels: dict) -> bool:
    try:
        twin(**inputs, **labels).loss.backward()
        twin.zero_grad(set_to_none=True)
    except FamilyTimeout:
        raise
    except Exception:
        return False
    return True


def _logits(out) -> torch.Tensor:
    if hasattr(out, "start_logits") and out.start_logits is not None:
        return torch.cat([out.start_logits, out.end_logits], dim=-1)
    return out.logits


def _step(model, inputs: dict, labels: dict) -> None:
    model.train()
    torch.manual_seed(0)  # the same draws where a model is random in training (Seamless's layer drop)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**inputs, **labels).loss.backward()
    opt.step()
    model.eval()


def _compare_step(twin, ours, inputs: dict, labels: dict) -> None:
    with torch.no_grad():
        check(_logits(ours(**inputs)), _logits(twin(**inputs)), "logits")
    _step(twin, inputs, labels)
    _step(ours, inputs, labels)
    prefix = ours.prefixattn_prefix
    layers = list(prefix.config.layers)
    check(prefix.kv.detach()[:, :, 0], peft_prefix_rows(twin)[layers], "prefix after one step")
    for path in prefix.heads:
        ours_head = dict(ours.get_submodule(path).named_parameters())
        twin_head = dict(twin.get_base_model().get_submodule(path).named_parameters())
        for name, p in ours_head.items():
            check(p.detach(), twin_head[name].detach(), f"task head {path}.{name} after one step")
    with torch.no_grad():
        check(_logits(ours(**inputs)), _logits(twin(**inputs)), "logits after one step")


def classify_encoder(model_type: str, backend: str = "torch") -> str:
    import prefixattn

    model, task = build_encoder(model_type)
    ids, mask = _batch(model)
    inputs = {"input_ids": ids, "attention_mask": mask}
    labels = _encoder_labels(task, model, ids, mask)
    twin = None
    try:
        twin = peft_twin(model, task)
        if not _runs(twin, inputs, labels):
            twin = None
    except FamilyTimeout:
        raise
    except Exception:
        twin = None
    try:
        if twin is not None:
            ours = prefixattn.patch(copy.deepcopy(twin), backend=backend)
        else:
            ours = prefixattn.patch(copy.deepcopy(model), num_prefix_tokens=P, backend=backend)
    except ValueError as e:
        return f"refused: {e}"
    with _refusals_at_forward() as refusal:
        if twin is not None:
            _compare_step(twin, ours, inputs, labels)
            return "match_peft"
        compare_with_reference(ours, inputs)
        return "match_reference"
    return refusal[0]


# ---------------------------------------------------------------------------------------------------
# Encoder-decoders
# ---------------------------------------------------------------------------------------------------


def _equal_heads(config) -> None:
    """The generic tiny overrides set an encoder-decoder's encoder heads through its num_key_value_heads
    alias (Whisper): give the encoder the decoder's head count, as real checkpoints have."""
    for sub in (config, *(getattr(config, k, None) for k in ("text_config", "encoder_config", "decoder_config"))):
        heads = getattr(sub, "decoder_attention_heads", None)
        if isinstance(heads, int) and isinstance(getattr(sub, "encoder_attention_heads", None), int):
            sub.encoder_attention_heads = heads


def build_seq2seq(model_type: str):
    """(tiny sequence-to-sequence model, a batch it runs)."""
    import transformers
    from family_configs import tiny_config

    try:
        config = tiny_config(model_type)
        _equal_heads(config)
        if isinstance(getattr(config, "max_source_positions", None), int):
            config.max_source_positions = 16  # Whisper's encoder takes exactly 2 x this many frames
        auto = ("AutoModelForSeq2SeqLM" if model_type in _mapping(SEQ2SEQ_MAPPINGS[0])
                else "AutoModelForSpeechSeq2Seq")
        torch.manual_seed(0)
        model = getattr(transformers, auto).from_config(config, attn_implementation="eager").eval()
        errors = []
        for inputs in _seq2seq_candidates(model):
            try:
                with torch.no_grad():
                    model(**inputs)
                return model, inputs
            except FamilyTimeout:
                raise
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")
        raise BuildError("; ".join(errors) or f"no tiny input for {model.main_input_name!r}")
    except (FamilyTimeout, BuildError):
        raise
    except Exception as e:
        raise BuildError(f"{type(e).__name__}: {e}") from e


def _mel_bins(config) -> list[int]:
    subs = (config, *(getattr(config, k, None) for k in ("encoder_config", "audio_config")))
    found = [getattr(s, n) for s in subs for n in ("num_mel_bins", "feature_size", "n_mels")
             if isinstance(getattr(s, n, None), int)]
    return found + [80, 128]


def _seq2seq_candidates(model):
    """Encoder inputs (text ids with a padded row, or speech features in the shapes speech encoders take)
    with decoder ids, to be tried in turn."""
    g = torch.Generator().manual_seed(3)
    decoder_ids = torch.randint(3, min(_vocab(model), 100), (2, 5), generator=g)
    name = getattr(model, "main_input_name", "input_ids")
    config = model.config
    if name == "input_ids":
        ids, mask = _batch(model)
        yield {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder_ids}
    elif name == "input_values":
        yield {"input_values": torch.randn(2, 4000, generator=g), "decoder_input_ids": decoder_ids}
    elif name == "input_features":
        if hasattr(config, "max_source_positions") and hasattr(config, "num_mel_bins"):  # Whisper
            yield {"input_features": torch.randn(2, config.num_mel_bins, 2 * config.max_source_positions,
                                                 generator=g), "decoder_input_ids": decoder_ids}
        if hasattr(config, "input_feat_per_channel"):  # Speech2Text
            feats = config.input_feat_per_channel * getattr(config, "input_channels", 1)
            yield {"input_features": torch.randn(2, 16, feats, generator=g), "decoder_input_ids": decoder_ids}
        for mel in _mel_bins(config):
            yield {"input_features": torch.randn(2, 32, mel, generator=g), "decoder_input_ids": decoder_ids}
            yield {"input_features": torch.randn(2, mel, 32, generator=g), "decoder_input_ids": decoder_ids}


class _PromptAsCache(torch.nn.Module):
    """PEFT's prefix handed to the base model as its cache: what PeftModelForSeq2SeqLM.forward does, for
    models whose inputs its forward cannot take (speech features)."""

    def __init__(self, twin) -> None:
        super().__init__()
        self.twin = twin

    def forward(self, **kwargs):
        batch = kwargs["decoder_input_ids"].shape[0]
        return self.twin.get_base_model()(**kwargs, past_key_values=self.twin.get_prompt(batch))

    def get_base_model(self):
        return self.twin.get_base_model()

    @property
    def active_peft_config(self):
        return self.twin.active_peft_config

    @property
    def prompt_encoder(self):
        return self.twin.prompt_encoder


def _seq2seq_twin(model, inputs: dict, labels: dict):
    """(a PEFT twin that runs the batch, kind) or (None, None)."""
    try:
        twin = peft_twin(model, "SEQ_2_SEQ_LM")
    except FamilyTimeout:
        raise
    except Exception:
        return None, None
    if _runs(twin, inputs, labels):
        return twin, "match_peft"
    if "input_ids" not in inputs:
        emulated = _PromptAsCache(twin)
        if _runs(emulated, inputs, labels):
            return emulated, "match_peft_prompt"
    return None, None


def _compare_seq2seq_step(twin, ours, inputs: dict, labels: dict) -> None:
    with torch.no_grad():
        check(ours(**inputs).logits, twin(**inputs).logits, "logits")
    _step(twin, inputs, labels)
    _step(ours, inputs, labels)
    prefix = ours.prefixattn_prefix
    check(prefix.kv.detach()[:, :, 0], peft_prefix_rows(twin)[list(prefix.config.layers)],
          "prefix (the blocks PEFT's layout reads) after one step")
    with torch.no_grad():
        check(ours(**inputs).logits, twin(**inputs).logits, "logits after one step")


def classify_seq2seq(model_type: str, backend: str = "torch") -> str:
    from family_configs import tiny_config

    import prefixattn

    try:
        encoder_decoder = getattr(tiny_config(model_type), "is_encoder_decoder", False)
    except Exception as e:
        raise BuildError(f"{type(e).__name__}: {e}") from e
    if not encoder_decoder:
        return "decoder_only"
    model, inputs = build_seq2seq(model_type)
    labels = {"labels": inputs["decoder_input_ids"]}
    twin, kind = _seq2seq_twin(model, inputs, labels)
    try:
        full = prefixattn.patch(copy.deepcopy(model), num_prefix_tokens=P, sites="all", backend=backend)
    except ValueError as e:
        full, full_refusal = None, str(e)
    try:
        if twin is not None:
            base = twin.twin if isinstance(twin, _PromptAsCache) else twin
            ours = prefixattn.patch(copy.deepcopy(base), backend=backend)
        else:
            ours = prefixattn.patch(copy.deepcopy(model), num_prefix_tokens=P, backend=backend)
    except ValueError as e:
        if full is None:
            return f"refused: {e} | sites='all': {full_refusal}"
        with _refusals_at_forward() as refusal:
            compare_with_reference(full, inputs)
            return f"all_only: {e}"
        return refusal[0]
    with _refusals_at_forward() as refusal:
        if twin is not None:
            _compare_seq2seq_step(twin, ours, inputs, labels)
        else:
            compare_with_reference(ours, inputs)
        if full is None:
            return f"decoder_only_sites: {full_refusal}"
        compare_with_reference(full, inputs)
        return kind or "match_reference"
    return refusal[0]


def check_sites_all(model_type: str, backend: str) -> None:
    """Only ``sites="all"`` against the float64 reference (encoder, decoder and cross-attention each with its
    own prefix)."""
    import prefixattn

    model, inputs = build_seq2seq(model_type)
    compare_with_reference(prefixattn.patch(model, num_prefix_tokens=P, sites="all", backend=backend), inputs)


# ---------------------------------------------------------------------------------------------------
# The float64 reference, per attention call and role
# ---------------------------------------------------------------------------------------------------


def compare_with_reference(ours, inputs: dict) -> None:
    """Every attention call of ``ours`` on ``inputs`` equals the float64 reference over its site's prefix
    (an empty one where the module carries none)."""
    from prefixattn.hf.sites import SITE_ATTR
    from prefixattn.hf.state import STATE_ATTR

    calls = []
    with record_attention_calls(calls), torch.no_grad():
        ours(**inputs)
    if not calls:
        raise Mismatch("no attention layer went through prefixattn")
    prefixed = 0
    for call in calls:
        site = call.module.__dict__.get(SITE_ATTR, getattr(call.module, "layer_idx", None))
        tagged = STATE_ATTR in call.module.__dict__  # (a tower's modules: not patched, no prefix)
        if tagged and site is not None and ours.prefixattn_prefix.slot(site) is not None:
            pk, pv = ours.prefixattn_prefix.layer_prefix(site)
            prefixed += 1
        else:
            Hkv = call.key.shape[1]
            pk = call.key.new_zeros(Hkv, 0, call.key.shape[3])
            pv = call.value.new_zeros(Hkv, 0, call.value.shape[3])
        bias = t5_reference_bias(call, calls, pk.shape[1])
        check(call.out, reference_layer(call, pk, pv, bias), f"{type(call.module).__name__} at site {site}")
    if not prefixed:
        raise Mismatch("no attention call read a prefix")


def t5_reference_bias(call, calls: list, P: int) -> torch.Tensor | None:
    """T5's position bias over [prefix; keys] for one recorded call, built from the model's own bias table
    (the class's ``compute_bias``, not the instance's), or None for attention without one. PEFT's rule: the
    prefix at positions 0..P-1, query i at P + past + i, i.e. ``compute_bias(Sq, P + Sk, P + past)``; the
    sequence columns must equal the model's bias without a prefix, ``compute_bias(Sq, Sk, past)``.
    Cross-attention has no table (T5 hands it zeros): its prefix columns are 0. The table's owner: the
    module itself, else the module that computed the bias this one was handed (T5's layer 0)."""
    bias = call.kwargs.get("position_bias")
    if bias is None:
        return None
    owner = call.module if call.module.has_relative_attention_bias else next(
        (c.module for c in calls if c.kwargs.get("position_bias") is bias and c.module.has_relative_attention_bias),
        None)
    Sq, Sk = call.query.shape[2], call.key.shape[2]
    if owner is None:
        if bias.abs().max() != 0:
            raise Mismatch(f"{type(call.module).__name__}: a position bias without a table that is not zeros")
        return torch.zeros(1, bias.shape[1], Sq, P + Sk, dtype=torch.float64)
    compute = type(owner).compute_bias
    with torch.no_grad():
        full = compute(owner, Sq, P + Sk, past_seen_tokens=P + Sk - Sq).double()
        alone = compute(owner, Sq, Sk, past_seen_tokens=Sk - Sq).double()
    check(full[..., P:], alone, "T5's bias: the sequence columns with and without a prefix")
    return full


def write_readme_section(readme_path: str) -> None:
    """Replace README's generated list of encoder and encoder-decoder families."""
    from family_table_encdec import README_BEGIN, README_END, readme_section

    replace_readme_section(readme_path, README_BEGIN, README_END, readme_section())


def main(argv: list[str]) -> None:
    import warnings

    import transformers

    if argv == ["--readme"]:
        write_readme_section(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md"))
        return
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    which = argv[0] if argv and argv[0] in ("--encoders", "--seq2seq") else None
    names = argv[1:] if which else argv
    jobs = []
    if which != "--seq2seq":
        jobs += [("encoder", f, classify_encoder) for f in (names or encoder_families())]
    if which != "--encoders":
        jobs += [("seq2seq", f, classify_seq2seq) for f in (names or seq2seq_families())]
    for kind, model_type, classify in jobs:
        result, seconds = classify_timed(classify, model_type, 120)
        print(f"{kind:8s} {model_type:26s} {seconds:5.1f}s {result[:220]}", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main(sys.argv[1:])
