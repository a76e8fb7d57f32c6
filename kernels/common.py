"""Pieces shared by the forward and backward launchers.

Layout inside every kernel ("packed GQA"): the Hq = Hkv * G query heads that share one KV head are
folded into the row axis. Row r of KV head hkv is query position i = r // G of query head
hkv * G + r % G, so one program loads each K/V tile once for the whole group (decode steps with
Sq = 1 still fill a block of rows), and dk/dv come out already summed over the group.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_enabled() -> bool:
    return not interpreting() and os.environ.get("PREFIXATTN_AUTOTUNE", "1") != "0"


def poisoning() -> bool:
    """PREFIXATTN_POISON=1 fills every kernel output with NaN before launch (tests and debugging):
    an element the kernel forgot to write then shows up instead of hiding as stale memory."""
    return os.environ.get("PREFIXATTN_POISON", "0") == "1"


def alloc(shape, *, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    out = torch.empty(shape, device=like.device, dtype=dtype or like.dtype)
    if poisoning():
        out.fill_(float("nan"))
    return out


def block_d(head_dim: int) -> int:
    # tl.dot needs every dimension >= 16; the padded columns load as zeros and do not change
    # any dot product.
    return max(16, triton.next_power_of_2(head_dim))


def block_p(num_prefix: int, block_n: int) -> int:
    """Key block for the prefix: no wider than the prefix (P = 16 should not pay for 64 columns)."""
    return max(16, min(block_n, triton.next_power_of_2(max(num_prefix, 1))))


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get exact fp32 products (users ask for fp32 to match a reference to 1e-4);
    # half inputs ignore this and use the tensor cores.
    return "ieee" if dtype == torch.float32 else "tf32"


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def bucket(n: int) -> int:
    """Autotune key bucket: the next power of two, so decode steps (Sk grows by one) reuse a tuning."""
    return triton.next_power_of_2(max(int(n), 1))


def prefix_strides(prefix: torch.Tensor) -> tuple[int, int, int, int]:
    """(row, head, slot, dim) strides; a shared (Hkv, P, D) prefix has row stride 0."""
    if prefix.dim() == 3:
        return (0, *prefix.stride())
    return tuple(prefix.stride())


def dummy(t: torch.Tensor) -> torch.Tensor:
    """A valid pointer for an absent optional tensor (the kernel never reads it)."""
    return t


@triton.jit
def tanh(x):
    # tanh through exp2 (no libdevice, so it also runs under the interpreter); saturates cleanly
    # to +-1 for large |x|.
    e = tl.math.exp2(x * 2.8853900817779268)  # exp(2x)
    return 1.0 - 2.0 / (e + 1.0)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = [
    "LOG2E", "LN2", "interpreting", "autotune_enabled", "poisoning", "alloc", "block_d", "block_p",
    "dot_precision", "num_sms", "bucket", "prefix_strides", "dummy", "tanh", "ceil_div", "math",
    "load_tile", "store_tile", "smem_estimate", "pick", "configs_from", "SMEM_LIMIT",
]


@triton.jit
def load_tile(ptrs, row_ok, d_ok, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """Load a (rows, BLOCK_D) tile. Masks along D only when D is not the block width: a mask that
    varies along the contiguous axis stops the compiler from issuing 16-byte vector loads."""
    if MASK_ROWS:
        if EVEN_D:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    return x


@triton.jit
def store_tile(ptrs, x, row_ok, d_ok, EVEN_D: tl.constexpr):
    if EVEN_D:
        tl.store(ptrs, x, mask=row_ok[:, None])
    else:
        tl.store(ptrs, x, mask=row_ok[:, None] & d_ok[None, :])


SMEM_LIMIT = 160 * 1024  # bytes a config may plan for when autotuning is off (H100: 227 KiB per block)


def configs_from(table):
    """triton.Configs from (BLOCK_M, BLOCK_N, warps, stages) rows; one small config under the interpreter."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in table]


def smem_estimate(elsize: int, a_rows: int, b_rows: int, block_d: int, stages: int, resident: int) -> int:
    """Rough shared memory of a config: `resident` tiles of a_rows x D kept for the whole program
    plus two streamed b_rows x D tiles per pipeline stage. Used only to choose a safe default
    when autotuning is off (the autotuner itself skips configs that do not fit)."""
    return elsize * block_d * (resident * a_rows + 2 * stages * b_rows)


def pick(configs, fits):
    """Autotune off: the first config (in preference order) that fits; on: every config."""
    if autotune_enabled():
        return configs
    for c in configs:
        if fits(c):
            return [c]
    return configs[-1:]
