"""Input checks of ``prefix_attention``: every malformed call fails here, naming the problem, before
any kernel runs. Also the autocast cast (SDPA's rule) that comes before the dtype checks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..documents import Documents
from .backend import MAX_HEAD_DIM

BACKENDS = ("auto", "triton", "torch")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64, torch.int16, torch.uint8, torch.int8)


@dataclass(frozen=True)
class Checked:
    """What the checks derived: the scale to use and the sizes every backend needs."""

    scale: float
    dk: int
    dv: int


def autocast_inputs(tensors: tuple, device_type: str) -> tuple:
    """Under torch.autocast, cast the floating tensors to the autocast dtype (what SDPA does:
    transformers hands q/k in fp32 and v in bf16 under autocast). Outside autocast: unchanged."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype else t
        for t in tensors
    )


def _check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _same_device(name: str, t: torch.Tensor, q: torch.Tensor) -> None:
    if t.device != q.device:
        raise ValueError(f"q is on {q.device} but {name} is on {t.device}")


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None,
    *,
    key_padding_mask: torch.Tensor | None,
    prefix_index: torch.Tensor | None,
    causal: bool,
    scale: float | None,
    softcap: float,
    sliding_window: int | None,
    documents: Documents | None,
    sinks: torch.Tensor | None,
    check_index: bool,
    backend: str,
    score_bias: torch.Tensor | None = None,
) -> Checked:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, S, D), got shape {tuple(t.shape)}")
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(check_index, bool):
        raise TypeError(f"check_index must be a bool, got {type(check_index).__name__}")

    if q.dtype not in SUPPORTED_DTYPES and not (q.dtype == torch.float64 and backend == "torch"):
        raise TypeError(
            f"q has dtype {q.dtype}; supported: float16, bfloat16, float32 (float64 with backend='torch')"
        )
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"mixed dtypes: q is {q.dtype} but {name} is {t.dtype} (outside torch.autocast "
                            "every input must have q's dtype)")
        _same_device(name, t, q)

    B, Hq, Sq, Dk = q.shape
    Bk, Hkv, Sk, Dkk = k.shape
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"k and v must have the same shape (B, Hkv, Sk, .), got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    Dv = v.shape[3]
    if Bk != B:
        raise ValueError(f"batch mismatch: q has B={B} but k/v have B={Bk}")
    if Dkk != Dk:
        raise ValueError(f"head dim mismatch: q has Dk={Dk} but k has Dk={Dkk}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    for name, d in (("Dk", Dk), ("Dv", Dv)):
        if d < 1:
            raise ValueError(f"unsupported head dim {name}={d}")
        if d > MAX_HEAD_DIM and backend == "triton":
            raise ValueError(f"unsupported head dim {name}={d} for backend='triton': the fused kernels cover "
                             f"1..{MAX_HEAD_DIM} (backend='torch' runs any head dim; 'auto' picks it)")
    if Sq == 0:
        raise ValueError("q has no query positions (Sq = 0)")
    if causal and Sq > Sk:
        raise ValueError(
            f"causal attention needs Sq <= Sk (queries are the last Sq of the Sk keys), got Sq={Sq} > Sk={Sk}"
        )

    _check_prefix(q, prefix_k, prefix_v, prefix_index, B, Hkv, Dk, Dv, check_index)

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
        _same_device("key_padding_mask", key_padding_mask, q)

    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap):
        raise TypeError(f"softcap must be a finite float (0 disables it), got {softcap!r}")
    if softcap < 0:
        raise ValueError(f"softcap must be >= 0, got {softcap}")

    if sliding_window is not None:
        if isinstance(sliding_window, bool) or not isinstance(sliding_window, int):
            raise TypeError(f"sliding_window must be an int or None, got {type(sliding_window).__name__}")
        if sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 (j visible if j > a - W), got {sliding_window}")

    if documents is not None:
        if not isinstance(documents, Documents):
            raise TypeError(
                f"documents must be a prefixattn.Documents (Documents.from_position_ids / from_cu_seqlens), "
                f"got {type(documents).__name__}"
            )
        if Sq != Sk:
            raise ValueError(
                f"documents (packed rows) need Sq == Sk (no KV cache), got Sq={Sq} and Sk={Sk}"
            )
        if tuple(documents.shape) != (B, Sk):
            raise ValueError(
                f"documents must have shape (B, S) = ({B}, {Sk}), got {tuple(documents.shape)}"
            )
        _same_device("documents", documents.start, q)

    if sinks is not None:
        _check_tensor("sinks", sinks)
        if not sinks.is_floating_point():
            raise TypeError(f"sinks must be a floating tensor, got {sinks.dtype}")
        if sinks.shape != (Hq,):
            raise ValueError(f"sinks must have shape (Hq,) = ({Hq},), one logit per query head, "
                             f"got {tuple(sinks.shape)}")
        _same_device("sinks", sinks, q)

    if score_bias is not None:
        P = prefix_k.shape[-2] if prefix_k is not None else 0
        _check_score_bias(q, score_bias, B, Hq, Sq, P + Sk, backend)

    if scale is None:
        return Checked(1.0 / math.sqrt(Dk), Dk, Dv)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite positive number, got {scale}")
    return Checked(float(scale), Dk, Dv)


def _check_score_bias(q, bias, B, Hq, Sq, columns, backend) -> None:
    """(1|B, 1|Hq, Sq, P + Sk): a constant added to the scores; no gradient flows into it."""
    _check_tensor("score_bias", bias)
    if not bias.is_floating_point():
        raise TypeError(f"score_bias must be a floating tensor, got {bias.dtype}")
    if bias.dtype not in SUPPORTED_DTYPES and not (bias.dtype == torch.float64 and backend == "torch"):
        raise TypeError(f"score_bias has dtype {bias.dtype}; supported: float16, bfloat16, float32 "
                        "(float64 with backend='torch')")
    if (bias.dim() != 4 or bias.shape[0] not in (1, B) or bias.shape[1] not in (1, Hq)
            or tuple(bias.shape[2:]) != (Sq, columns)):
        raise ValueError(
            f"score_bias must have shape (1|B, 1|Hq, Sq, P + Sk) = (1|{B}, 1|{Hq}, {Sq}, {columns}): one "
            f"column per prefix slot, then one per sequence key; got {tuple(bias.shape)}"
        )
    _same_device("score_bias", bias, q)
    if bias.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "score_bias requires grad, but prefix_attention computes no gradient for it (a frozen "
            "model's position bias); pass score_bias.detach() if it is meant to stay fixed"
        )


def _check_prefix(q, prefix_k, prefix_v, prefix_index, B, Hkv, Dk, Dv, check_index) -> None:
    if (prefix_k is None) != (prefix_v is None):
        raise ValueError("pass both prefix_k and prefix_v, or neither")
    if prefix_k is None:
        if prefix_index is not None:
            raise ValueError("prefix_index given without a prefix bank")
        return
    for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        _check_tensor(name, t)
        if t.dtype != q.dtype:
            raise TypeError(f"mixed dtypes: q is {q.dtype} but {name} is {t.dtype} (outside torch.autocast "
                            "every input must have q's dtype)")
        _same_device(name, t, q)
    if prefix_k.shape[:-1] != prefix_v.shape[:-1] or prefix_k.dim() != prefix_v.dim():
        raise ValueError(
            f"prefix_k and prefix_v must have the same shape up to the head dim, got {tuple(prefix_k.shape)} "
            f"and {tuple(prefix_v.shape)}"
        )
    if prefix_k.dim() == 3:
        if prefix_index is not None:
            raise ValueError("prefix_index selects rows of a (N, Hkv, P, D) prefix bank; prefix_k is 3-D")
        ph = prefix_k.shape[0]
    elif prefix_k.dim() == 4:
        pn, ph = prefix_k.shape[:2]
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
    if prefix_k.shape[-1] != Dk:
        raise ValueError(f"prefix_k head dim {prefix_k.shape[-1]} does not match k's Dk={Dk}")
    if prefix_v.shape[-1] != Dv:
        raise ValueError(f"prefix_v head dim {prefix_v.shape[-1]} does not match v's Dv={Dv}")

    if prefix_index is not None:
        _check_tensor("prefix_index", prefix_index)
        if prefix_index.dtype not in _INDEX_DTYPES:
            raise TypeError(f"prefix_index must be an integer tensor, got {prefix_index.dtype}")
        if prefix_index.shape != (B,):
            raise ValueError(f"prefix_index must have shape (B,) = ({B},), got {tuple(prefix_index.shape)}")
        _same_device("prefix_index", prefix_index, q)
        if check_index and not torch.compiler.is_compiling() and B > 0:
            lo, hi = int(prefix_index.min()), int(prefix_index.max())
            if lo < 0 or hi >= prefix_k.shape[0]:
                raise ValueError(
                    f"prefix_index out of range: values span [{lo}, {hi}] but the bank has "
                    f"{prefix_k.shape[0]} entries"
                )
