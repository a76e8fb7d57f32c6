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
CPU = DeviceFacts("cpu", sms=4, smem_per_block=160 * 1024)
KNOWN = {"h100": H100, "h200": H200}


@functools.cache
def _cuda_facts(index: int) -> DeviceFacts:
    props = torch.cuda.get_device_properties(index)
    optin = getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024
    return DeviceFacts(props.name, props.multi_processor_count, int(optin), (props.major, props.minor))


def device_facts(device: torch.device) -> DeviceFacts:
    override = settings().device
    if override is not None:
        return override
    if device.type == "cuda":
        return _cuda_facts(device.index if device.index is not None else torch.cuda.current_device())
    return CPU


__all__ = ["DeviceFacts", "H100", "H200", "CPU", "KNOWN", "device_facts"]
