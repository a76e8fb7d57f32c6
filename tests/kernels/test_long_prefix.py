"""Long prefixes (cartridges: P in the thousands, P much larger than S) through the Triton kernels (the
interpreter on CPU) against the float64 concat reference: forward and every gradient, for training
shapes (a short chunk of text over a long cartridge), decode steps (Sq = 1) with and without key splits,
per-row and bank prefixes, padding, and the atomic (deterministic=False) prefix gradient.

Small head dims and short sequences keep the interpreter fast; P >= 1000 is the point of the file, and P
is never a multiple of the 64-wide prefix block, so the last block is a partial one."""

from __future__ import annotations

import pytest
import torch
from helpers import REL_TOL, Case, assert_close_rel, concat_reference, count_launches, make_case
from prefixattn.kernels.config import use_settings

import prefixattn


@pytest.fixture(autouse=True)
def _poison():
    with use_settings(poison=True):  # every kernel output starts as NaN: a slot left unwritten fails
        yield


def _check(c: Case, deterministic: bool = True) -> None:
    x = make_case(c, torch.float32)
    out = prefixattn.prefix_attention(x.q, x.k, x.v, x.pk, x.pv, **x.op_kwargs(), backend="triton",
                                      deterministic=deterministic)
    ref = concat_reference(x.q, x.k, x.v, x.pk, x.pv, **x.ref_kwargs())
    tol = REL_TOL[torch.float32]
    assert_close_rel(out, ref, tol, f"{c} out")
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, x.grad_inputs, do)
    refs = torch.autograd.grad(ref, x.grad_inputs, do.double())
    for name, g, r in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, refs, strict=False):
        assert_close_rel(g, r, tol, f"{c} {name}")
    if x.idx is not None:  # bank entries no row selected get exactly zero
        unused = [n for n in range(x.pk.shape[0]) if n not in x.idx.tolist()]
        assert unused and all(torch.count_nonzero(g[n]) == 0 for g in grads[3:5] for n in unused)


LONG_CASES = [
    Case(B=2, Hq=2, Hkv=1, Sq=37, Sk=37, P=1000, D=16, padding="left"),  # P >> S, GQA, padding
    Case(B=1, Hq=2, Hkv=1, Sq=1, Sk=5, P=1500, D=16),  # decode over a long cartridge, short cache
    Case(B=2, Hq=4, Hkv=1, Sq=1, Sk=9, P=1029, D=16, prefix="bank", padding="right"),  # decode, a bank
    Case(B=2, Hq=1, Hkv=1, Sq=13, Sk=13, P=1100, D=16, prefix="row", causal=False),  # per-row, encoder
]


@pytest.mark.parametrize("case", LONG_CASES, ids=str)
def test_long_prefix_matches_float64_reference(case):
    _check(case)


def test_long_prefix_atomic_prefix_gradient():
    # deterministic=False: the prefix gradient goes straight into the output with fp32 atomics
    _check(Case(B=2, Hq=2, Hkv=1, Sq=9, Sk=9, P=1000, D=16), deterministic=False)


def test_long_prefix_decode_with_key_splits(monkeypatch):
    """A decode step over a long cartridge and a cache long enough to split: split 0 takes the whole
    prefix, the others the sequence keys; the merge by logsumexp gives the reference."""
    from prefixattn.kernels import forward

    merges = count_launches(monkeypatch, forward, "_combine_splits_kernel")
    with use_settings(splits=3):
        _check(Case(B=1, Hq=4, Hkv=1, Sq=1, Sk=300, P=1000, D=16, padding="left"))
    assert merges, "the split path did not run"


GPU_LONG_CASES = [  # bf16 at a cartridge's sizes (not run without a GPU)
    Case(B=2, Hq=16, Hkv=4, Sq=256, Sk=256, P=4096, D=128, padding="left"),
    Case(B=4, Hq=32, Hkv=8, Sq=1, Sk=300, P=8192, D=128),  # decode over a long cartridge, short cache
    Case(B=2, Hq=8, Hkv=2, Sq=64, Sk=64, P=2048, D=64, prefix="bank"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_LONG_CASES, ids=str)
def test_long_prefix_bf16_on_the_gpu(case):
    x = make_case(case, torch.bfloat16)
    out = prefixattn.prefix_attention(x.q, x.k, x.v, x.pk, x.pv, **x.op_kwargs(), backend="triton")
    ref = concat_reference(x.q, x.k, x.v, x.pk, x.pv, **x.ref_kwargs())
    tol = REL_TOL[torch.bfloat16]
    assert_close_rel(out, ref, tol, f"{case} out")
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, x.grad_inputs, do)
    refs = torch.autograd.grad(ref, x.grad_inputs, do.double())
    for name, g, r in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, refs, strict=False):
        assert_close_rel(g, r, tol, f"{case} {name}")
