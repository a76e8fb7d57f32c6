"""Host-side pieces shared by the forward and backward launchers, and the small @triton.jit tile helpers.

Layout inside every kernel ("packed GQA"): the Hq = Hkv * G query heads that share one KV head are
folded into the row axis. Row r of KV head hkv is query position i = r // G of query head
hkv * G + r % G, so one program loads each K/V tile once for the whole group (decode steps with
Sq = 1 still fill a block of rows), and dk/dv come out already summed over the group.

Offsets: every pointer offset that scales with B, H or S is computed in int64 (a row index times
a row stride wraps int32 at long sequences); only the offsets inside one tile stay int32.

Loops under the interpreter: a loop whose bound is a tensor is written twice, ``for ... in
range(lo, hi, step)`` compiled and a ``while`` loop when INTERPRET, with the body in one @triton.jit
helper that both call (the compiled code is the same for-loop as ever; the software pipeliner only
works on for-loops). Triton 3.6's interpreter holds every scalar as a 1-element array and turns a
range bound into a Python int with int(array), which NumPy 2 refuses ("only 0-dimensional arrays
can be converted to Python scalars"; triton 3.7+ squeezes first); a while condition only needs
bool(array), which NumPy allows for one element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import settings
from .device import CPU, device_facts
from .smem import dot_family, smem_bytes

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


def block_p(num_prefix: int, block_dk: int, block_dv: int) -> int:
    """Key block for the prefix: no wider than the prefix (P = 16 should not pay for 64 columns);
    64 slots, or 32 at head dims over 128 (a 64-slot prefix tile of D = 256 needs as much shared
    memory and registers as the rest of the kernel)."""
    widest = 64 if block_dk + block_dv <= 256 else 32
    return max(16, min(widest, triton.next_power_of_2(max(num_prefix, 1))))


def dot_precision(dtype: torch.dtype, device: torch.device | None = None) -> str:
    """How tl.dot multiplies. Half inputs: on the tensor cores (the setting does not apply). fp32
    inputs: as torch multiplies fp32 matrices on CUDA, on the TF32 tensor cores when torch allows it
    (``torch.backends.cuda.matmul.allow_tf32 = True``, or ``torch.set_float32_matmul_precision("high")``
    which sets it), else exact fp32 products ("ieee": FMA units, no tensor cores, several times slower;
    torch's default, and what matches a float64 reference to 1e-4).

    AMD (triton's hip backend) refuses "tf32" except on gfx942 (CDNA3's XF32), also for half inputs
    where it would change nothing: half inputs say "ieee" there (the same matrix-core products), and
    fp32 with TF32 allowed stays exact on the other AMD archs."""
    gfx = device_facts(device).gfx if device is not None else ""
    if dtype != torch.float32:
        return "ieee" if gfx else "tf32"
    if torch.backends.cuda.matmul.allow_tf32 and gfx in ("", "gfx942"):
        return "tf32"
    return "ieee"


def num_sms(device: torch.device) -> int:
    return device_facts(device).sms


def device_family(device: torch.device) -> str:
    """The device's dot family (kernels/smem.py dot_family): which pinned config tables it takes. The
    CPU (the interpreter) plans as an H100."""
    facts = device_facts(device)
    return dot_family(None if facts is CPU else facts)


def pinned_key(device: torch.device, has_bias: bool, softcap: bool) -> tuple[str, str]:
    """Which pinned tables a launch takes: (dot family, "bias" / "bias_softcap" / ""). A score bias puts
    a bias tile beside every score tile, in registers, and a softcap before it its derivative's: where a
    family's configs spill with them, those launches take their own tables."""
    return device_family(device), ("bias_softcap" if softcap else "bias") if has_bias else ""


def pinned_rows(tables: dict, default: dict, width: int, key: tuple[str, str], configs: list) -> list:
    """The pinned candidates for BLOCK_DK + BLOCK_DV = width: ``tables[(family, variant)]``, else
    ``tables[(family, "")]``, else sm_90's ``default``, else the autotune list ``configs``."""
    family, variant = key
    return ((tables.get((family, variant), {}).get(width) if variant else None)
            or tables.get((family, ""), {}).get(width) or default.get(width, configs))


def smem_limit(device: torch.device) -> int:
    """Shared memory one program may use on the device (smem_bytes counts every tile, so the
    whole opt-in limit is usable)."""
    return device_facts(device).smem_per_block


def bucket(n: int) -> int:
    """Autotune key bucket: the next power of two."""
    return triton.next_power_of_2(max(int(n), 1))


def prefix_strides(prefix: torch.Tensor) -> tuple[int, int, int, int]:
    """(row, head, slot, dim) strides; a shared (Hkv, P, D) prefix has row stride 0."""
    if prefix.dim() == 3:
        return (0, *prefix.stride())
    return tuple(prefix.stride())


def score_bias_arg(bias: torch.Tensor | None, B: int, Hq: int, Sq: int, like: torch.Tensor):
    """(tensor, (batch, head, row, column) strides) of a (1|B, 1|Hq, Sq, P + Sk) score bias, a broadcast
    dim read through stride 0; without a bias, a placeholder pointer and zero strides."""
    if bias is None:
        return like, (0, 0, 0, 0)
    full = bias.expand(B, Hq, Sq, bias.shape[-1])
    return full, tuple(full.stride())


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


INTERPRET_CONFIG = (16, 16, 4, 1)


def configs_from(table):
    """triton.Configs from (BLOCK_M, BLOCK_N, warps, stages) rows; one small config under the interpreter."""
    if interpreting():
        table = [INTERPRET_CONFIG]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in table]


def smem_fits(kernel: str, meta: dict, elsize: int, device: torch.device, bias_elsize: int = 0):
    """fits(bm, bn, warps, stages): whether a config of `kernel` with these constexprs fits the device
    (``bias_elsize``: the score bias's element size when it differs from the inputs')."""
    facts = device_facts(device)
    limit, precision = facts.smem_per_block, meta["DOT_PRECISION"]
    meta = {**meta, "BIAS_ELSIZE": bias_elsize or elsize}
    plan_as = None if facts is CPU else facts  # the interpreter plans as an H100 (dot_family's default)

    def fits(bm: int, bn: int, warps: int, stages: int) -> bool:
        need = smem_bytes(kernel, {**meta, "BLOCK_M": bm, "BLOCK_N": bn}, warps, stages, elsize, precision, plan_as)
        return need <= limit
    return fits


def smem_prune(kernel: str):
    """An ``early_config_prune`` for triton.autotune: drop the candidates that do not fit the device's
    shared memory before the autotuner compiles them (each would cost a compile and then fail to
    launch). Autotune off: the first candidate that fits."""
    def prune(configs, named_args, **kwargs):
        if interpreting():
            return configs
        q = named_args["Q"]
        meta = {**named_args, **kwargs}
        bias_elsize = named_args["BIAS"].element_size() if meta.get("HAS_BIAS") else 0
        fits = smem_fits(kernel, meta, q.element_size(), q.device, bias_elsize)
        keep = [c for c in configs if fits(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)]
        if not settings().autotune:
            keep = keep[:1]
        return keep or configs[-1:]
    return prune


def fixed_config(table, fits) -> dict:
    """One config without measuring: the first row of the table (preference order) that fits.
    Depends only on the table, the head dims, the dtype and the device, so two processes on the
    same kind of GPU launch the same config (deterministic gradients; no tuning on decode steps)."""
    if interpreting():
        table = [INTERPRET_CONFIG]
    row = next((r for r in table if fits(*r)), table[-1])
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
def packed_rows(start, G, R, BLOCK_M: tl.constexpr):
    """Packed rows [start, start + BLOCK_M) of one KV head: (offs_r, r_ok, i_row, g_row), row r being
    query position i = r // G of the group's head g = r % G."""
    offs_r = start + tl.arange(0, BLOCK_M)
    return offs_r, offs_r < R, offs_r // G, offs_r % G


@triton.jit
def group_ptr(ptr, b, hkv, G, stride_b, stride_h):
    """Pointer of batch row b, head hkv * G: the first query head of KV head hkv's group (int64)."""
    return ptr + as_i64(b) * stride_b + as_i64(hkv) * G * stride_h


@triton.jit
def row_ptrs(base, i_row, g_row, offs_d, stride_h, stride_m, stride_d):
    """Pointers of a (rows, D) tile of packed rows from their group's pointer (``group_ptr``); the
    row offsets in int64."""
    rows = g_row.to(tl.int64) * stride_h + i_row.to(tl.int64) * stride_m
    return base + rows[:, None] + offs_d[None, :] * stride_d


@triton.jit
def head_dim_range(BLOCK_D: tl.constexpr, D: tl.constexpr):
    offs = tl.arange(0, BLOCK_D)
    return offs, offs < D


@triton.jit
def score_bias_rows(BIAS, b, hkv, G, i_row, g_row, stride_bb, stride_bh, stride_bm):
    """Each packed row's pointer to column 0 of its score bias (batch row b, query head hkv * G + g,
    position i); int64 offsets."""
    base = BIAS + as_i64(b) * stride_bb + as_i64(hkv) * G * stride_bh
    return base + g_row.to(tl.int64) * stride_bh + i_row.to(tl.int64) * stride_bm


@triton.jit
def score_bias_tile(bias_rows, offs_n, stride_bn, r_ok, n_ok, TRANSPOSED: tl.constexpr):
    """The score bias of a (rows, keys) tile, or (keys, rows) when TRANSPOSED, in log2 units (fp32);
    offs_n are column indices from the rows' pointers. Rows or keys out of range read 0."""
    if TRANSPOSED:
        x = tl.load(bias_rows[None, :] + offs_n[:, None] * stride_bn, mask=n_ok[:, None] & r_ok[None, :], other=0.0)
    else:
        x = tl.load(bias_rows[:, None] + offs_n[None, :] * stride_bn, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
    return x.to(tl.float32) * 1.4426950408889634
