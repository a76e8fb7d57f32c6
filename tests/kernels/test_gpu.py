"""GPU-only checks: bf16/fp16 at real sizes, every head dim, determinism of the backward."""

from __future__ import annotations

import pytest
import torch
from helpers import Case, assert_close_rel, concat_reference, make_inputs

import prefixattn

pytestmark = pytest.mark.gpu

GPU_CASES = [
    Case(B=2, Hq=16, Hkv=4, Sq=1024, Sk=1024, P=64, D=128),
    Case(B=2, Hq=8, Hkv=8, Sq=777, Sk=777, P=37, D=64, padding="left", prefix="row"),
    Case(B=3, Hq=8, Hkv=2, Sq=300, Sk=300, P=16, D=80, prefix="bank", padding="right"),
    Case(B=2, Hq=4, Hkv=2, Sq=257, Sk=257, P=5, D=96),
    Case(B=1, Hq=4, Hkv=1, Sq=200, Sk=200, P=256, D=256),
    Case(B=4, Hq=32, Hkv=8, Sq=1, Sk=2048, P=64, D=128),  # decode over a KV cache
    Case(B=2, Hq=8, Hkv=2, Sq=128, Sk=1000, P=32, D=128),  # chunked prefill
    Case(B=2, Hq=8, Hkv=4, Sq=300, Sk=200, P=8, D=64, causal=False, softcap=30.0),
    Case(B=2, Hq=4, Hkv=2, Sq=64, Sk=64, P=0, D=64, padding="empty_row"),
]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("PREFIXATTN_POISON", "1")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_matches_float64_reference(case, dtype):
    (q, k, v, pk, pv), mask, idx = make_inputs(case, dtype=dtype, device="cuda")
    out = prefixattn.prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, causal=case.causal,
                                      prefix_index=idx, softcap=case.softcap, backend="triton")
    ref = concat_reference(q, k, v, pk, pv, key_padding_mask=mask, causal=case.causal,
                           prefix_index=idx, softcap=case.softcap)
    tol = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}[dtype]
    assert_close_rel(out, ref, tol, "out")
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, pk, pv), do)
    refs = torch.autograd.grad(ref, (q, k, v, pk, pv), do.double())
    for name, g, r in zip(("dq", "dk", "dv", "dpk", "dpv"), grads, refs, strict=True):
        if case.P == 0 and name.startswith("dp"):
            continue
        assert_close_rel(g, r, tol * 1.5, name)


@pytest.mark.parametrize("prefix", ["shared", "row", "bank"])
def test_gpu_backward_bitwise_deterministic(prefix):
    c = Case(B=4, Hq=16, Hkv=4, Sq=512, Sk=512, P=64, D=128, prefix=prefix, padding="left")
    (q, k, v, pk, pv), mask, idx = make_inputs(c, dtype=torch.bfloat16, device="cuda")
    out = prefixattn.prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, prefix_index=idx)
    do = torch.randn_like(out)
    g1 = torch.autograd.grad(out, (q, k, v, pk, pv), do, retain_graph=True)
    g2 = torch.autograd.grad(out, (q, k, v, pk, pv), do)
    for a, b in zip(g1, g2, strict=True):
        assert torch.equal(a, b)


def test_gpu_atomic_gradients_close_to_deterministic():
    # deterministic=False: dq and the prefix gradient through fp32 atomics
    c = Case(B=8, Hq=16, Hkv=4, Sq=256, Sk=256, P=32, D=128)
    (q, k, v, pk, pv), _, _ = make_inputs(c, dtype=torch.bfloat16, device="cuda")
    do = torch.randn(c.B, c.Hq, c.Sq, c.D, device="cuda", dtype=torch.bfloat16)
    outs = [prefixattn.prefix_attention(q, k, v, pk, pv, deterministic=d) for d in (True, False)]
    gd = torch.autograd.grad(outs[0], (q, k, v, pk, pv), do)
    ga = torch.autograd.grad(outs[1], (q, k, v, pk, pv), do)
    for a, b in zip(ga, gd, strict=True):
        assert_close_rel(a, b, 1e-2, "atomic vs fixed-order")


def test_gpu_layer0_prefix_only():
    c = Case(B=4, Hq=16, Hkv=4, Sq=512, Sk=512, P=16, D=128)
    (q, k, v, pk, pv), _, _ = make_inputs(c, dtype=torch.bfloat16, device="cuda", requires_grad=False)
    pk.requires_grad_(True)
    pv.requires_grad_(True)
    out = prefixattn.prefix_attention(q, k, v, pk, pv)
    do = torch.randn_like(out)
    g = torch.autograd.grad(out, (pk, pv), do)
    ref = concat_reference(q, k, v, pk, pv)
    r = torch.autograd.grad(ref, (pk, pv), do.double())
    for a, b in zip(g, r, strict=True):
        assert_close_rel(a, b, 3e-2, "dprefix")


def test_gpu_torch_compile_inductor():
    c = Case(B=2, Hq=8, Hkv=2, Sq=128, Sk=128, P=16, D=64)
    (q, k, v, pk, pv), _, _ = make_inputs(c, dtype=torch.bfloat16, device="cuda")
    f = torch.compile(lambda *a: prefixattn.prefix_attention(*a).float().square().sum(), fullgraph=True)
    loss = f(q, k, v, pk, pv)
    loss.backward()
    assert torch.isfinite(pk.grad).all()
