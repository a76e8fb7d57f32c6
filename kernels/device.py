"""What the launchers need to know about the GPU they launch on, asked once per device.

    sms             multiprocessors: how many programs fill the GPU (split-K decode, prefix-gradient splits)
    smem_per_block  shared memory one program may use (the opt-in limit; the compiler's figure for a
                    config must not exceed it, or the launch fails with OutOfResources)

``KernelSettings.device`` (kernels/config.py) overrides the answer: ``python -m bench compile`` plans
an H100's launches on a machine without a GPU that way. Without a GPU and without an override the
launchers plan with ``CPU`` (the interpreter, where the numbers only bound the tile sizes).
"""

from __future__ import annotations

import functools

import torch

from .config import DeviceFacts, settings

# Hopper (sm_90): 228 KiB of shared memory per SM, of which one block may opt in to 227 KiB.
H100 = DeviceFacts("NVIDIA H100 80GB HBM3", sms=132, smem_per_block=232448, capability=(9, 0))
H200 = DeviceFacts("NVIDIA H200", sms=132, smem_per_block=232448, capability=(9, 0))
# The other GPUs users train on (opt-in shared memory per block from the CUDA programming guide's
# table per compute capability; LDS per workgroup on AMD Instinct). ``python -m bench compile
# --device NAME`` plans and compiles their launches on a CPU; none of them has run these kernels here.
A100 = DeviceFacts("NVIDIA A100-SXM4-80GB", sms=108, smem_per_block=166912, capability=(8, 0))
L4 = DeviceFacts("NVIDIA L4", sms=58, smem_per_block=101376, capability=(8, 9))  # RTX 4090, L40S: same arch and limit
B200 = DeviceFacts("NVIDIA B200", sms=148, smem_per_block=232448, capability=(10, 0))
RTX5090 = DeviceFacts("NVIDIA GeForce RTX 5090", sms=170, smem_per_block=101376, capability=(12, 0))
MI300X = DeviceFacts("AMD Instinct MI300X", sms=304, smem_per_block=65536, capability=(9, 4), gfx="gfx942",
                     warp_size=64)
MI355X = DeviceFacts("AMD Instinct MI355X", sms=256, smem_per_block=163840, capability=(9, 5), gfx="gfx950",
                     warp_size=64)
CPU = DeviceFacts("cpu", sms=4, smem_per_block=160 * 1024)
KNOWN = {"a100": A100, "l4": L4, "h100": H100, "h200": H200, "b200": B200, "rtx5090": RTX5090,
         "mi300x": MI300X, "mi355x": MI355X}


@functools.cache
def _cuda_facts(index: int) -> DeviceFacts:
    props = torch.cuda.get_device_properties(index)
    optin = getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024
    # ROCm: gcnArchName is "gfx942:sramecc+:xnack-"; the launchers pick AMD's config tables by it
    gfx = (getattr(props, "gcnArchName", "") or "").split(":")[0] if torch.version.hip else ""
    warp = int(getattr(props, "warp_size", 0) or (64 if gfx.startswith("gfx9") else 32))
    return DeviceFacts(props.name, props.multi_processor_count, int(optin), (props.major, props.minor), gfx, warp)


def device_facts(device: torch.device) -> DeviceFacts:
    override = settings().device
    if override is not None:
        return override
    if device.type == "cuda":
        return _cuda_facts(device.index if device.index is not None else torch.cuda.current_device())
    return CPU


__all__ = ["DeviceFacts", "H100", "H200", "A100", "L4", "B200", "RTX5090", "MI300X", "MI355X", "CPU", "KNOWN",
           "device_facts"]
