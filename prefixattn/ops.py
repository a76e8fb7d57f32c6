"""``prefix_attention``: the one functional entry point, its input checks, and its autograd.

The math (DESIGN.md; what every backend computes), for query i of row b, head h, KV head
h // (Hq / Hkv), with K = [prefix_k; k] and V = [prefix_v; v] along the key axis:

    s_j   = scale * q_i . K_j                       (softcap: s_j = c * tanh(s_j / c))
    mask  = prefix slot      -> always visible
            sequence key j   -> visible when (not causal or j <= i + Sk - Sq) and key_padding_mask[b, j]
    out_i = sum_j softmax_j(s + mask) V_j

The Triton path runs this as one online softmax over the prefix blocks then the sequence blocks,
reading the prefix in place (shared by the batch, per row, or selected from a bank by
``prefix_index``) with nothing concatenated or expanded. The autograd Function saves q, k, v, out
and the fp32 row logsumexp, and its backward computes only the gradients autograd asks for.
"""

from __future__ import annotations

import math
import os
from typing import Literal

import torch

from .reference import prefix_attention_torch

Backend = Literal["auto", "triton", "torch"]
BACKENDS = ("auto", "triton", "torch")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Input checks: every malformed call fails here, naming the problem, before any kernel runs.
# --------------------------------------------------------------------------------------------


def _check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    prefix_index: torch.Tensor | None,
    causal: bool,
    scale: float | None,
    softcap: float,
    backend: str,
) -> float:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, S, D), got shape {tuple(t.shape)}")
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")

    if q.dtype not in SUPPORTED_DTYPES and not (q.dtype == torch.float64 and backend == "torch"):
        raise TypeError(
            f"q has dtype {q.dtype}; supported: float16, bfloat16, float32 (float64 with backend='torch')"
        )
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"mixed dtypes: q is {q.dtype} but {name} is {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"q is on {q.device} but {name} is on {t.device}")

    B, Hq, Sq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    Bk, Hkv, Sk, Dk = k.shape
    if Bk != B:
        raise ValueError(f"batch mismatch: q has B={B} but k/v have B={Bk}")
    if Dk != D:
        raise ValueError(f"head dim mismatch: q has D={D} but k/v have D={Dk}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"unsupported head dim D={D}: supported 1..{MAX_HEAD_DIM}")
    if Sq == 0:
        raise ValueError("q has no query positions (Sq = 0)")
    if causal and Sq > Sk:
        raise ValueError(
            f"causal attention needs Sq <= Sk (queries are the last Sq of the Sk keys), got Sq={Sq} > Sk={Sk}"
        )

    if (prefix_k is None) != (prefix_v is None):
        raise ValueError("pass both prefix_k and prefix_v, or neither")
    if prefix_k is not None:
        for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
            _check_tensor(name, t)
            if t.dtype != q.dtype:
                raise TypeError(f"mixed dtypes: q is {q.dtype} but {name} is {t.dtype}")
            if t.device != q.device:
                raise ValueError(f"q is on {q.device} but {name} is on {t.device}")
        if prefix_k.shape != prefix_v.shape:
            raise ValueError(
                f"prefix_k and prefix_v must have the same shape, got {tuple(prefix_k.shape)} "
                f"and {tuple(prefix_v.shape)}"
            )
        if prefix_k.dim() == 3:
            if prefix_index is not None:
                raise ValueError("prefix_index selects rows of a (N, Hkv, P, D) prefix bank; prefix_k is 3-D")
            ph, _, pd = prefix_k.shape
        elif prefix_k.dim() == 4:
            pn, ph, _, pd = prefix_k.shape
            if prefix_index is None and pn != B:
                raise ValueError(
                    f"a per-row prefix (B, Hkv, P, D) must have B={B} rows, got {pn}; "
                    "for a bank of prefixes pass prefix_index"
                )
            if prefix_index is not None and pn == 0:
                raise ValueError("the prefix bank is empty (N = 0)")
        else:
            raise ValueError(
                "prefix_k must be (Hkv, P, D) shared, (B, Hkv, P, D) per row, or (N, Hkv, P, D) with "
                f"prefix_index; got shape {tuple(prefix_k.shape)}"
            )
        if ph != Hkv:
            raise ValueError(f"prefix has {ph} heads but k/v have Hkv={Hkv}")
        if pd != D:
            raise ValueError(f"prefix head dim {pd} does not match D={D}")
    elif prefix_index is not None:
        raise ValueError("prefix_index given without a prefix bank")

    if prefix_index is not None:
        _check_tensor("prefix_index", prefix_index)
        if prefix_index.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8, torch.int8):
            raise TypeError(f"prefix_index must be an integer tensor, got {prefix_index.dtype}")
        if prefix_index.shape != (B,):
            raise ValueError(f"prefix_index must have shape (B,) = ({B},), got {tuple(prefix_index.shape)}")
        if prefix_index.device != q.device:
            raise ValueError(f"q is on {q.device} but prefix_index is on {prefix_index.device}")
        if not torch.compiler.is_compiling() and B > 0:
            lo, hi = int(prefix_index.min()), int(prefix_index.max())
            if lo < 0 or hi >= prefix_k.shape[0]:
                raise ValueError(
                    f"prefix_index out of range: values span [{lo}, {hi}] but the bank has "
                    f"{prefix_k.shape[0]} entries"
                )

    if key_padding_mask is not None:
        _check_tensor("key_padding_mask", key_padding_mask)
        if key_padding_mask.shape != (B, Sk):
            raise ValueError(
                f"key_padding_mask must have shape (B, Sk) = ({B}, {Sk}), got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.dtype.is_floating_point or key_padding_mask.dtype.is_complex:
            raise TypeError(
                f"key_padding_mask must be bool (True = real token), got {key_padding_mask.dtype}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"q is on {q.device} but key_padding_mask is on {key_padding_mask.device}")

    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap):
        raise TypeError(f"softcap must be a finite float (0 disables it), got {softcap!r}")
    if softcap < 0:
        raise ValueError(f"softcap must be >= 0, got {softcap}")

    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite positive number, got {scale}")
    return float(scale)


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    if backend == "torch":
        return "torch"
    usable = triton_available() and (q.is_cuda or (q.device.type == "cpu" and triton_interpreting()))
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package, which failed to import")
        if not usable:
            raise ValueError(
                f"backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1); "
                f"got tensors on {q.device}"
            )
        return "triton"
    return "triton" if usable else "torch"


# --------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile (fake implementations give shapes), so the kernels run
# inside compiled graphs without graph breaks.
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("prefixattn::forward", mutates_args=(), device_types=("cpu", "cuda"))
def _forward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    prefix_index: torch.Tensor | None,
    causal: bool,
    scale: float,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    from .kernels import attention_forward

    return attention_forward(
        q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, causal, scale, softcap
    )


@_forward_op.register_fake
def _(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, causal, scale, softcap):
    B, Hq, Sq, D = q.shape
    out = q.new_empty((B, Hq, Sq, D))
    lse = q.new_empty((B, Hq, Sq), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("prefixattn::backward", mutates_args=(), device_types=("cpu", "cuda"))
def _backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    prefix_index: torch.Tensor | None,
    causal: bool,
    scale: float,
    softcap: float,
    need_dq: bool,
    need_dkv: bool,
    need_dprefix: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from .kernels import attention_backward

    return attention_backward(
        grad_out, q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_index,
        causal, scale, softcap, need_dq, need_dkv, need_dprefix, deterministic,
    )


@_backward_op.register_fake
def _(grad_out, q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_index,
      causal, scale, softcap, need_dq, need_dkv, need_dprefix, deterministic):
    need_dprefix = need_dprefix and prefix_k.shape[-2] > 0
    dq = torch.empty_like(q) if need_dq else q.new_empty((0,))
    dk = torch.empty_like(k) if need_dkv else q.new_empty((0,))
    dv = torch.empty_like(v) if need_dkv else q.new_empty((0,))
    dpk = torch.empty_like(prefix_k) if need_dprefix else q.new_empty((0,))
    dpv = torch.empty_like(prefix_v) if need_dprefix else q.new_empty((0,))
    return dq, dk, dv, dpk, dpv


class PrefixAttentionFunction(torch.autograd.Function):
    """Fused prefix attention. Saves q, k, v, out, lse and references to the prefix tensors."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, causal, scale,
                softcap, deterministic):
        out, lse = _forward_op(
            q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, causal, scale, softcap
        )
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_index)
        ctx.causal, ctx.scale, ctx.softcap, ctx.deterministic = causal, scale, softcap, deterministic
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_index = ctx.saved_tensors
        need_q, need_k, need_v, need_pk, need_pv = ctx.needs_input_grad[:5]
        need_dkv = need_k or need_v
        need_dprefix = (need_pk or need_pv) and prefix_k.shape[-2] > 0
        if not (need_q or need_dkv or need_dprefix):
            return (None,) * 11
        dq, dk, dv, dpk, dpv = _backward_op(
            grad_out, q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_index,
            ctx.causal, ctx.scale, ctx.softcap, need_q, need_dkv, need_dprefix, ctx.deterministic,
        )
        if need_pk or need_pv:
            if not need_dprefix:  # P == 0: the gradient of an empty prefix is empty
                dpk, dpv = torch.zeros_like(prefix_k), torch.zeros_like(prefix_v)
        return (
            dq if need_q else None,
            dk if need_k else None,
            dv if need_v else None,
            dpk if need_pk else None,
            dpv if need_pv else None,
            None, None, None, None, None, None,
        )


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    *,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    prefix_index: torch.Tensor | None = None,
    softcap: float = 0.0,
    backend: Backend = "auto",
    deterministic: bool = True,
) -> torch.Tensor:
    """Attention over a learned prefix followed by the sequence, without concatenating them.

    Layout (the one Hugging Face passes to attention functions)::

        q                    (B, Hq, Sq, D)     after RoPE
        k, v                 (B, Hkv, Sk, D)    sequence / KV-cache keys and values, Sk >= Sq if causal
        prefix_k, prefix_v   (Hkv, P, D)        shared by the batch, or
                             (B, Hkv, P, D)     one prefix per row, or
                             (N, Hkv, P, D)     a bank, with prefix_index (B,) picking each row's entry
        key_padding_mask     (B, Sk) bool       True = real token; left or right padding
        returns              (B, Hq, Sq, D)     in q's dtype

    Query i of row b, head h attends to every prefix slot of KV head h // (Hq // Hkv), and to
    sequence key j when ``j <= i + (Sk - Sq)`` (causal aligned to the bottom right, so decode steps
    and chunked prefill work) and key j is not padding. ``causal=False`` drops the causal
    condition. Prefix keys are never rotated. ``scale`` defaults to D**-0.5. ``softcap > 0``
    applies ``c * tanh(s / c)`` to the scores (Gemma 2). With P = 0 a row that sees no key
    returns 0.

    backend: "triton" (the fused kernels; CPU tensors only under TRITON_INTERPRET=1), "torch"
    (pure PyTorch, same semantics), "auto" (triton on CUDA or when interpreting, else torch).
    deterministic: True (default): two backward passes are bitwise equal (dq from its own
    kernel, the prefix gradient a fixed-order reduction of fp32 partials). False: the triton
    backend adds dq and the prefix gradient with fp32 atomics, saving the dq kernel's two
    recomputed matmuls per tile pair; the rounding then varies from run to run.
    """
    scale = _check_inputs(
        q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, causal, scale, softcap, backend
    )
    if prefix_k is None:
        Hkv, D = k.shape[1], k.shape[3]
        prefix_k = q.new_zeros((Hkv, 0, D))
        prefix_v = q.new_zeros((Hkv, 0, D))
    if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
        key_padding_mask = key_padding_mask.bool()

    if resolve_backend(backend, q) == "torch":
        return prefix_attention_torch(
            q, k, v, prefix_k, prefix_v, key_padding_mask=key_padding_mask, causal=causal,
            scale=scale, prefix_index=prefix_index, softcap=float(softcap),
        )
    out, _ = PrefixAttentionFunction.apply(
        q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, causal, scale,
        float(softcap), bool(deterministic),
    )
    return out
