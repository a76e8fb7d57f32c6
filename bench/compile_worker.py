"""Compile one recorded launch for its device's target and read what the compiler says about it.

``compile_launch`` runs in a worker process: ``JITFunction.preload`` (triton's own path from a
recorded specialization to a compiled kernel, through triton's cache) under the fake driver, then

    shared      the compiler's shared memory (metadata.shared): what the launch needs, against the
                device's opt-in limit
    registers, spill stores/loads, stack frame, and "wgmma serialized" warnings: from ptxas -v
                (the log triton's own ptxas run writes when asked; on a triton cache hit, a second
                ptxas run over the cached PTX with the same flags)
    wgmma / mma.sync: counted in the PTX (Hopper's warpgroup tensor-core instruction, or Ampere's;
                Blackwell's tcgen05.mma counted as tcgen05)

AMD (triton's hip backend, an hsaco): shared is the LDS, and the AMDGPU metadata of the assembly
gives VGPRs (registers: the total with AGPRs), AGPRs, SGPRs, the private segment (scratch:
spill_stores, in bytes) and the VGPR/SGPR spill counts; v_mfma instructions are the matrix-core dots.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import subprocess
import tempfile
import time
from typing import Any

_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_SERIALIZED = re.compile(r"wgmma\.mma_async instructions are serialized due to ([^.\n]*)")


def parse_ptxas_log(log: str) -> dict[str, Any]:
    regs = _PTXAS_USED.findall(log)
    spill = _PTXAS_SPILL.findall(log)
    reasons = _SERIALIZED.findall(log)
    return {
        "registers": int(regs[-1]) if regs else None,
        "stack": int(spill[-1][0]) if spill else None,
        "spill_stores": int(spill[-1][1]) if spill else None,
        "spill_loads": int(spill[-1][2]) if spill else None,
        "wgmma_serialized": bool(reasons),
        "serialized_reason": sorted(set(r.strip() for r in reasons)),
    }


def count_mma(ptx: str) -> dict[str, int]:
    return {"wgmma": len(re.findall(r"\bwgmma\.mma_async\b", ptx)),
            "mma_sync": len(re.findall(r"\bmma\.sync\b", ptx)),
            "tcgen05": len(re.findall(r"\btcgen05\.mma\b", ptx)),
            "fma": len(re.findall(r"\bfma\.rn\.f32\b", ptx))}


def _amd_field(asm: str, name: str) -> int | None:
    # a kernel's entry opens with its first field: "  - .agpr_count:     35"
    found = re.findall(rf"^\s*(?:- )?\.{re.escape(name)}:\s+(\d+)", asm, re.M)
    return int(found[-1]) if found else None


def parse_amdgcn(asm: str) -> dict[str, Any]:
    """Registers, scratch and matrix-core dots from the AMDGPU assembly's kernel metadata."""
    scratch = _amd_field(asm, "private_segment_fixed_size")
    return {
        "registers": _amd_field(asm, "vgpr_count"),  # VGPRs + AGPRs: one 512-register file a lane on CDNA3/4
        "agprs": _amd_field(asm, "agpr_count"),  # of which AGPRs (the MFMA accumulators)
        "sgprs": _amd_field(asm, "sgpr_count"),
        "stack": scratch,
        "spill_stores": scratch,  # bytes of scratch per lane: what spilled registers (or a stack) use
        "spill_loads": _amd_field(asm, "vgpr_spill_count"),  # VGPRs spilled
        "sgpr_spills": _amd_field(asm, "sgpr_spill_count"),
        "lds_asm": _amd_field(asm, "group_segment_fixed_size"),
        "wgmma_serialized": False,
        "serialized_reason": [],
        "mfma": len(re.findall(r"^\s*v_mfma", asm, re.M)),
        "wgmma": 0, "mma_sync": 0, "tcgen05": 0,
        "fma": len(re.findall(r"^\s*v_(?:pk_)?fma_f32", asm, re.M)),
    }


def _triton_ptxas_flags() -> list[str]:
    """Register-allocation flags triton's own ptxas call adds (triton 3.9: --regAllocOptLevel=2, which
    changes the figures: a dk/dv launch on sm_120 spilled 36 B with it and 0 B without)."""
    import inspect

    from triton.backends.nvidia.compiler import CUDABackend

    flag = "--regAllocOptLevel=2"
    return [flag] if flag in inspect.getsource(CUDABackend.make_cubin) else []


def _ptxas_again(ptx: str, arch: int) -> str:
    """ptxas -v over cached PTX, with the flags triton's make_cubin uses by default."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = f"{tmp}/k.ptx"
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", "-v", *_triton_ptxas_flags(),
               f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", f"{tmp}/k.cubin"]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stderr


def compile_launch(kernel: str, specialization: str, arch=90) -> dict[str, Any]:
    """Compile (or load from triton's cache) one launch for `arch` (an sm number, or a (backend, arch,
    warp size) target); return the compiler's figures."""
    import triton

    from .compile_plan import gpu_target, use_fake_driver

    use_fake_driver(arch)
    target = gpu_target(arch)
    module, name = kernel.split(":")
    jit = getattr(importlib.import_module(module), name)
    triton.knobs.nvidia.dump_ptxas_log = True  # triton prints ptxas -v output when it runs ptxas
    buf = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        compiled = jit.preload(specialization)
    seconds = time.perf_counter() - t0
    md = compiled.metadata
    if target.backend == "hip":
        return {"shared": int(md.shared), "num_warps": int(md.num_warps), "num_stages": int(md.num_stages),
                "compile_s": round(seconds, 2), "hash": compiled.hash, **parse_amdgcn(compiled.asm["amdgcn"])}
    arch = target.arch
    log = buf.getvalue()
    ptx = compiled.asm["ptx"]
    if "Used" not in log:  # a cache hit: nothing ran ptxas in this process
        log = _ptxas_again(ptx, arch)
    return {"shared": int(md.shared), "num_warps": int(md.num_warps), "num_stages": int(md.num_stages),
            "compile_s": round(seconds, 2), "hash": compiled.hash, **parse_ptxas_log(log), **count_mma(ptx)}


__all__ = ["compile_launch", "parse_ptxas_log", "count_mma", "parse_amdgcn"]
