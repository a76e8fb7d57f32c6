"""Which shapes the microbenchmark runs: the full GPU grid, a quick one, and a tiny CPU one.

The full grid is not every combination (that would take hours): it sweeps S at a base
configuration (B=4, Hq=32, Hkv=8 (GQA), D=128, P=64, bf16), then varies one thing at a time at
S=2048 (P, D, MHA, fp16, B), plus decode steps (Sq=1 over a KV cache). Earlier entries matter most:
when the time budget runs out, the rest is recorded as skipped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

ALL_PROVIDERS = ("prefixattn", "prefixattn_atomic", "concat_sdpa_mask", "concat_sdpa_causal", "concat_flex",
                 "eager")
TRAIN_MODES = ("fwd", "bwd", "fwd_bwd", "layer0_fwd_bwd")


@dataclass(frozen=True)
class Shape:
    B: int
    H: int
    Hkv: int
    S: int  # sequence keys (Sk); also the number of queries unless Sq is set
    P: int
    D: int
    dtype: str = "bfloat16"
    Sq: int | None = None  # 1 for a decode step over a KV cache of S keys
    modes: tuple[str, ...] = TRAIN_MODES
    providers: tuple[str, ...] = ALL_PROVIDERS
    tag: str = ""

    @property
    def q_len(self) -> int:
        return self.S if self.Sq is None else self.Sq

    def label(self) -> str:
        sq = "" if self.Sq is None else f" Sq={self.Sq}"
        return (f"B={self.B} H={self.H}/{self.Hkv} S={self.S}{sq} P={self.P} D={self.D} "
                f"{self.dtype.replace('float', 'fp').replace('bfp', 'bf')}")

    def as_dict(self) -> dict:
        return asdict(self)


BASE = Shape(B=4, H=32, Hkv=8, S=2048, P=64, D=128, tag="base")


def full_grid() -> list[Shape]:
    """The GPU grid (about 8 minutes on an H100 with all providers)."""
    grid = [replace(BASE, S=s, tag="S sweep") for s in (512, 1024, 2048, 4096, 8192)]
    grid += [
        replace(BASE, P=16, tag="P sweep"),
        replace(BASE, P=256, tag="P sweep"),
        replace(BASE, D=64, tag="D sweep"),
        replace(BASE, Hkv=32, tag="MHA"),
        replace(BASE, dtype="float16", tag="fp16"),
        replace(BASE, B=1, S=8192, tag="B sweep"),
        replace(BASE, B=16, S=1024, tag="B sweep"),
    ]
    grid += [replace(BASE, B=16, S=s, Sq=1, modes=("infer",), tag="decode") for s in (1024, 4096, 16384)]
    return grid


def quick_grid() -> list[Shape]:
    """A few points of the full grid (about a minute on a GPU)."""
    return [replace(BASE, S=s, tag="S sweep") for s in (1024, 4096)] + [
        replace(BASE, B=16, S=4096, Sq=1, modes=("infer",), tag="decode")
    ]


def cpu_grid() -> list[Shape]:
    """Tiny sizes that run in seconds on a CPU: proves the harness works, measures nothing."""
    tiny = Shape(B=2, H=4, Hkv=2, S=64, P=8, D=16, dtype="float32", tag="cpu")
    return [
        tiny,
        replace(tiny, S=128),
        replace(tiny, Hkv=4, tag="cpu MHA"),
        replace(tiny, S=128, Sq=1, modes=("infer",), tag="cpu decode"),
    ]


def smoke_grid() -> list[Shape]:
    """One tiny training shape and one decode shape: the CI check."""
    tiny = Shape(B=2, H=4, Hkv=2, S=32, P=4, D=16, dtype="float32",
                 modes=("fwd", "fwd_bwd", "layer0_fwd_bwd"), tag="cpu")
    return [tiny, replace(tiny, S=48, Sq=1, modes=("infer",), tag="cpu decode")]


HEADLINE_PROVIDERS = ("prefixattn", "concat_sdpa_mask", "concat_sdpa_causal", "concat_flex")
DECODE_PROVIDERS = ("prefixattn", "concat_sdpa_mask", "concat_sdpa_causal")


def headline_grid() -> list[Shape]:
    """The GPU check's grid (scripts/gpu_check.sh, about 2 minutes): fwd and fwd_bwd at D=128 bf16
    against the concat baselines; S = 1k-8k at P=64, P = 16 and 256 at S=4096 (GQA 32/8), and MHA."""
    base = replace(BASE, modes=("fwd", "fwd_bwd"), providers=HEADLINE_PROVIDERS, tag="headline")
    grid = [replace(base, S=s, tag="S sweep") for s in (1024, 2048, 4096, 8192)]
    grid += [replace(base, S=4096, P=p, tag="P sweep") for p in (16, 256)]
    grid += [replace(base, Hkv=32, S=s, tag="MHA") for s in (2048, 4096)]
    return grid


def decode_grid() -> list[Shape]:
    """Decode steps for the GPU check: Sq=1 over a 4k and a 16k cache, B=16, GQA 32/8, D=128."""
    return [replace(BASE, B=16, S=s, Sq=1, modes=("infer",), tag="decode", providers=DECODE_PROVIDERS)
            for s in (4096, 16384)]


def dry_grid() -> list[Shape]:
    """The GPU check's grid at CPU size (``scripts/gpu_check.sh --dry-run``: the kernels run in the
    Triton interpreter)."""
    return [Shape(B=1, H=4, Hkv=2, S=32, P=4, D=16, dtype="float32", modes=("fwd", "fwd_bwd"),
                  providers=HEADLINE_PROVIDERS, tag="dry")]


def dry_decode_grid() -> list[Shape]:
    return [replace(s, S=32, P=4, D=16, dtype="float32", B=1, H=4, Hkv=2, tag="dry decode")
            for s in decode_grid()[:1]]


GRIDS = {"full": full_grid, "quick": quick_grid, "headline": headline_grid, "decode": decode_grid,
         "cpu": cpu_grid, "smoke": smoke_grid, "dry": dry_grid, "dry_decode": dry_decode_grid}
