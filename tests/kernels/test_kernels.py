"""The Triton kernels (through the interpreter on CPU) against the float64 concat reference:
forward and every gradient (the sinks' included), over shapes, GQA, padding, decode, prefix forms,
causal or not, sliding windows (two-sided when not causal), packed documents, sinks, score biases and
Dk != Dv."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    BIAS_CASES,
    CASES,
    DEVICE,
    FEATURE_CASES,
    REL_TOL,
    TWO_SIDED_CASES,
    Case,
    assert_close_rel,
    concat_reference,
    count_launches,
    make_case,
    make_inputs,
)
from prefixattn.kernels.config import use_settings

import prefixattn


@pytest.fixture(autouse=True)
def _poison():
    # Every kernel output starts as NaN: an element a kernel forgets to write fails the test.
    with use_settings(poison=True):
        yield


def run_case(c: Case, dtype=torch.float32, device=DEVICE, tol=None, deterministic=True):
    x = make_case(c, dtype, device)
    pk = x.pk
    idx = x.idx
    out = prefixattn.prefix_attention(x.q, x.k, x.v, x.pk, x.pv, **x.op_kwargs(), backend="triton",
                                      deterministic=deterministic)
    ref = concat_reference(x.q, x.k, x.v, x.pk, x.pv, **x.ref_kwargs())
    tol = tol or REL_TOL[dtype]
    assert out.dtype == dtype
    assert out.transpose(1, 2).is_contiguous(), "the output's memory is (B, Sq, Hq, Dv)"
    assert_close_rel(out, ref, tol, f"{c} out")
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, x.grad_inputs, do)
    refs = torch.autograd.grad(ref, x.grad_inputs, do.double())
    names = ("dq", "dk", "dv", "dprefix_k", "dprefix_v", "dsinks")
    for name, g, r in zip(names, grads, refs, strict=False):
        if c.P == 0 and name.startswith("dprefix"):
            assert g.shape == r.shape and g.numel() == 0
            continue
        assert_close_rel(g, r, tol, f"{c} {name}")
    if idx is not None and c.P > 0:  # bank entries no row selected get exactly zero
        unused = [n for n in range(pk.shape[0]) if n not in idx.tolist()]
        assert unused and all(torch.count_nonzero(g[n]) == 0 for g in grads[3:5] for n in unused)
    return out, grads, x.mask, idx


@pytest.mark.parametrize("case", CASES + FEATURE_CASES + BIAS_CASES + TWO_SIDED_CASES, ids=str)
def test_kernel_matches_float64_reference(case):
    out, grads, mask, idx = run_case(case)
    if case.padding == "empty_row" and case.P == 0:
        assert torch.all(out[0] == 0), "a row that sees nothing must give exactly 0"
    if case.prefix == "bank":
        used = set(idx.tolist())
        for entry in range(4):
            if entry not in used:
                assert torch.all(grads[3][entry] == 0) and torch.all(grads[4][entry] == 0)


def test_fp16_through_interpreter():
    run_case(Case(Sq=21, Sk=21, D=32), dtype=torch.float16)


def test_non_contiguous_inputs():
    """Hugging Face hands over q/k/v as transposes of (B, S, H, D) tensors."""
    B, S, Hq, Hkv, D, P = 2, 13, 4, 2, 16, 3
    q = torch.randn(B, S, Hq, D).transpose(1, 2).requires_grad_()
    k = torch.randn(B, S, Hkv, D).transpose(1, 2).requires_grad_()
    v = torch.randn(B, S, Hkv, D).transpose(1, 2).requires_grad_()
    pk = torch.randn(P, Hkv, D).transpose(0, 1).requires_grad_()  # (Hkv, P, D), strided
    pv = torch.randn(Hkv, D, P).transpose(1, 2).requires_grad_()
    assert not q.is_contiguous() and not pk.is_contiguous() and not pv.is_contiguous()
    out = prefixattn.prefix_attention(q, k, v, pk, pv, backend="triton")
    ref = concat_reference(q, k, v, pk, pv)
    assert_close_rel(out, ref, 2e-3, "out")
    do = torch.randn(B, Hq, S, D).transpose(-1, -2).contiguous().transpose(-1, -2)  # strided dO
    for g, r in zip(torch.autograd.grad(out, (q, k, v, pk, pv), do),
                    torch.autograd.grad(ref, (q, k, v, pk, pv), do.double()), strict=True):
        assert_close_rel(g, r, 2e-3, "grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16] if DEVICE.type == "cuda" else [torch.float32])
def test_prefix_views_of_a_larger_stored_bank(dtype):
    """What the patcher hands the kernels for Gemma 4 and latent attention: a bank stored at the largest
    layer's shape (N, 3, P, 24), read as views of the leading 2 heads, 24 key dims and 16 value dims (the
    head and row strides are the stored ones). Forward, and gradients through the views into the bank."""
    torch.manual_seed(0)
    B, S, Hq, Hkv, P, N, Dk, Dv, D = 3, 37, 4, 2, 5, 2, 24, 16, 24
    stored = torch.randn(2, N, 3, P, D, device=DEVICE, dtype=dtype, requires_grad=True)
    q = torch.randn(B, Hq, S, Dk, device=DEVICE, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, S, Dk, device=DEVICE, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, S, Dv, device=DEVICE, dtype=dtype, requires_grad=True)
    index = torch.tensor([1, 0, 1], device=DEVICE)
    pk, pv = stored[0, :, :Hkv, :, :Dk], stored[1, :, :Hkv, :, :Dv]
    assert not pv.is_contiguous()
    out = prefixattn.prefix_attention(q, k, v, pk, pv, prefix_index=index, backend="triton")
    ref = concat_reference(q, k, v, pk, pv, prefix_index=index)
    tol = REL_TOL[dtype]
    assert_close_rel(out, ref, tol, "out")
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, stored), do)
    want = torch.autograd.grad(ref, (q, k, v, stored), do.double())
    for g, r, name in zip(got, want, ("dq", "dk", "dv", "dstored"), strict=True):
        assert_close_rel(g, r, tol, name)
    assert torch.equal(got[3][1, ..., Dv:], torch.zeros_like(got[3][1, ..., Dv:])), "value dims no layer reads"
    assert torch.equal(got[3][:, :, Hkv:], torch.zeros_like(got[3][:, :, Hkv:])), "heads no layer reads"


def test_layer0_computes_only_the_prefix_gradient(monkeypatch):
    """q, k, v need no gradient (layer 0 of a frozen model): the backward launches no dq/dk/dv work."""
    import prefixattn.kernels as kernels

    seen = {}
    real = kernels.attention_backward

    def spy(*args):
        seen["need_dq"], seen["need_dkv"], seen["need_dprefix"] = args[17:20]
        return real(*args)

    monkeypatch.setattr(kernels, "attention_backward", spy)
    c = Case(Sq=11, Sk=11)
    (q, k, v, pk, pv), _, _ = make_inputs(c, requires_grad=False)
    pk.requires_grad_(True)
    pv.requires_grad_(True)
    out = prefixattn.prefix_attention(q, k, v, pk, pv, backend="triton")
    dpk, dpv = torch.autograd.grad(out, (pk, pv), torch.ones_like(out))
    assert seen == {"need_dq": False, "need_dkv": False, "need_dprefix": True}
    ref = concat_reference(q, k, v, pk, pv)
    rpk, rpv = torch.autograd.grad(ref, (pk, pv), torch.ones_like(ref, dtype=torch.float64))
    assert_close_rel(dpk, rpk, 2e-3, "dprefix_k")
    assert_close_rel(dpv, rpv, 2e-3, "dprefix_v")


def test_only_kv_gradients():
    c = Case(Sq=9, Sk=14, prefix="row")
    (q, k, v, pk, pv), _, _ = make_inputs(c, requires_grad=False)
    k.requires_grad_(True)
    out = prefixattn.prefix_attention(q, k, v, pk, pv, backend="triton")
    (dk,) = torch.autograd.grad(out.sum(), (k,))
    ref = concat_reference(q, k, v, pk, pv)
    (rk,) = torch.autograd.grad(ref.sum(), (k,))
    assert_close_rel(dk, rk, 2e-3, "dk")


NONDETERMINISTIC_CASES = [
    Case(prefix="shared", padding="left"),
    Case(prefix="row", Sq=1, Sk=21),
    Case(B=3, prefix="bank", P=17, Hq=6),
    Case(Sq=37, Sk=37, D=80, softcap=4.0),
    Case(Sq=9, Sk=40, causal=False, padding="right", Hq=8),
    Case(P=0, padding="empty_row"),
    Case(B=3, Sq=23, Sk=23, causal=False, window=5, prefix="bank", bias="inf"),
]


@pytest.mark.parametrize("c", NONDETERMINISTIC_CASES, ids=str)
def test_nondeterministic_backward(c):
    # deterministic=False: dq from the dk/dv kernel's dS tiles and the prefix gradient straight
    # into the bank entry, both with fp32 atomics
    run_case(c, deterministic=False)


def test_nondeterministic_dq_skips_the_dq_kernel(monkeypatch):
    from prefixattn.kernels import backward

    tuned = count_launches(monkeypatch, backward, "_dq_kernel")
    pinned = count_launches(monkeypatch, backward, "_dq_kernel_jit")
    run_case(Case(Sq=9, Sk=9), deterministic=False)
    assert not tuned and not pinned
    run_case(Case(Sq=9, Sk=9), deterministic=True)
    assert len(pinned) == 1 and not tuned, "deterministic=True launches the pinned config, no autotuner"


SPLIT_CASES = [
    Case(Sq=1, Sk=300, Hq=8, Hkv=2, prefix="bank", padding="left"),  # decode over a long cache
    Case(Sq=3, Sk=260, P=0, padding="empty_row"),  # a split (or every split) sees nothing
    Case(Sq=24, Sk=300, Hq=2, Hkv=2, D=80, softcap=4.0),  # chunked prefill, odd D
    Case(Sq=5, Sk=270, causal=False, padding="right", prefix="row"),
    Case(Sq=2, Sk=280, window=150, sinks=True, D=24, Dv=40, P=3),  # window across splits, sink in split 0
    Case(Sq=1, Sk=520, window=200, P=2, Hq=8, Hkv=2, padding="left"),  # splits start at the window
    Case(Sq=2, Sk=280, causal=False, window=120, P=3, bias="inf"),  # two-sided window and a bias over splits
]


@pytest.mark.parametrize("c,splits", list(zip(SPLIT_CASES, [3, 2, 3, 2, 3, 2, 3], strict=True)),
                         ids=lambda x: str(x))
def test_split_k_forward(c, splits, monkeypatch):
    # keys split over programs, partial results merged by logsumexp; the backward reads the merged lse
    from prefixattn.kernels import forward

    merges = count_launches(monkeypatch, forward, "_combine_splits_kernel")
    with use_settings(splits=splits):
        run_case(c)
    assert merges, "the split path did not run"


def test_split_k_only_when_rows_cannot_fill_the_gpu():
    from prefixattn.kernels.forward import num_splits

    cpu = torch.device("cpu")  # counts as 4 SMs
    assert num_splits(B=1, Hkv=1, R=4, Sk=16384, device=cpu) > 1  # decode, long cache
    assert num_splits(B=1, Hkv=1, R=4, Sk=256, device=cpu) == 1  # short cache
    assert num_splits(B=8, Hkv=8, R=4, Sk=16384, device=cpu) == 1  # enough programs already
    assert num_splits(B=1, Hkv=1, R=4096, Sk=4096, device=cpu) == 1  # prefill


def test_no_prefix_equals_plain_causal_attention():
    c = Case(P=0, Sq=15, Sk=15)
    (q, k, v, _, _), _, _ = make_inputs(c, requires_grad=False)
    out = prefixattn.prefix_attention(q, k, v, backend="triton")
    kk = k.repeat_interleave(2, dim=1)
    vv = v.repeat_interleave(2, dim=1)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), kk.double(), vv.double(), is_causal=True)
    assert_close_rel(out, ref, 2e-3, "out")


def test_custom_scale():
    c = Case(Sq=10, Sk=10)
    (q, k, v, pk, pv), _, _ = make_inputs(c, requires_grad=False)
    out = prefixattn.prefix_attention(q, k, v, pk, pv, scale=0.37, backend="triton")
    ref = concat_reference(q, k, v, pk, pv, scale=0.37)
    assert_close_rel(out, ref, 2e-3, "out")


def test_backward_is_deterministic_on_repeat():
    c = Case(B=3, Sq=20, Sk=20, prefix="shared")
    (q, k, v, pk, pv), _, _ = make_inputs(c)
    out = prefixattn.prefix_attention(q, k, v, pk, pv, backend="triton")
    do = torch.randn_like(out)
    g1 = torch.autograd.grad(out, (pk, pv), do, retain_graph=True)
    g2 = torch.autograd.grad(out, (pk, pv), do)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))


def test_windowed_decode_splits_only_the_window(monkeypatch):
    """Under a window the split-K heuristic counts only the keys from the first query's window on:
    a short window over a long cache needs no split (without the window it would take two)."""
    from prefixattn.kernels import forward

    cpu = torch.device("cpu")
    assert forward.num_splits(B=1, Hkv=1, R=4, Sk=1100, device=cpu) == 2
    grids = count_launches(monkeypatch, forward, "_fwd_kernel_jit")
    merges = count_launches(monkeypatch, forward, "_combine_splits_kernel")
    run_case(Case(B=1, Hq=4, Hkv=1, Sq=1, Sk=1100, window=100, P=3))
    assert grids and grids[0][2] == 1 and not merges
