"""Kernel settings read once (KernelSettings), config choice without measuring (decode steps,
deterministic backward), the shared-memory budget, and the eager path that skips torch.library."""

from __future__ import annotations

import itertools

import torch
from helpers import Case, assert_close_rel, concat_reference, count_launches, make_case
from prefixattn.kernels import backward, common, forward
from prefixattn.kernels.common import DEFAULT_SMEM, fixed_config, smem_limit
from prefixattn.kernels.config import KernelSettings, settings, use_settings
from prefixattn.kernels.device import H100

import prefixattn
from prefixattn.ops import autograd


def test_settings_from_env():
    s = KernelSettings.from_env({"PREFIXATTN_AUTOTUNE": "0", "PREFIXATTN_POISON": "1", "PREFIXATTN_SPLITS": "3"})
    assert (s.autotune, s.poison, s.splits, s.interpret) == (False, True, 3, False)
    s = KernelSettings.from_env({"TRITON_INTERPRET": "1"})
    assert s.interpret and not s.autotune and not s.poison and s.splits == 0
    assert settings().poison, "tests/conftest.py sets PREFIXATTN_POISON=1 before the import"


def test_use_settings_restores():
    before = settings()
    with use_settings(splits=2, poison=False) as s:
        assert settings() is s and s.splits == 2 and not s.poison
    assert settings() == before


def test_shared_memory_budget_and_pinned_configs():
    assert smem_limit(torch.device("cpu")) == DEFAULT_SMEM
    # a CUDA device's budget is its opt-in limit per block (H100: 227 KiB): smem_bytes counts every tile
    with use_settings(device=H100):
        assert smem_limit(torch.device("cuda", 0)) == 227 * 1024
        assert common.num_sms(torch.device("cuda", 0)) == 132
    table = [(128, 64, 8, 3), (64, 64, 4, 2), (32, 32, 4, 1)]
    # with the interpreter off, the first row that fits wins; the choice depends only on its inputs
    with use_settings(interpret=False):
        small = fixed_config(table, lambda bm, bn, w, s: bm * bn * s <= 64 * 64 * 2)
        assert small == dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
        assert fixed_config(table, lambda *a: False)["BLOCK_M"] == 32  # nothing fits: the smallest


def test_decode_steps_use_a_fixed_config(monkeypatch):
    """Short row counts (decode) launch the plain kernel: no autotuning as the cache grows."""
    tuned = count_launches(monkeypatch, forward, "_fwd_kernel")
    plain = count_launches(monkeypatch, forward, "_fwd_kernel_jit")
    for sk in (20, 33, 65):
        x = make_case(Case(Sq=1, Sk=sk, Hq=8, Hkv=2), requires_grad=False)
        out = prefixattn.prefix_attention(x.q, x.k, x.v, x.pk, x.pv, backend="triton")
        assert_close_rel(out, concat_reference(x.q, x.k, x.v, x.pk, x.pv), 2e-3, "out")
    assert len(plain) == 3 and not tuned
    x = make_case(Case(Sq=40, Sk=40, Hq=4, Hkv=2), requires_grad=False)  # R = 80 rows
    prefixattn.prefix_attention(x.q, x.k, x.v, x.pk, x.pv, backend="triton")
    assert len(plain) == 4 and not tuned, "deterministic=True (default) pins the forward too"
    prefixattn.prefix_attention(x.q, x.k, x.v, x.pk, x.pv, backend="triton", deterministic=False)
    assert len(tuned) == 1


def test_deterministic_backward_pins_both_kernels(monkeypatch):
    tuned = [count_launches(monkeypatch, backward, n) for n in ("_dq_kernel", "_dkdv_kernel")]
    pinned = [count_launches(monkeypatch, backward, n) for n in ("_dq_kernel_jit", "_dkdv_kernel_jit")]
    x = make_case(Case(Sq=9, Sk=9))
    out = prefixattn.prefix_attention(x.q, x.k, x.v, x.pk, x.pv, backend="triton")
    torch.autograd.grad(out.sum(), x.grad_inputs)
    assert [len(p) for p in pinned] == [1, 1] and not any(tuned)


def test_eager_calls_skip_the_custom_op(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("eager call went through torch.library")

    monkeypatch.setattr(autograd, "_forward_op", boom)
    monkeypatch.setattr(autograd, "_backward_op", boom)
    x = make_case(Case(Sq=7, Sk=7))
    out = prefixattn.prefix_attention(x.q, x.k, x.v, x.pk, x.pv, backend="triton")
    torch.autograd.grad(out.sum(), x.grad_inputs)


def test_custom_op_fake_matches_the_kernel():
    """opcheck compares the fake implementation (shapes, strides: (B, Sq, Hq, Dv) memory) with the kernel."""
    x = make_case(Case(B=1, Hq=2, Hkv=1, Sq=5, Sk=5, P=2, D=16, Dv=8, sinks=True), requires_grad=False)
    args = (x.q, x.k, x.v, x.pk, x.pv, None, None, None, None, x.sinks, True, 0.25, 0.0, 0, True)
    torch.library.opcheck(autograd._forward_op, args, test_utils=("test_schema", "test_faketensor"))
    out, _ = autograd._forward_op(*args)
    assert out.shape == (1, 2, 5, 8) and out.transpose(1, 2).is_contiguous()
    bias = torch.randn(1, 2, 5, 7, device=x.q.device)  # a score bias over the P + Sk columns
    torch.library.opcheck(autograd._forward_op, (*args, bias), test_utils=("test_schema", "test_faketensor"))


def test_fp32_dot_precision_follows_torch():
    """fp32 dots on the TF32 tensor cores exactly when torch allows TF32 for CUDA matmuls."""
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        assert common.dot_precision(torch.float32) == "ieee"
        assert common.dot_precision(torch.bfloat16) == common.dot_precision(torch.float16) == "tf32"
        matmul.allow_tf32 = True
        assert common.dot_precision(torch.float32) == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.set_float32_matmul_precision("high")  # sets allow_tf32 too
        assert common.dot_precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision("highest")
        matmul.allow_tf32 = before


def test_each_gpu_takes_its_family_configs():
    """The launchers plan for the device they are told about: its dot family, its pinned tables (sm_90's
    where its family has none), dot precision AMD's hip backend accepts, the configs that fit its limit."""
    from prefixattn.kernels.device import KNOWN
    from prefixattn.kernels.smem import smem_bytes

    cuda = torch.device("cuda", 0)
    families = {}
    for name, facts in KNOWN.items():
        with use_settings(device=facts, interpret=False):
            families[name] = common.device_family(cuda)
            half, fp32 = common.dot_precision(torch.bfloat16, cuda), common.dot_precision(torch.float32, cuda)
            assert half == ("ieee" if facts.gfx else "tf32") and fp32 == "ieee", name  # allow_tf32 off
            for width, (bias, softcap) in itertools.product((128, 256), ((False, False), (True, False), (True, True))):
                key = common.pinned_key(cuda, bias, softcap)
                assert key == (families[name], ("bias_softcap" if softcap else "bias") if bias else "")
                meta = dict(BLOCK_DK=width // 2, BLOCK_DV=width // 2, BLOCK_P=64, DOT_PRECISION=half,
                            HAS_BIAS=bias, SOFTCAP=softcap)
                for kernel, table in (("fwd", forward.pinned_table(width, key)),
                                      *zip(("dq", "dkdv"), backward.pinned_tables(width, key), strict=True)):
                    fits = common.smem_fits(kernel, meta, 2, cuda)
                    cfg = fixed_config(table, fits)
                    row = (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"])
                    need = smem_bytes(kernel, {**meta, "BLOCK_M": row[0], "BLOCK_N": row[1]}, row[2], row[3], 2,
                                      half, facts)
                    assert fits(*row) and need <= facts.smem_per_block, (name, kernel, width, row)
                    if facts.gfx:
                        assert row[2] == 4, (name, kernel, row)  # wave64: 4 waves, 512 registers a lane
    assert families == {"a100": "mma", "l4": "mma", "h100": "wgmma", "h200": "wgmma", "b200": "tcgen05",
                        "rtx5090": "mma", "mi300x": "cdna3", "mi355x": "cdna4"}
    assert common.device_family(torch.device("cpu")) == "wgmma"  # the interpreter plans as an H100
    assert forward.pinned_table(256) == forward.pinned_table(256, ("tcgen05", "")) == forward.FWD_PINNED[256]
    # a variant without a table of its own takes its family's, then sm_90's
    assert forward.pinned_table(256, ("mma", "bias")) != forward.pinned_table(256, ("mma", ""))
    assert backward.pinned_tables(256, ("mma", "bias"))[1] == backward.pinned_tables(256, ("mma", ""))[1]
    assert backward.pinned_tables(512, ("wgmma", "bias_softcap")) == backward.pinned_tables(512)
