"""The torch backend (prefixattn/ops/torch_backend.py over engines.py, and sdpa_concat.py) against the
independent float64 reference: every feature at odd sizes, outputs and every gradient, fp32 and bf16, on
each path (the fused CPU kernel; where it cannot run, public SDPA over [prefix; k] for the calls it covers
and the chunked engine for the rest, or the chunked engine alone); gradients only where autograd asks
(layer 0 runs the prefix block alone); exact zeros for unused bank entries; no (Sq, Sk)-sized tensor for
causal / padded / decode / encoder calls and bounded tiles for windows and documents; a private op that
does not look as expected disables the fused engine cleanly."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    BIAS_CASES,
    CASES,
    FEATURE_CASES,
    REL_TOL,
    TWO_SIDED_CASES,
    Case,
    assert_close_rel,
    concat_reference,
    make_case,
)
from torch.utils._python_dispatch import TorchDispatchMode

import prefixattn
from prefixattn.ops import engines, torch_backend

pytestmark = pytest.mark.usefixtures("one_thread")

MORE_CASES = [
    Case(Sq=9, Sk=40, padding="left", sinks=True),  # chunked prefill (keys before the chunk + the chunk)
    Case(Sq=9, Sk=40, P=0, padding="right", Hq=6, Hkv=3),
    Case(Sq=1, Sk=37, D=80, P=1, prefix="row", sinks=True),  # decode step
    Case(Sq=37, Sk=37, D=80, P=1, padding="left", Dv=48),
    Case(Sq=37, Sk=37, P=3, window=5, docs=True, padding="right", prefix="bank"),
    Case(Sq=37, Sk=37, P=0, causal=False, padding="empty_row"),
    Case(Sq=9, Sk=40, padding="left", bias="batch", P=1),  # chunked prefill, per-tile bias slices
    Case(Sq=37, Sk=37, causal=False, padding="right", bias="inf", window=9),
]
ALL_CASES = CASES + FEATURE_CASES + BIAS_CASES + TWO_SIDED_CASES + MORE_CASES


@pytest.fixture(params=["cpu_flash", "sdpa", "chunked"])
def engine(request, monkeypatch):
    """Which path runs: the fused CPU kernel (when this torch has it); else (as on CUDA and MPS) SDPA over
    [prefix; k] where it applies and the chunked engine elsewhere; or the chunked engine alone."""
    if request.param in ("sdpa", "chunked"):
        monkeypatch.setattr(engines, "_CPU_FLASH_PROBLEM", "forced off by the test")
    if request.param == "chunked":
        monkeypatch.setattr(prefixattn.ops, "sdpa_concat_applies", lambda *a, **k: False)
    elif request.param == "cpu_flash" and engines.cpu_flash_problem() is not None:
        pytest.skip(f"the fused CPU kernel is not usable here: {engines.cpu_flash_problem()}")
    return request.param


def _check_against_reference(case: Case, dtype: torch.dtype) -> None:
    x = make_case(case, dtype=torch.float32, requires_grad=False)
    leaves = [t.to(dtype).requires_grad_(True) for t in x.grad_inputs]
    q, k, v, pk, pv = leaves[:5]
    kwargs = x.op_kwargs()
    if case.sinks:
        kwargs["sinks"] = leaves[5]
    out = prefixattn.prefix_attention(q, k, v, pk, pv, **kwargs, backend="torch")
    ref_kwargs = {**x.ref_kwargs(), "sinks": kwargs["sinks"]}
    ref = concat_reference(q, k, v, pk, pv, **ref_kwargs)
    assert out.dtype == dtype and out.shape == (case.B, case.Hq, case.Sq, case.dv)
    tol = 1e-5 if dtype == torch.float32 else REL_TOL[dtype]
    assert_close_rel(out, ref, tol, "out")
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, do, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, leaves, do.double(), allow_unused=True)
    names = ["dq", "dk", "dv", "dprefix_k", "dprefix_v", "dsinks"]
    for name, g, r, leaf in zip(names, grads, ref_grads, leaves, strict=False):
        assert g is not None and g.dtype == leaf.dtype, name
        if r is None or r.numel() == 0 or r.norm() == 0:
            assert torch.count_nonzero(g) == 0, name
            continue
        assert_close_rel(g, r, tol, name)


@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_fp32_matches_reference(engine, case):
    _check_against_reference(case, torch.float32)


@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_bf16_matches_reference(engine, case):
    """bf16 inputs run in bf16 (fp32 accumulation), compared with the float64 reference of the same
    bf16 values."""
    _check_against_reference(case, torch.bfloat16)


@pytest.mark.parametrize("case", [
    Case(Sq=1, Sk=300, P=3, D=80, padding="left", sinks=True),  # past DECODE_CONCAT_KEYS: the cache in place
    Case(Sq=1, Sk=300, P=0, padding="empty_row"),
    Case(Sq=1, Sk=300, prefix="bank", window=7, Hq=8, Hkv=2),
    Case(Sq=1, Sk=300, P=2, bias="inf", padding="left"),
], ids=str)
def test_decode_over_a_long_cache(engine, case):
    assert case.Sk > torch_backend.DECODE_CONCAT_KEYS
    _check_against_reference(case, torch.float32)


@pytest.mark.parametrize("case", [CASES[0], CASES[5], FEATURE_CASES[6], FEATURE_CASES[10], MORE_CASES[2]], ids=str)
def test_inference_equals_training_forward(engine, case):
    """Without autograd (generate()) the op skips the autograd Function: same output, bit for bit."""
    x = make_case(case)
    out = prefixattn.prefix_attention(x.q, x.k, x.v, x.pk, x.pv, **x.op_kwargs(), backend="torch")
    with torch.no_grad():
        again = prefixattn.prefix_attention(x.q, x.k, x.v, x.pk, x.pv, **x.op_kwargs(), backend="torch")
    assert out.grad_fn is not None and again.grad_fn is None
    assert torch.equal(out, again)

@pytest.mark.parametrize("case", [
    Case(B=2, Hq=4, Hkv=2, Sq=5, Sk=7, P=3, D=8, padding="left", window=3),
    Case(B=2, Hq=2, Hkv=1, Sq=6, Sk=6, P=2, D=4, Dv=6, docs=True, sinks=True),
    Case(B=2, Hq=2, Hkv=2, Sq=4, Sk=9, P=2, D=4, prefix="bank", padding="right"),
], ids=str)
def test_gradcheck(engine, case):
    x = make_case(case, dtype=torch.float64)
    kwargs = x.op_kwargs()

    def f(*tensors):
        if case.sinks:
            kwargs["sinks"] = tensors[5]
        return prefixattn.prefix_attention(*tensors[:5], **kwargs, backend="torch")

    assert torch.autograd.gradcheck(f, x.grad_inputs, fast_mode=True)


def test_unused_bank_entries_get_exact_zeros(engine):
    """Bank entry 1 is picked by no row: its gradient is a tensor of zeros (not None, not tiny)."""
    x = make_case(Case(B=4, Sq=11, Sk=11, P=4, prefix="bank", padding="left"))
    out = prefixattn.prefix_attention(x.q, x.k, x.v, x.pk, x.pv, **x.op_kwargs(), backend="torch")
    dpk, dpv = torch.autograd.grad(out, (x.pk, x.pv), torch.randn_like(out))
    assert set(x.idx.tolist()) == {0, 2, 3}
    for g in (dpk, dpv):
        assert torch.equal(g[1], torch.zeros_like(g[1]))
        assert all(g[i].abs().sum() > 0 for i in (0, 2, 3))


@pytest.mark.parametrize("case", [Case(Sq=37, Sk=37, padding="left"), Case(Sq=19, Sk=19, window=4, docs=True),
                                  Case(Sq=1, Sk=33, prefix="bank")], ids=str)
def test_layer0_runs_the_prefix_block_alone(engine, monkeypatch, case):
    """q, k, v need no gradient (the first layer of a frozen model): the backward attends nothing but the
    prefix, and the prefix gradient is still exact."""
    if engine == "sdpa":
        pytest.skip("autograd through SDPA computes every gradient (as PEFT's does)")
    keys = []
    cls = engines.CpuFlashEngine if engine == "cpu_flash" else engines.ChunkedEngine
    real = cls.backward
    monkeypatch.setattr(cls, "backward", staticmethod(lambda *a: keys.append(a[2].shape[2]) or real(*a)))
    x = make_case(case)
    q, k, v = (t.detach() for t in (x.q, x.k, x.v))
    out = prefixattn.prefix_attention(q, k, v, x.pk, x.pv, **x.op_kwargs(), backend="torch")
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x.pk, x.pv), do)
    assert keys == [case.P], keys
    ref = concat_reference(q, k, v, x.pk, x.pv, **x.ref_kwargs())
    for g, r in zip(grads, torch.autograd.grad(ref, (x.pk, x.pv), do.double()), strict=True):
        assert_close_rel(g, r, 1e-5, "dprefix")


@pytest.mark.parametrize("wanted", [("q",), ("k", "v"), ("q", "pk"), ("sinks",)])
def test_only_the_gradients_asked_for(engine, wanted):
    x = make_case(Case(Sq=13, Sk=13, padding="right", sinks=True), requires_grad=False)
    named = dict(q=x.q, k=x.k, v=x.v, pk=x.pk, pv=x.pv, sinks=x.sinks)
    for name in wanted:
        named[name].requires_grad_(True)
    out = prefixattn.prefix_attention(named["q"], named["k"], named["v"], named["pk"], named["pv"],
                                      key_padding_mask=x.mask, sinks=named["sinks"], backend="torch")
    ref = concat_reference(named["q"], named["k"], named["v"], named["pk"], named["pv"], key_padding_mask=x.mask,
                           sinks=named["sinks"])
    do = torch.randn_like(out)
    leaves = [named[n] for n in wanted]
    for g, r in zip(torch.autograd.grad(out, leaves, do), torch.autograd.grad(ref, leaves, do.double()),
                    strict=True):
        assert_close_rel(g, r, 1e-5, "grad")


class _LargestOutput(TorchDispatchMode):
    """Records the largest tensor any op returns, activations ((.., S, D): last dim a head dim) aside."""

    def __init__(self, head_dims=(8,)):
        super().__init__()
        self.largest = (0, None, "")
        self.head_dims = head_dims

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor) or (t.dim() and t.shape[-1] in self.head_dims):
                continue
            if t.numel() > self.largest[0]:
                self.largest = (t.numel(), tuple(t.shape), str(func))
        return out


@pytest.mark.parametrize("case", [
    Case(B=2, Hq=2, Hkv=1, Sq=160, Sk=160, P=5, D=8, padding="left", sinks=True),  # training / prefill
    Case(B=2, Hq=2, Hkv=1, Sq=160, Sk=160, P=5, D=8, prefix="bank"),
    Case(B=2, Hq=2, Hkv=1, Sq=160, Sk=160, P=0, D=8, causal=False, padding="right"),  # encoder
    Case(B=2, Hq=2, Hkv=1, Sq=40, Sk=160, P=5, D=8, padding="left"),  # chunked prefill
], ids=str)
def test_no_score_sized_tensor(engine, case):
    """Forward and backward of the common masks never create a tensor (other than (.., S, D) activations)
    a quarter the size of one head's (Sq, Sk) scores per batch row: no score matrix and no (Sq, Sk) mask,
    in any dtype."""
    x = make_case(case)
    with _LargestOutput() as seen:
        out = prefixattn.prefix_attention(x.q, x.k, x.v, x.pk, x.pv, **x.op_kwargs(), backend="torch")
        torch.autograd.grad(out, x.grad_inputs, torch.randn_like(out))
    numel, shape, op = seen.largest
    if engine == "cpu_flash":
        assert numel < case.B * case.Sq * case.Sk / 4, (numel, shape, op)


@pytest.mark.parametrize("case", [Case(B=2, Hq=2, Hkv=1, Sq=160, Sk=160, P=5, D=8, window=9),
                                  Case(B=2, Hq=2, Hkv=1, Sq=160, Sk=160, P=5, D=8, docs=True, padding="right")],
                         ids=str)
def test_windows_and_documents_work_in_tiles(engine, monkeypatch, case):
    """Windows and packed documents: each tile of rows builds the mask of the keys its rows can see, so
    the largest tensor is bounded by the tile, and the result is still exact."""
    monkeypatch.setattr(torch_backend, "ROWS_PER_TILE", 32)
    x = make_case(case)
    with _LargestOutput() as seen:
        out = prefixattn.prefix_attention(x.q, x.k, x.v, x.pk, x.pv, **x.op_kwargs(), backend="torch")
        grads = torch.autograd.grad(out, x.grad_inputs, torch.ones_like(out))
    if engine == "cpu_flash":
        keys = 32 + case.window - 1 if case.window else case.Sk
        assert seen.largest[0] <= case.B * 32 * keys, seen.largest
    ref = concat_reference(x.q, x.k, x.v, x.pk, x.pv, **x.ref_kwargs())
    assert_close_rel(out, ref, 1e-5, "out")
    ref_grads = torch.autograd.grad(ref, x.grad_inputs, torch.ones_like(ref))
    for g, r in zip(grads, ref_grads, strict=True):
        assert_close_rel(g, r, 1e-5, "grad")


def test_private_op_checks(monkeypatch):
    """The fused CPU kernel is a private aten op: a missing op, another schema or a probe that disagrees
    each give the reason; a reason found at import disables the engine, and the other paths give the
    same results."""
    assert engines.find_cpu_flash_problem() is None  # as on the pinned torch; on another, this says what changed
    assert engines.cpu_flash_problem() is None
    q = torch.randn(1, 1, 1, 8)
    assert engines.engine_for(q, 0.0) is engines.CpuFlashEngine
    assert engines.engine_for(q, 2.0) is engines.ChunkedEngine  # no softcap in the kernel

    for name, value, reason in [
        ("_FWD_SCHEMA", engines._FWD_SCHEMA.replace("scale", "s"), "unexpected schema"),
        ("_BWD_SCHEMA", engines._BWD_SCHEMA.replace("grad_out", "g"), "unexpected schema"),
        ("_op", lambda name: None, "has no"),
        ("_probe", lambda fwd, bwd: "probe: forward differs", "probe: forward differs"),
        ("_probe", lambda fwd, bwd: 1 / 0, "probe call failed: ZeroDivisionError"),
    ]:
        with monkeypatch.context() as m:
            m.setattr(engines, name, value)
            assert reason in engines.find_cpu_flash_problem()
    monkeypatch.setattr(engines, "_CPU_FLASH_PROBLEM", "unexpected schema ...")
    assert engines.engine_for(q, 0.0) is engines.ChunkedEngine
    for case in (Case(Sq=9, Sk=9, padding="left"), Case(Sq=9, Sk=9, window=3, sinks=True)):
        x = make_case(case)
        out = prefixattn.prefix_attention(x.q, x.k, x.v, x.pk, x.pv, **x.op_kwargs(), backend="torch")
        assert_close_rel(out, concat_reference(x.q, x.k, x.v, x.pk, x.pv, **x.ref_kwargs()), 1e-5, "out")


def test_fully_masked_rows_are_zero_with_finite_gradients(engine):
    """P = 0 and a row whose keys are all padding: out 0 (not NaN), every gradient finite."""
    x = make_case(Case(Sq=9, Sk=9, P=0, padding="empty_row"))
    out = prefixattn.prefix_attention(x.q, x.k, x.v, x.pk, x.pv, **x.op_kwargs(), backend="torch")
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    grads = torch.autograd.grad(out, x.grad_inputs, torch.randn_like(out))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("case", [Case(Sq=9, Sk=9, padding="left", prefix="bank"),
                                  Case(Sq=9, Sk=9, D=16, Dv=8, docs=True, sinks=True, window=4)], ids=str)
def test_torch_compile_fullgraph(engine, case):
    """No graph breaks on any path: the engines run inside the torch.library ops (fake implementations
    give shapes), SDPA is traced as it is."""
    torch._dynamo.reset()
    x = make_case(case)
    kw = x.op_kwargs()
    docs, sinks = kw.pop("documents"), kw.pop("sinks")

    def step(q, k, v, pk, pv, sinks, docs):
        out = prefixattn.prefix_attention(q, k, v, pk, pv, **kw, sinks=sinks, documents=docs, backend="torch")
        return (out * out).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x.q, x.k, x.v, x.pk, x.pv, sinks, docs)
    grads = torch.autograd.grad(loss, x.grad_inputs)
    ref = concat_reference(x.q, x.k, x.v, x.pk, x.pv, **x.ref_kwargs())
    ref_loss = (ref * ref).sum()
    assert_close_rel(loss.detach(), ref_loss.detach(), 1e-5, "loss")
    for g, r in zip(grads, torch.autograd.grad(ref_loss, x.grad_inputs), strict=True):
        assert_close_rel(g, r, 1e-5, "grad")


def test_torch_compile_prefix_gradient_only(engine):
    """Only the prefix needs a gradient (layer 0 of a frozen model): the backward op returns empty
    tensors for the rest, each its own (custom op outputs may not alias)."""
    torch._dynamo.reset()
    x = make_case(Case(Sq=9, Sk=9, padding="left", sinks=True))
    q, k, v, sinks = (t.detach() for t in (x.q, x.k, x.v, x.sinks))

    def step(pk, pv):
        out = prefixattn.prefix_attention(q, k, v, pk, pv, key_padding_mask=x.mask, sinks=sinks, backend="torch")
        return (out * out).sum()

    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(x.pk, x.pv)
    grads = torch.autograd.grad(loss, (x.pk, x.pv))
    ref = concat_reference(q, k, v, x.pk, x.pv, key_padding_mask=x.mask, sinks=sinks)
    for g, r in zip(grads, torch.autograd.grad((ref * ref).sum(), (x.pk, x.pv)), strict=True):
        assert_close_rel(g, r, 1e-5, "grad")


@pytest.mark.parametrize("case", CASES + FEATURE_CASES + BIAS_CASES + TWO_SIDED_CASES, ids=str)
def test_reference_module_is_an_oracle(case):
    """prefixattn/reference.py (plain torch, materialized scores) agrees in float64 with the loop-built
    reference of tests/helpers.py, and the fast path agrees with it: two independent statements."""
    from prefixattn.reference import prefix_attention_torch

    x = make_case(case, dtype=torch.float64, requires_grad=False)
    kw = x.op_kwargs()
    docs = kw.pop("documents")
    ref = prefix_attention_torch(
        x.q, x.k, x.v, x.pk, x.pv, key_padding_mask=kw["key_padding_mask"], causal=case.causal,
        scale=case.D ** -0.5, prefix_index=x.idx, softcap=case.softcap, sliding_window=case.window or None,
        doc_start=None if docs is None else docs.start, doc_end=None if docs is None else docs.end,
        sinks=x.sinks, score_bias=x.bias,
    )
    assert_close_rel(ref, concat_reference(x.q, x.k, x.v, x.pk, x.pv, **x.ref_kwargs()), 1e-12, "reference")
    out = prefixattn.prefix_attention(x.q, x.k, x.v, x.pk, x.pv, **x.op_kwargs(), backend="torch")
    assert_close_rel(out, ref, 1e-10, "fast path")


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "autocast_bf16"])
def test_the_kept_probe_answer_does_not_depend_on_the_first_callers_mode(monkeypatch, mode):
    """The probe runs on the first use and its answer holds for the process: a first use under no_grad
    (an eval, generate), inference_mode or autocast must not disable the fused CPU kernel for good (it
    did: the probe's backward failed under no_grad, and every later training step took another engine)."""
    monkeypatch.setattr(engines, "_CPU_FLASH_PROBLEM", engines._NOT_PROBED)
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
               "autocast_bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}[mode]
    with context():
        found = engines.cpu_flash_problem()
    assert found is None, found
    assert engines.cpu_flash_problem() is None
