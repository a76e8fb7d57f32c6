"""Host-side pieces shared by the forward and backward launchers, and the small @triton.jit tile helpers.

Layout inside every kernel ("packed GQA"): the Hq = Hkv * G query heads that share one KV head are
folded into the row axis. Row r of KV head hkv is query position i = r // G of query head
hkv * G + r % G, so one program loads each K/V tile once for the whole group (decode steps with
Sq = 1 still fill a block of rows), and dk/dv come out already summed over the group.

Offsets: every pointer offset that scales with B, H or S is computed in int64 (a row index times
a row stride wraps int32 at long sequences); only the offsets inside one tile stay int32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import settings
from .device import CPU, device_facts

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
DEFAULT_SMEM = CPU.smem_per_block  # bytes a config may plan for when the device cannot say (CPU, interpreter)


def interpreting() -> bool:
    return settings().interpret


def alloc(shape, *, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """torch.empty, filled with NaN when poisoning (an element a kernel forgot to write then shows)."""
    out = torch.empty(shape, device=like.device, dtype=dtype or like.dtype)
    if settings().poison:
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
    return device_facts(device).sms


# smem_estimate is rough (the compiler adds its own buffers and layout conversions), so a config
# plans for this share of the device's limit: 0.7 x 227 KiB on an H100 is the ~160 KiB the
# kernels' tables were tuned with, and smaller devices scale down instead of failing to launch.
SMEM_SHARE = 0.7


def smem_limit(device: torch.device) -> int:
    """Shared memory a config may plan for: a share of the device's opt-in limit per block."""
    facts = device_facts(device)
    return facts.smem_per_block if facts is CPU else int(facts.smem_per_block * SMEM_SHARE)


def bucket(n: int) -> int:
    """Autotune key bucket: the next power of two."""
    return triton.next_power_of_2(max(int(n), 1))


def prefix_strides(prefix: torch.Tensor) -> tuple[int, int, int, int]:
    """(row, head, slot, dim) strides; a shared (Hkv, P, D) prefix has row stride 0."""
    if prefix.dim() == 3:
        return (0, *prefix.stride())
    return tuple(prefix.stride())


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def smem_estimate(elsize: int, a_rows: int, b_rows: int, width: int, stages: int, resident: int) -> int:
    """Rough shared memory of a config: `resident` tiles of a_rows x width kept for the whole
    program plus two streamed b_rows x width tiles per pipeline stage."""
    return elsize * width * (resident * a_rows + 2 * stages * b_rows)


def launch_smem_estimate(kernel: str, meta: dict, num_stages: int, elsize: int) -> int:
    """The estimate the launchers plan a launch of `kernel` (fwd, dq, dkdv) with: BLOCK_* from meta."""
    width = (meta["BLOCK_DK"] + meta["BLOCK_DV"]) // 2
    bm, bn = meta["BLOCK_M"], meta["BLOCK_N"]
    if kernel == "fwd":
        return smem_estimate(elsize, bm, bn, width, num_stages, 1)
    if kernel == "dq":
        return smem_estimate(elsize, bm, bn, width, num_stages, 2)
    return smem_estimate(elsize, bn, bm, width, num_stages, 2)


INTERPRET_CONFIG = (16, 16, 4, 1)


def configs_from(table):
    """triton.Configs from (BLOCK_M, BLOCK_N, warps, stages) rows; one small config under the interpreter."""
    if interpreting():
        table = [INTERPRET_CONFIG]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in table]


def pick(configs, fits):
    """Autotune on: every config (the autotuner measures); off: the first (in preference order) that fits."""
    if settings().autotune:
        return configs
    for c in configs:
        if fits(c):
            return [c]
    return configs[-1:]


def fixed_config(table, fits) -> dict:
    """One config without measuring: the first row of the table (preference order) that fits.
    Depends only on the table, the head dims, the dtype and the device, so two processes on the
    same kind of GPU launch the same config (deterministic gradients; no tuning on decode steps)."""
    if interpreting():
        table = [INTERPRET_CONFIG]
    row = next((r for r in table if fits(r[0], r[1], r[3])), table[-1])
    return dict(BLOCK_M=row[0], BLOCK_N=row[1], num_warps=row[2], num_stages=row[3])


@triton.jit
def tanh(x):
    # tanh through exp2 (no libdevice, so it also runs under the interpreter); saturates cleanly
    # to +-1 for large |x|.
    e = tl.math.exp2(x * 2.8853900817779268)  # exp(2x)
    return 1.0 - 2.0 / (e + 1.0)


@triton.jit
def as_i64(x):
    """x as an int64 scalar/tensor (also when x is a plain Python int under the interpreter)."""
    return x + tl.zeros([], dtype=tl.int64)


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


@triton.jit
def packed_row_offsets(b, hkv, G, offs_r, stride_b, stride_h, stride_m):
    """int64 offsets of packed rows r (head hkv*G + r % G, position r // G) of batch row b."""
    i_row = offs_r // G
    g_row = offs_r % G
    return (as_i64(b) * stride_b + (as_i64(hkv) * G + g_row) * stride_h + i_row.to(tl.int64) * stride_m)
