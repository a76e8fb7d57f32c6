"""The public op: the torch backend against the float64 reference (every feature: windows,
documents, sinks, Dk != Dv), gradcheck, backend choice, autocast, bad input (a clear error before
any kernel runs) and torch.compile without graph breaks."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    BIAS_CASES,
    CASES,
    DEVICE,
    FEATURE_CASES,
    TWO_SIDED_CASES,
    Case,
    assert_close_rel,
    concat_reference,
    make_case,
)

import prefixattn
from prefixattn.ops import resolve_backend


@pytest.mark.parametrize("case", CASES + FEATURE_CASES + BIAS_CASES + TWO_SIDED_CASES, ids=str)
def test_torch_backend_matches_reference(case):
    x = make_case(case)
    out = prefixattn.prefix_attention(x.q, x.k, x.v, x.pk, x.pv, **x.op_kwargs(), backend="torch")
    ref = concat_reference(x.q, x.k, x.v, x.pk, x.pv, **x.ref_kwargs())
    assert out.shape == (case.B, case.Hq, case.Sq, case.dv)
    assert_close_rel(out, ref, 1e-5, "out")
    do = torch.randn_like(out)
    for g, r in zip(torch.autograd.grad(out, x.grad_inputs, do, allow_unused=True),
                    torch.autograd.grad(ref, x.grad_inputs, do.double(), allow_unused=True), strict=True):
        if r is None or r.numel() == 0:
            continue
        assert_close_rel(g, r, 1e-5, "grad")


@pytest.mark.parametrize("case", [
    Case(B=2, Hq=4, Hkv=2, Sq=5, Sk=7, P=3, D=8, padding="left"),
    Case(B=2, Hq=2, Hkv=1, Sq=1, Sk=6, P=2, D=8, prefix="bank"),
    Case(B=1, Hq=2, Hkv=2, Sq=6, Sk=4, P=2, D=8, causal=False, softcap=2.0),
    Case(B=2, Hq=2, Hkv=1, Sq=9, Sk=9, P=2, D=4, Dv=6, window=3, sinks=True),
    Case(B=2, Hq=2, Hkv=2, Sq=8, Sk=8, P=1, D=4, docs=True, sinks=True, padding="right"),
    Case(B=2, Hq=4, Hkv=2, Sq=7, Sk=7, P=2, D=4, causal=False, window=2, bias="inf", padding="left"),
], ids=str)
def test_torch_backend_gradcheck(case):
    x = make_case(case, dtype=torch.float64)
    kwargs = x.op_kwargs()

    def f(*tensors):
        q, k, v, pk, pv = tensors[:5]
        if case.sinks:
            kwargs["sinks"] = tensors[5]
        return prefixattn.prefix_attention(q, k, v, pk, pv, **kwargs, backend="torch")

    assert torch.autograd.gradcheck(f, x.grad_inputs, fast_mode=True)


def test_auto_backend_choice(monkeypatch):
    q = torch.randn(1, 1, 1, 16)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("auto", q) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve_backend("auto", q) == "torch"
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        resolve_backend("triton", q)
    assert resolve_backend("torch", q) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("auto", q, head_dim=256) == "triton"
    assert resolve_backend("auto", q, head_dim=512) == "torch"  # beyond the kernels' tiles


def test_head_dims_beyond_the_kernels_run_the_torch_backend():
    """Gemma 4's global layers have head dim 512: 'auto' runs them in PyTorch, against float64."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 3, 320), torch.randn(1, 1, 3, 320), torch.randn(1, 1, 3, 288)
    pk, pv = torch.randn(1, 2, 320), torch.randn(1, 2, 288)
    out = prefixattn.prefix_attention(q, k, v, pk, pv)
    torch.testing.assert_close(out.double(), concat_reference(q, k, v, pk, pv), rtol=1e-5, atol=1e-5)


def _good():
    B, Hq, Hkv, S, P, D = 2, 4, 2, 5, 3, 16
    return dict(
        q=torch.randn(B, Hq, S, D), k=torch.randn(B, Hkv, S, D), v=torch.randn(B, Hkv, S, D),
        prefix_k=torch.randn(Hkv, P, D), prefix_v=torch.randn(Hkv, P, D),
    )


def _with(**changes):
    args = _good()
    args.update(changes)
    return args


BAD = [
    ("q rank", lambda: _with(q=torch.randn(2, 4, 16)), ValueError, "q must be 4-D"),
    ("k not a tensor", lambda: _with(k=[1, 2]), TypeError, "k must be a torch.Tensor"),
    ("batch", lambda: _with(k=torch.randn(3, 2, 5, 16), v=torch.randn(3, 2, 5, 16)), ValueError, "batch mismatch"),
    ("k/v shapes", lambda: _with(v=torch.randn(2, 2, 6, 16)), ValueError, "k and v must have the same shape"),
    ("head dim", lambda: _with(k=torch.randn(2, 2, 5, 8), v=torch.randn(2, 2, 5, 8)), ValueError, "head dim mismatch"),
    ("prefix_k vs k", lambda: _with(prefix_k=torch.randn(2, 3, 8)), ValueError, "prefix_k head dim 8 .* Dk=16"),
    ("prefix_v vs v", lambda: _with(v=torch.randn(2, 2, 5, 24), prefix_v=torch.randn(2, 3, 16)), ValueError,
     "prefix_v head dim 16 .* Dv=24"),
    ("groups", lambda: _with(q=torch.randn(2, 3, 5, 16)), ValueError, "multiple of key/value heads"),
    ("int dtype", lambda: _with(q=torch.ones(2, 4, 5, 16, dtype=torch.int32)), TypeError, "supported: float16"),
    ("mixed dtype", lambda: _with(k=torch.randn(2, 2, 5, 16, dtype=torch.float64),
                                  v=torch.randn(2, 2, 5, 16, dtype=torch.float64)), TypeError, "mixed dtypes"),
    ("prefix dtype", lambda: _with(prefix_k=torch.randn(2, 3, 16).half(), prefix_v=torch.randn(2, 3, 16).half()),
     TypeError, "mixed dtypes"),
    ("prefix heads", lambda: _with(prefix_k=torch.randn(3, 3, 16), prefix_v=torch.randn(3, 3, 16)),
     ValueError, "prefix has 3 heads"),
    ("prefix dim", lambda: _with(prefix_k=torch.randn(2, 3, 8), prefix_v=torch.randn(2, 3, 8)),
     ValueError, "prefix_k head dim"),
    ("prefix pair", lambda: _with(prefix_v=None), ValueError, "both prefix_k and prefix_v"),
    ("prefix shapes", lambda: _with(prefix_v=torch.randn(2, 4, 16)), ValueError, "same shape up to the head dim"),
    ("prefix rank", lambda: _with(prefix_k=torch.randn(3, 16), prefix_v=torch.randn(3, 16)), ValueError,
     "prefix_k must be"),
    ("per-row rows", lambda: _with(prefix_k=torch.randn(3, 2, 3, 16), prefix_v=torch.randn(3, 2, 3, 16)),
     ValueError, "per-row prefix"),
    ("causal Sq>Sk", lambda: _with(q=torch.randn(2, 4, 6, 16)), ValueError, "Sq <= Sk"),
    ("head dim too big", lambda: dict(q=torch.randn(1, 1, 2, 300), k=torch.randn(1, 1, 2, 300),
                                      v=torch.randn(1, 1, 2, 300), backend="triton"), ValueError,
     "unsupported head dim Dk=300 for backend='triton'"),
]


@pytest.mark.parametrize("name,make,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_clear_error(name, make, exc, msg):
    with pytest.raises(exc, match=msg):
        prefixattn.prefix_attention(**make())


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(key_padding_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "key_padding_mask must have shape"),
    (dict(key_padding_mask=torch.ones(2, 5)), TypeError, "key_padding_mask must be bool"),
    (dict(backend="cuda"), ValueError, "unknown backend"),
    (dict(scale=-1.0), ValueError, "scale must be a finite positive"),
    (dict(scale="big"), TypeError, "scale must be a float"),
    (dict(scale=float("nan")), ValueError, "scale must be a finite positive"),
    (dict(softcap=-2.0), ValueError, "softcap must be >= 0"),
    (dict(causal=1), TypeError, "causal must be a bool"),
    (dict(prefix_index=torch.tensor([0, 1])), ValueError, "prefix_index selects rows"),
    (dict(sliding_window=0), ValueError, "sliding_window must be >= 1"),
    (dict(sliding_window=-3), ValueError, "sliding_window must be >= 1"),
    (dict(sliding_window=2.5), TypeError, "sliding_window must be an int"),
    (dict(score_bias=torch.randn(2, 4, 5, 5)), ValueError, r"score_bias must have shape \(1\|B, 1\|Hq, Sq, P \+ Sk\)"),
    (dict(score_bias=torch.randn(3, 4, 5, 8)), ValueError, "score_bias must have shape"),
    (dict(score_bias=torch.randn(2, 2, 5, 8)), ValueError, "score_bias must have shape"),
    (dict(score_bias=torch.randn(4, 5, 8)), ValueError, "score_bias must have shape"),
    (dict(score_bias=torch.zeros(1, 4, 5, 8, dtype=torch.int32)), TypeError, "score_bias must be a floating"),
    (dict(score_bias=torch.randn(1, 4, 5, 8, requires_grad=True)), ValueError, "score_bias requires grad"),
    (dict(score_bias=torch.randn(1, 4, 5, 8, dtype=torch.float64)), TypeError, "score_bias has dtype"),
    (dict(score_bias=torch.randn(1, 4, 5, 8, device="meta")), ValueError, "score_bias is on meta"),
    (dict(documents=torch.zeros(2, 5, dtype=torch.int32)), TypeError, "prefixattn.Documents"),
    (dict(documents=prefixattn.Documents.from_position_ids(torch.zeros(3, 5, dtype=torch.long))), ValueError,
     r"documents must have shape \(B, S\) = \(2, 5\)"),
    (dict(sinks=torch.randn(2)), ValueError, r"sinks must have shape \(Hq,\) = \(4,\)"),
    (dict(sinks=torch.randn(4, 1)), ValueError, "sinks must have shape"),
    (dict(sinks=torch.ones(4, dtype=torch.int64)), TypeError, "sinks must be a floating tensor"),
    (dict(check_index=0), TypeError, "check_index must be a bool"),
], ids=lambda x: "-".join(x) if isinstance(x, dict) else str(x)[:30])
def test_bad_options_are_clear_errors(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        prefixattn.prefix_attention(**{**_good(), **kwargs})


def test_documents_need_sq_equal_sk():
    args = _with(k=torch.randn(2, 2, 7, 16), v=torch.randn(2, 2, 7, 16))
    docs = prefixattn.Documents.from_position_ids(torch.arange(7).repeat(2, 1))
    with pytest.raises(ValueError, match="documents .* need Sq == Sk"):
        prefixattn.prefix_attention(**args, documents=docs)


def test_check_index_false_skips_the_range_check(monkeypatch):
    """check_index=False must not read prefix_index on the host (the caller validated it)."""
    args = _good()
    args["prefix_k"] = torch.randn(4, 2, 3, 16)
    args["prefix_v"] = torch.randn(4, 2, 3, 16)
    index = torch.tensor([3, 0])
    reads = []
    real_int = torch.Tensor.__int__
    monkeypatch.setattr(torch.Tensor, "__int__", lambda t: reads.append(t) or real_int(t))
    out = prefixattn.prefix_attention(**args, prefix_index=index, check_index=False, backend="torch")
    assert not reads
    prefixattn.prefix_attention(**args, prefix_index=index, backend="torch")
    assert reads, "the default range check reads prefix_index on the host"
    ref = concat_reference(**args, prefix_index=index)
    assert_close_rel(out, ref, 1e-5, "out")


@pytest.mark.parametrize("kwargs", [
    dict(sliding_window=2),
    dict(documents=prefixattn.Documents.from_position_ids(torch.tensor([[0, 1, 0, 1, 2]] * 2))),
    dict(sinks=torch.randn(4)),
    dict(v=torch.randn(2, 2, 5, 8), prefix_v=torch.randn(2, 3, 8)),
    dict(score_bias=torch.randn(1, 4, 5, 8)),
    dict(sliding_window=2, causal=False),
], ids=["window", "documents", "sinks", "Dk!=Dv", "score_bias", "two-sided window"])
def test_every_feature_runs_on_the_kernels(kwargs, monkeypatch):
    """No feature falls back to torch: auto picks the kernels, and they agree with the torch backend."""
    import prefixattn.kernels as kernels

    calls = []
    real = kernels.attention_forward
    monkeypatch.setattr(kernels, "attention_forward", lambda *a: calls.append(a) or real(*a))
    args = {name: (t.to(DEVICE) if isinstance(t, torch.Tensor) else t) for name, t in {**_good(), **kwargs}.items()}
    if "documents" in args:
        docs = args["documents"]
        args["documents"] = prefixattn.Documents(docs.start.to(DEVICE), docs.end.to(DEVICE))
    out = prefixattn.prefix_attention(**args, backend="auto")
    assert calls, "backend='auto' did not run the kernels"
    ref = prefixattn.prefix_attention(**args, backend="torch")
    assert_close_rel(out, ref, 2e-3, "out")


def test_score_bias_that_requires_grad_is_fine_without_autograd():
    """Only a bias whose gradient autograd would need is refused: under no_grad (generate) it runs."""
    args = _good()
    bias = torch.randn(1, 4, 5, 8, requires_grad=True)
    with torch.no_grad():
        out = prefixattn.prefix_attention(**args, score_bias=bias, backend="torch")
    assert_close_rel(out, concat_reference(**args, score_bias=bias.detach()), 1e-5, "out")


def test_a_wide_two_sided_window_changes_nothing_only_when_it_covers_every_pair():
    """W >= Sk and W >= Sq covers every (query, key) pair; W >= Sk alone does not when Sq > Sk (the
    first queries sit before key 0 and see only the prefix)."""
    args = _with(q=torch.randn(2, 4, 12, 16))
    plain = prefixattn.prefix_attention(**args, causal=False, backend="torch")
    wide = prefixattn.prefix_attention(**args, causal=False, sliding_window=12, backend="torch")
    assert torch.equal(wide, plain)
    narrow = prefixattn.prefix_attention(**args, causal=False, sliding_window=6, backend="torch")
    assert_close_rel(narrow, concat_reference(**args, causal=False, sliding_window=6), 1e-5, "W=Sk+1 < Sq")
    assert not torch.allclose(narrow, plain)


def test_autocast_computes_in_the_autocast_dtype():
    """transformers under autocast hands q/k in fp32 and v in bf16: compute in bf16, like SDPA."""
    c = Case(Sq=7, Sk=7, D=16)
    x = make_case(c, requires_grad=False)
    v16 = x.v.bfloat16()
    with pytest.raises(TypeError, match="mixed dtypes"):
        prefixattn.prefix_attention(x.q, x.k, v16, x.pk, x.pv, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = prefixattn.prefix_attention(x.q, x.k, v16, x.pk, x.pv, backend="torch")
    assert out.dtype == torch.bfloat16
    cast = [t.bfloat16() for t in (x.q, x.k, x.v, x.pk, x.pv)]
    expected = prefixattn.prefix_attention(*cast, backend="torch")
    assert torch.equal(out, expected)
    assert_close_rel(out, concat_reference(*cast), 1e-2, "out")


def test_autocast_gradients_reach_fp32_leaves():
    c = Case(Sq=6, Sk=6, sinks=True)
    x = make_case(c)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = prefixattn.prefix_attention(x.q, x.k, x.v, x.pk, x.pv, sinks=x.sinks, backend="torch")
    grads = torch.autograd.grad(out.float().sum(), x.grad_inputs)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("index,exc,msg", [
    (torch.tensor([0, 4]), ValueError, "out of range"),
    (torch.tensor([-1, 0]), ValueError, "out of range"),
    (torch.tensor([0.0, 1.0]), TypeError, "integer tensor"),
    (torch.tensor([0, 1, 2]), ValueError, "shape"),
])
def test_bad_prefix_index(index, exc, msg):
    args = _good()
    args["prefix_k"] = torch.randn(4, 2, 3, 16)
    args["prefix_v"] = torch.randn(4, 2, 3, 16)
    with pytest.raises(exc, match=msg):
        prefixattn.prefix_attention(**args, prefix_index=index)


def test_bad_input_fails_before_any_kernel(monkeypatch):
    import prefixattn.kernels as kernels

    def boom(*a, **k):
        raise AssertionError("a kernel was launched")

    monkeypatch.setattr(kernels, "attention_forward", boom)
    with pytest.raises(ValueError):
        prefixattn.prefix_attention(**_with(q=torch.randn(2, 3, 5, 16)), backend="triton")


@pytest.mark.parametrize("backend,case", [
    ("triton", Case(Sq=9, Sk=9, padding="left")),
    ("torch", Case(Sq=9, Sk=9, padding="left")),
    ("triton", Case(Sq=9, Sk=9, D=16, Dv=8, docs=True, sinks=True, window=4)),
    ("triton", Case(Sq=9, Sk=9, causal=False, window=3, bias="batch", padding="left")),
], ids=lambda x: str(x))
def test_torch_compile_fullgraph(backend, case):
    """No graph breaks: the kernels are custom ops with fake implementations (Documents as an input)."""
    torch._dynamo.reset()
    x = make_case(case)
    kw = x.op_kwargs()
    docs = kw.pop("documents")
    kw.pop("sinks")

    def step(q, k, v, pk, pv, sinks, docs):
        out = prefixattn.prefix_attention(q, k, v, pk, pv, **kw, sinks=sinks, documents=docs, backend=backend)
        return (out * out).sum()

    inputs = x.grad_inputs if case.sinks else (*x.grad_inputs, None)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(*inputs, docs)
    grads = torch.autograd.grad(loss, x.grad_inputs)
    ref = step(*inputs, docs)
    ref_grads = torch.autograd.grad(ref, x.grad_inputs)
    assert_close_rel(loss.detach(), ref.detach(), 1e-5, "loss")
    for g, r in zip(grads, ref_grads, strict=True):
        assert_close_rel(g, r, 1e-5, "grad")


def test_attention_weights_carry_the_bias_and_the_two_sided_window():
    """output_attentions' weights over [prefix; sequence] times [prefix_v; v] give the reference output."""
    from prefixattn.weights import attention_weights

    x = make_case(Case(Sq=11, Sk=11, causal=False, window=3, bias="inf", padding="left"), dtype=torch.float64,
                  requires_grad=False)
    w = attention_weights(x.q, x.k, x.pk, scale=x.case.D ** -0.5, causal=False, key_padding_mask=x.mask,
                          sliding_window=3, score_bias=x.bias)
    G = x.case.Hq // x.case.Hkv
    values = torch.cat([x.pv.unsqueeze(0).expand(x.case.B, -1, -1, -1), x.v], 2).repeat_interleave(G, 1)
    assert_close_rel(w @ values, concat_reference(x.q, x.k, x.v, x.pk, x.pv, **x.ref_kwargs()), 1e-12, "out")
