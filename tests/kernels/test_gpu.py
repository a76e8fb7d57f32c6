"""GPU-only checks: bf16/fp16 at real sizes, every head dim, windows (two-sided too), documents, sinks,
score biases, Dk != Dv, determinism of the backward (in one process and across two)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import Case, assert_close_rel, concat_reference, make_case, make_inputs
from prefixattn.kernels.config import use_settings

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
    Case(B=2, Hq=8, Hkv=2, Sq=700, Sk=700, P=16, D=128, window=128),
    Case(B=2, Hq=8, Hkv=2, Sq=1, Sk=3000, P=16, D=128, window=500, prefix="bank"),
    Case(B=2, Hq=8, Hkv=4, Sq=600, Sk=600, P=32, D=64, docs=True, padding="right"),
    Case(B=2, Hq=8, Hkv=2, Sq=300, Sk=300, P=8, D=64, sinks=True, window=100),
    Case(B=2, Hq=8, Hkv=2, Sq=256, Sk=256, P=16, D=192, Dv=128, docs=True, sinks=True),
    Case(B=2, Hq=8, Hkv=2, Sq=333, Sk=333, P=16, D=80, padding="left", bias="batch"),  # T5-like bias
    Case(B=2, Hq=12, Hkv=12, Sq=400, Sk=400, P=8, D=64, causal=False, window=64, bias="shared"),
    Case(B=4, Hq=16, Hkv=4, Sq=1, Sk=2048, P=32, D=128, bias="inf", prefix="bank"),  # decode, split-K
    Case(B=2, Hq=8, Hkv=2, Sq=500, Sk=500, P=16, D=128, causal=False, window=128, padding="right"),
]


@pytest.fixture(autouse=True)
def _poison():
    with use_settings(poison=True):
        yield


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_matches_float64_reference(case, dtype):
    x = make_case(case, dtype=dtype, device="cuda")
    out = prefixattn.prefix_attention(x.q, x.k, x.v, x.pk, x.pv, **x.op_kwargs(), backend="triton")
    ref = concat_reference(x.q, x.k, x.v, x.pk, x.pv, **x.ref_kwargs())
    tol = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}[dtype]
    assert_close_rel(out, ref, tol, "out")
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, x.grad_inputs, do)
    refs = torch.autograd.grad(ref, x.grad_inputs, do.double())
    for name, g, r in zip(("dq", "dk", "dv", "dpk", "dpv", "dsinks"), grads, refs, strict=True):
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


_GRADS_SCRIPT = """
import hashlib, sys, torch
sys.path.insert(0, sys.argv[1])
from helpers import Case, make_case
import prefixattn
torch.manual_seed(0)
x = make_case(Case(B=2, Hq=16, Hkv=4, Sq=700, Sk=700, P=32, D=128, prefix="bank", docs=True, sinks=True),
              dtype=torch.bfloat16, device="cuda")
out = prefixattn.prefix_attention(x.q, x.k, x.v, x.pk, x.pv, **x.op_kwargs())
grads = torch.autograd.grad(out, x.grad_inputs, torch.ones_like(out))
print(hashlib.sha256(b"".join(g.float().cpu().numpy().tobytes() for g in grads)).hexdigest())
"""


def test_gpu_backward_bitwise_equal_across_processes():
    """deterministic=True pins the backward configs: a fresh process (empty autotune cache) gives the
    same bits."""
    tests_dir = str(Path(__file__).resolve().parent.parent)
    runs = [subprocess.run([sys.executable, "-c", _GRADS_SCRIPT, tests_dir], capture_output=True, text=True,
                           check=True).stdout.strip() for _ in range(2)]
    assert runs[0] and runs[0] == runs[1]


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


def test_gpu_fp32_uses_tf32_when_torch_allows_it():
    """fp32 inputs: exact products by default (1e-4 against float64), the TF32 tensor cores once
    torch.backends.cuda.matmul.allow_tf32 is set (TF32's own accuracy, and a different result)."""
    c = Case(B=2, Hq=8, Hkv=2, Sq=512, Sk=512, P=32, D=128)
    x = make_case(c, dtype=torch.float32, device="cuda")
    ref = concat_reference(x.q, x.k, x.v, x.pk, x.pv, **x.ref_kwargs())
    exact = prefixattn.prefix_attention(x.q, x.k, x.v, x.pk, x.pv, **x.op_kwargs(), backend="triton")
    assert_close_rel(exact, ref, 1e-4, "ieee out")
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        tf32 = prefixattn.prefix_attention(x.q, x.k, x.v, x.pk, x.pv, **x.op_kwargs(), backend="triton")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert_close_rel(tf32, ref, 3e-3, "tf32 out")
    assert not torch.equal(tf32, exact), "allow_tf32 did not change how the kernel multiplies"
    do = torch.randn_like(tf32)
    grads = torch.autograd.grad(tf32, x.grad_inputs, do)
    refs = torch.autograd.grad(ref, x.grad_inputs, do.double())
    for name, g, r in zip(("dq", "dk", "dv", "dpk", "dpv"), grads, refs, strict=False):
        assert_close_rel(g, r, 5e-3, name)
