"""The cartridge benchmark (``python -m bench cartridge``): long prefixes (P = 512 / 2048 / 8192, the
trained KV caches of Cartridges) over sequences of S = 256..2048, training (``fwd_bwd``) and decode steps
(``infer``, Sq = 1 over a KV cache of S keys), three ways in the same run:

- ``prefixattn``: the fused kernels (the torch backend on a CPU);
- ``concat_sdpa_mask``: what PEFT does for CARTRIDGE (as for prefix tuning): expand the cache over the
  batch, concatenate it in front of K/V, SDPA with the materialized (B, 1, Sq, P + Sk) mask;
- ``concat_flex_compiled``: what Cartridges' own trainer does: concatenate, FlexAttention with a block mask
  (prefix visible, sequence causal), compiled on every device. On a CPU torch's FlexAttention has no
  backward (torch 2.13 refuses it), so there it runs the decode shapes only.

GPU: B = 4, H = 32 / 8 KV heads, D = 128, bf16 for training; B = 16 for decode, and B = 1 over a short
cache (where the forward's key split, which covers the sequence keys only, cannot help). ``--quick`` keeps the
P = 2048 column only: the GPU script's entry (``python -m bench cartridge --quick --out DIR``). CPU: B = 1,
H = 4 / 2, D = 32, fp32, the same P and S: these are CPU numbers (PyTorch on a CPU against PyTorch on a
CPU), not kernel speed. Records are ``micro`` records with ``suite = "cartridge"``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from .grid import Shape
from .micro import run_shape

PROVIDERS = ("prefixattn", "concat_sdpa_mask", "concat_flex_compiled")
PREFIX_LENGTHS = (512, 2048, 8192)
TRAIN_LENGTHS = (256, 1024, 2048)
DECODE_CACHES = (256, 2048)
GPU_TRAIN = Shape(B=4, H=32, Hkv=8, S=1024, P=2048, D=128, dtype="bfloat16", modes=("fwd_bwd",),
                  providers=PROVIDERS, tag="cartridge train")
CPU_TRAIN = Shape(B=1, H=4, Hkv=2, S=1024, P=2048, D=32, dtype="float32", modes=("fwd_bwd",),
                  providers=PROVIDERS, tag="cartridge train (cpu)")


def grid(gpu: bool, quick: bool = False, smoke: bool = False) -> list[Shape]:
    """The shapes: training then decode, P-major; ``quick``: P = 2048 only; ``smoke``: two tiny shapes
    (the CI check of the harness)."""
    base = GPU_TRAIN if gpu else CPU_TRAIN
    if smoke:
        tiny = replace(CPU_TRAIN, S=32, P=96, D=16, tag="cartridge smoke")
        return [tiny, replace(tiny, Sq=1, modes=("infer",), tag="cartridge smoke decode")]
    lengths = (2048,) if quick else PREFIX_LENGTHS
    decode = replace(base, B=16 if gpu else 1, Sq=1, modes=("infer",),
                     tag="cartridge decode" + ("" if gpu else " (cpu)"))
    shapes = [replace(base, P=p, S=s) for p in lengths for s in TRAIN_LENGTHS]
    shapes += [replace(decode, P=p, S=s) for p in lengths for s in DECODE_CACHES]
    if gpu:  # one sequence: B x Hkv = 8 programs, each walking all P prefix keys (the split covers Sk only)
        shapes += [replace(decode, B=1, P=p, S=256, tag="cartridge decode B=1") for p in lengths]
    return shapes


def run_cartridge_bench(device: torch.device, *, quick: bool = False, smoke: bool = False,
                        backend: str = "auto", rep_ms: float = 30.0, deadline: float | None = None,
                        providers: Sequence[str] = PROVIDERS,
                        log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Every record of the cartridge grid on ``device`` (see the module docstring), for ``providers``."""
    records: list[dict[str, Any]] = []
    for shape in grid(device.type == "cuda", quick=quick, smoke=smoke):
        log(f"# {shape.label()} [{shape.tag}]")
        t0 = time.monotonic()
        recs = run_shape(shape, device, providers=providers, backend=backend, deadline=deadline,
                         warmup_ms=min(10.0, rep_ms), rep_ms=rep_ms, log=log)
        for r in recs:
            r["suite"] = "cartridge"
        records += recs
        log(f"  ({time.monotonic() - t0:.0f}s)")
    return records
