"""Every encoder and encoder-decoder family transformers ships, prefix-tuned from a tiny random config
(issue 19): the outcome of each (tests/family_sweep_encdec.py) must be the one in
tests/family_table_encdec.py, so a family that changes class fails. Encoders are compared with PEFT's
SEQ_CLS / TOKEN_CLS / QUESTION_ANS / FEATURE_EXTRACTION prefix tuning (the backbone's ``past_key_values``
argument restored for PEFT on transformers >= 5.24: tests/tiny_encdec.py), encoder-decoders with
SEQ_2_SEQ_LM, both with the float64 reference where PEFT cannot run; ``sites="all"`` always with the
reference. The PyTorch backend keeps it fast; two families run the Triton kernels (interpreted without a
GPU): a bidirectional encoder, and an encoder-decoder's cross-attention (Sq != Sk) with its own prefix.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from family_sweep import time_limit
from family_sweep_encdec import (
    BuildError,
    build_encoder,
    build_seq2seq,
    check_sites_all,
    classify_encoder,
    classify_seq2seq,
    encoder_families,
    seq2seq_families,
)
from family_table_encdec import (
    BUILDS_ONLY_ON_THE_PINNED,
    CANNOT_BUILD,
    ENCODERS,
    NEWER_THAN_OLDEST,
    README_BEGIN,
    README_END,
    SEQ2SEQ,
    readme_section,
)

pytestmark = pytest.mark.usefixtures("one_thread")

LIMIT_S = 300


def _older_than_the_pinned_transformers() -> bool:
    """Whether the installed transformers is older than the one scripts/constraints.txt pins."""
    import transformers
    from packaging.version import Version

    pins = Path(__file__).resolve().parents[2] / "scripts" / "constraints.txt"
    for line in pins.read_text().splitlines():
        if line.strip().startswith("transformers=="):
            return Version(transformers.__version__) < Version(line.split("==", 1)[1].strip())
    raise AssertionError("scripts/constraints.txt pins no transformers version")


def _skip_where_older(model_type: str) -> None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES and model_type in NEWER_THAN_OLDEST:
        pytest.skip(f"this transformers does not ship {model_type} yet")
    if model_type in BUILDS_ONLY_ON_THE_PINNED and _older_than_the_pinned_transformers():
        pytest.skip(BUILDS_ONLY_ON_THE_PINNED[model_type])


def test_every_family_has_an_expected_outcome():
    older = _older_than_the_pinned_transformers()
    for kind, families, table in (("encoder", encoder_families(), ENCODERS),
                                  ("encoder-decoder", seq2seq_families(), SEQ2SEQ)):
        listed = set(table) | (set(CANNOT_BUILD) & set(families))
        missing = set(families) - listed
        assert not missing, f"{kind} families without an expected outcome: {sorted(missing)}"
        gone = set(table) - set(families) - (NEWER_THAN_OLDEST if older else set())
        assert not gone, f"{kind} families transformers no longer ships: {sorted(gone)}"
    assert not (set(ENCODERS) | set(SEQ2SEQ)) & set(CANNOT_BUILD), "a family is both buildable and not"


def test_readme_family_list_is_the_sweep_table():
    """README's list is generated from the table: ``python tests/family_sweep_encdec.py --readme``."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert README_BEGIN in readme and README_END in readme, "README has no generated encoder list"
    current = readme[readme.index(README_BEGIN): readme.index(README_END) + len(README_END)]
    assert current == readme_section(), "README's list is stale: run python tests/family_sweep_encdec.py --readme"


def _check(got: str, expected: str, model_type: str) -> None:
    if ":" in expected:
        kind, reason = expected.split(": ", 1)
        assert got.startswith(kind + ": "), f"{model_type}: expected {kind!r} naming {reason!r}, got {got[:300]!r}"
        assert reason in got, f"{model_type}: the message does not name {reason!r}: {got[:400]!r}"
    else:
        assert got == expected, f"{model_type}: expected {expected!r}, got {got[:300]!r}"


@pytest.mark.parametrize("model_type", sorted(ENCODERS))
def test_encoder_family(model_type):
    _skip_where_older(model_type)
    with time_limit(LIMIT_S):
        _check(classify_encoder(model_type), ENCODERS[model_type], model_type)


@pytest.mark.parametrize("model_type", sorted(SEQ2SEQ))
def test_seq2seq_family(model_type):
    _skip_where_older(model_type)
    with time_limit(LIMIT_S):
        _check(classify_seq2seq(model_type), SEQ2SEQ[model_type], model_type)


@pytest.mark.parametrize("model_type", sorted(CANNOT_BUILD))
def test_family_that_cannot_be_built(model_type):
    _skip_where_older(model_type)
    build = build_encoder if model_type in encoder_families() else build_seq2seq
    with time_limit(LIMIT_S), pytest.raises(BuildError):
        build(model_type)


def test_encoder_with_triton_kernels():
    """The fused kernels in a bidirectional encoder (causal=False, a padded row) against PEFT."""
    with time_limit(LIMIT_S * 2):
        _check(classify_encoder("roberta", backend="triton"), ENCODERS["roberta"], "roberta")


def test_seq2seq_sites_all_with_triton_kernels():
    """The fused kernels in an encoder-decoder with sites="all": encoder self-attention (padded), decoder
    self-attention, and cross-attention (Sq != Sk, the encoder's padding) each with its own prefix, against
    the float64 reference."""
    with time_limit(LIMIT_S * 2):
        check_sites_all("marian", backend="triton")
