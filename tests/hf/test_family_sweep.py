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

from pathlib import Path

import pytest
from family_configs import CANNOT_BUILD
from family_sweep import BuildError, build, classify, time_limit
from family_table import (
    BUILDS_ONLY_ON_THE_PINNED,
    EXPECTED,
    NEWER_THAN_OLDEST,
    PEFT_DROPS_ITS_PREFIX,
    README_BEGIN,
    README_END,
    SWEPT_WITH,
    readme_section,
)

LIMIT_S = 300  # per family, against hangs: most take about a second (a first import of a modeling file: more)


def _all_families() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def test_every_family_has_an_expected_outcome():
    families = set(_all_families())
    listed = set(EXPECTED) | set(CANNOT_BUILD)
    assert not set(EXPECTED) & set(CANNOT_BUILD), "a family is both buildable and not"
    assert families - listed == set(), f"families without an expected outcome: {sorted(families - listed)}"
    missing = listed - families
    if missing <= NEWER_THAN_OLDEST and missing and _older_than_the_pinned_transformers():
        pytest.skip(f"transformers {_installed()} predates families of the table: {sorted(missing)}")
    assert missing == set(), f"families transformers no longer ships: {sorted(missing)}"


def _installed() -> str:
    import transformers

    return transformers.__version__


def _pin(package: str) -> str:
    """The version scripts/constraints.txt pins ``package`` at."""
    pins = Path(__file__).resolve().parents[2] / "scripts" / "constraints.txt"
    for line in pins.read_text().splitlines():
        if line.strip().lower().startswith(f"{package}=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"scripts/constraints.txt pins no {package} version")


def _older_than_the_pinned_transformers() -> bool:
    """Whether the installed transformers is older than the one scripts/constraints.txt pins."""
    from packaging.version import Version

    return Version(_installed()) < Version(_pin("transformers"))


def test_the_tables_were_swept_with_the_pinned_versions():
    """Moving a pin means sweeping again: the tables (and the README) name the versions they hold for."""
    assert SWEPT_WITH == {"transformers": _pin("transformers"), "peft": _pin("peft")}


def test_readme_family_list_is_the_sweep_table():
    """README's family list is generated from the table: ``python tests/family_sweep.py --readme``."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert README_BEGIN in readme and README_END in readme, "README has no generated family list"
    current = readme[readme.index(README_BEGIN): readme.index(README_END) + len(README_END)]
    assert current == readme_section(), "README's family list is stale: run python tests/family_sweep.py --readme"


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
    seen: dict = {}
    got = classify(model_type, backend=backend, seen=seen)
    if "peft_drops_its_prefix" in seen and not _older_than_the_pinned_transformers():
        # the reference for these is PEFT's semantics by hand: PEFT itself must still be the one that fails
        assert seen["peft_drops_its_prefix"] == (model_type in PEFT_DROPS_ITS_PREFIX), (
            f"{model_type}: PEFT {'drops' if seen['peft_drops_its_prefix'] else 'keeps'} its prefix; "
            "update PEFT_DROPS_ITS_PREFIX (prefixattn/hf/verified_families.py)")
    if expected.startswith("refused: "):
        reason = expected.removeprefix("refused: ")
        assert got.startswith("refused: "), f"{model_type}: expected a refusal naming {reason!r}, got {got!r}"
        assert reason in got, f"{model_type}: the refusal does not name {reason!r}: {got!r}"
    else:
        assert got == expected, f"{model_type}: expected {expected!r}, got {got[:300]!r}"


@pytest.mark.parametrize("model_type", sorted(EXPECTED) + sorted(CANNOT_BUILD))
def test_family(model_type):
    if model_type not in _all_families() and model_type in NEWER_THAN_OLDEST:
        pytest.skip(f"transformers {_installed()} does not ship {model_type} yet")
    if model_type in BUILDS_ONLY_ON_THE_PINNED and _older_than_the_pinned_transformers():
        pytest.skip(f"transformers {_installed()}: {BUILDS_ONLY_ON_THE_PINNED[model_type]}")
    with time_limit(LIMIT_S):
        if model_type in CANNOT_BUILD:
            with pytest.raises(BuildError):
                build(model_type)
            return
        _check(model_type)


@pytest.mark.parametrize("model_type", ["llama", "gpt_oss", "qwen3_next", "deepseek_v2", "gemma4_text"])
def test_family_with_triton_kernels(model_type):
    """The fused kernels inside a few representative families: plain GQA, attention sinks, a hybrid,
    latent attention (Dk != Dv), per-layer head dims and KV heads (prefix views of a larger stored one)."""
    with time_limit(LIMIT_S * 2):
        _check(model_type, backend="triton")
