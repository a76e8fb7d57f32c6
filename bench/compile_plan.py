"""Which launches the launchers make on a GPU (an H100/H200 by default; any of kernels/device.py's
KNOWN), found without it (``python -m bench compile``).

The real launchers (prefixattn.kernels.attention_forward / attention_backward) run on meta tensors
(shapes, strides and dtypes, no data) with ``KernelSettings.device`` set to an H100's facts, so every
device query gets the GPU's answer. Triton is the real, compiling one (never TRITON_INTERPRET), but a
fake driver answers its device questions (sm_90 target) and ``knobs.runtime.jit_cache_hook`` stops
each launch before it compiles: the hook receives triton's own specialization of the launch (the
signature, constants, divisibility attributes and options the GPU would compile), which
``JITFunction.preload`` compiles later, in a worker. Autotuned kernels go through the autotuner's
own ``prune_configs`` (so the kernels' ``early_config_prune`` decides what is kept) and every
candidate of the list is recorded, kept or pruned.

Everything here intercepts triton at this tool's level (its driver slot, its hook slot, the autotuner's
run method, in this process only); the shipped package is used as it is.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
from dataclasses import dataclass, field
from typing import Any

PINNED, AUTOTUNE_KEPT, AUTOTUNE_PRUNED, FIXED = "pinned", "autotune", "pruned", "fixed"


def gpu_target(target):
    """triton's GPUTarget from an sm number (90) or a (backend, arch, warp size) tuple
    (``DeviceFacts.target``: ("cuda", 100, 32), ("hip", "gfx942", 64))."""
    from triton.backends.compiler import GPUTarget

    if isinstance(target, int):
        return GPUTarget("cuda", target, 32)
    backend, arch, warp = target
    return GPUTarget(backend, arch, warp)


class FakeCudaDriver:
    """Answers what triton's JIT asks of the active driver before compiling: the device's target
    (sm_90 by default; any CUDA arch, or an AMD gfx arch for triton's hip backend) on device 0.
    Nothing here can launch (launches are stopped by the hook first)."""

    def __init__(self, arch=90) -> None:
        self.target = gpu_target(arch)

    def is_active(self) -> bool:
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("meta")

    def get_benchmarker(self):
        raise RuntimeError("bench compile never benchmarks")


def use_fake_driver(arch=90) -> None:
    from triton.runtime.driver import driver

    driver.set_active(FakeCudaDriver(arch))


@dataclass
class Launch:
    """One compile the GPU would do: a kernel, its specialization, and why it is launched."""

    kernel: str  # module:qualname of the JITFunction
    config: str  # "BMxBN wW sS" (or the kernel's fixed block sizes)
    kind: str  # pinned | autotune (kept by the prune) | pruned | fixed (helper kernels)
    constants: dict[str, Any]
    num_warps: int
    num_stages: int
    specialization: str  # triton's serialized specialization data (JITFunction.preload's input)
    cases: list[str] = field(default_factory=list)
    dtype: str = ""
    dk: int = 0
    dv: int = 0
    variant: str = ""
    mode: str = ""

    @property
    def key(self) -> str:
        return f"{self.kernel}|{self.kind}|{self.specialization}"

    @property
    def short(self) -> str:
        return self.kernel.rsplit(":", 1)[1].strip("_").replace("_kernel_jit", "").replace("_kernel", "")


_context: contextvars.ContextVar[dict | None] = contextvars.ContextVar("bench_compile_context", default=None)


def _config_name(constants: dict[str, Any], num_warps: int, num_stages: int) -> str:
    bm, bn = constants.get("BLOCK_M"), constants.get("BLOCK_N")
    if bm is not None and bn is not None:
        return f"{bm}x{bn} w{num_warps} s{num_stages}"
    blocks = "x".join(str(v) for k, v in constants.items() if k.startswith("BLOCK"))
    return f"{blocks} w{num_warps} s{num_stages}"


def _plain(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


class Recorder:
    """Collects the launches of the launchers called inside ``recording()``."""

    def __init__(self) -> None:
        self.launches: dict[str, Launch] = {}

    def hook(self, *, fn, compile, **_: Any) -> bool:
        jit = fn.jit_function
        names = jit.arg_names
        constants = {names[k[0]]: _plain(v) for k, v in compile["constants"].items() if len(k) == 1}
        ctx = _context.get() or {}
        kind = ctx.get("kind") or (PINNED if "BLOCK_M" in constants and "BLOCK_N" in constants else FIXED)
        launch = Launch(
            kernel=f"{jit.fn.__module__}:{jit.fn.__qualname__}",
            config=_config_name(constants, compile["num_warps"], compile["num_stages"]),
            kind=kind, constants=constants, num_warps=compile["num_warps"], num_stages=compile["num_stages"],
            specialization=compile["specialization_data"],
            **{k: ctx[k] for k in ("dtype", "dk", "dv", "variant", "mode") if k in ctx},
        )
        existing = self.launches.setdefault(launch.key, launch)
        case = ctx.get("case")
        if case and case not in existing.cases:
            existing.cases.append(case)
        return True  # skip the compile (and the launch): the worker compiles it later

    @contextlib.contextmanager
    def recording(self, facts):
        """Inside: the kernels plan for ``facts`` and every launch is recorded instead of run."""
        import triton
        from prefixattn.kernels.config import use_settings
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.driver import driver

        def autotune_run(tuner, *args, **kwargs):
            tuner.nargs = dict(zip(tuner.arg_names, args, strict=False))
            kept = tuner.prune_configs(kwargs)
            for config in tuner.configs:
                token = _context.set({**(_context.get() or {}),
                                      "kind": AUTOTUNE_KEPT if config in kept else AUTOTUNE_PRUNED})
                try:
                    tuner.fn.run(*args, **kwargs, **config.all_kwargs())
                finally:
                    _context.reset(token)
            tuner.nargs = None

        old_hook, old_run, old_driver = triton.knobs.runtime.jit_cache_hook, Autotuner.run, driver._active
        use_fake_driver(facts.target)
        _forget_targets()
        triton.knobs.runtime.jit_cache_hook = self.hook
        Autotuner.run = autotune_run
        try:
            with use_settings(device=facts, autotune=True, poison=False, splits=0):
                yield self
        finally:
            triton.knobs.runtime.jit_cache_hook = old_hook
            Autotuner.run = old_run
            driver._active = old_driver
            _forget_targets()


def _forget_targets() -> None:
    """Each JITFunction keeps the target (and backend) it first saw per device index: drop them, so a
    second device recorded in this process specializes for its own target, not the first one's."""
    from collections import defaultdict

    from triton.runtime.jit import _triton_jit_function_registry

    for jit in _triton_jit_function_registry.values():
        jit.device_caches = defaultdict(jit.create_binder)


# ---------------------------------------------------------------------------------------------
# the cases: which calls of the launchers to make
# ---------------------------------------------------------------------------------------------

HEAD_DIMS = [(64, 64), (80, 80), (96, 96), (128, 128), (192, 192), (256, 256), (192, 128)]
DTYPES = ("bf16", "fp16", "fp32")
# feature variants: launcher keyword arguments on top of the base case (causal, shared prefix)
VARIANTS = {
    "base": {},
    "noncausal": {"causal": False},
    "padding": {"padding": True},
    "window": {"window": 256},
    "documents": {"docs": True},
    "sinks": {"sinks": True},
    "softcap": {"softcap": 30.0},
    "bank": {"prefix": "bank"},
    "row_prefix": {"prefix": "row"},
    "no_prefix": {"P": 0, "padding": True},
    "bias": {"bias": True},  # a score bias (1, Hq, Sq, P + Sk), T5's position bias
    "bias_softcap": {"bias": True, "softcap": 30.0},  # the bias after a softcap: its own tile, not the dot's
    "window2": {"causal": False, "window": 256},  # two-sided window (ModernBERT's local layers)
    "all": {"window": 256, "docs": True, "sinks": True, "softcap": 30.0, "prefix": "bank", "padding": True},
}
# modes: which launcher calls
MODES = {
    "fwd": "forward, deterministic (pinned config)",
    "decode": "forward, Sq=1 over a 4096-key cache (fixed decode config, split-K + combine)",
    "bwd": "backward, every gradient, deterministic (pinned dq and dk/dv configs)",
    "layer0": "backward, prefix gradient only (pinned dk/dv, prefix programs only)",
    "fwd_tuned": "forward, deterministic=False (the autotune list)",
    "bwd_tuned": "backward, deterministic=False (atomic dq and prefix gradient; the dk/dv autotune list)",
    "dq_tuned": "backward, dq only, deterministic=False (the dq autotune list)",
}


@dataclass(frozen=True)
class Case:
    variant: str
    mode: str
    dtype: str
    dk: int
    dv: int

    def __str__(self) -> str:
        d = f"{self.dk}" if self.dk == self.dv else f"{self.dk}/{self.dv}"
        return f"{self.mode}:{self.variant}:{self.dtype}:D{d}"


def case_set(name: str) -> list[Case]:
    """Named sets of cases. devices: the pinned kernels of the main path, bf16, D = 64/128 (CI runs it
    for every device); ci: the pinned kernels of the main path, bf16/fp16, D = 64/128/256
    (a few minutes on 2 cores); pinned: the pinned and fixed launches over head dims (bf16/fp16; fp32
    at D = 64, 128) and the feature variants (bf16, D = 128; everything at once also at 256 and
    192/128); pinned128: the pinned set's bf16/fp16 cases at D <= 128 (the launches that must fit and not
    spill on every device); pinned_wide: its bf16/fp16 cases above D = 128; tuned: the autotune lists
    (bf16/fp16, D = 64/128/256); full: pinned + tuned."""
    cases: list[Case] = []
    if name in ("pinned128", "pinned_wide"):
        wide = name == "pinned_wide"
        return [c for c in case_set("pinned")
                if c.dtype in ("bf16", "fp16") and (max(c.dk, c.dv) > 128) == wide]
    if name == "devices":  # CI's subset for every device: the main path, bf16, D = 64 and 128
        return [Case("base", mode, "bf16", d, d) for d in (64, 128) for mode in ("fwd", "bwd")]
    if name == "ci":
        for dtype in ("bf16", "fp16"):
            for d in (64, 128, 256):
                for mode in ("fwd", "bwd"):
                    cases.append(Case("base", mode, dtype, d, d))
        return cases
    if name in ("pinned", "full"):
        for dtype in ("bf16", "fp16"):
            for dk, dv in HEAD_DIMS:
                for mode in ("fwd", "decode", "bwd", "layer0"):
                    cases.append(Case("base", mode, dtype, dk, dv))
        # fp32 compiles slowly (minutes per kernel when it spills): two head dims; exact products
        # (torch's default) and TF32 (torch.backends.cuda.matmul.allow_tf32 = True)
        for dtype in ("fp32", "tf32"):
            for dk in (64, 128):
                for mode in ("fwd", "bwd"):
                    cases.append(Case("base", mode, dtype, dk, dk))
        for variant in VARIANTS:
            if variant == "base":
                continue
            for dk, dv in ((128, 128),):
                for mode in ("fwd", "bwd"):
                    cases.append(Case(variant, mode, "bf16", dk, dv))
                if variant in ("window", "bank", "sinks", "all", "bias", "bias_softcap"):
                    cases.append(Case(variant, "decode", "bf16", dk, dv))
        cases.append(Case("all", "bwd", "bf16", 256, 256))
        cases.append(Case("all", "bwd", "bf16", 192, 128))
        for mode in ("fwd", "bwd"):  # the bias's tile at the widest head dim
            cases.append(Case("bias", mode, "bf16", 256, 256))
    if name in ("tuned", "full"):
        for dtype in ("bf16", "fp16"):
            for d in (64, 128, 256):
                for mode in ("fwd_tuned", "bwd_tuned", "dq_tuned"):
                    cases.append(Case("base", mode, dtype, d, d))
        cases.append(Case("all", "bwd_tuned", "bf16", 128, 128))
    if not cases:
        raise ValueError(f"unknown case set {name!r}: "
                         "devices, ci, pinned, pinned128, pinned_wide, tuned, full")
    return cases


def _inputs(case: Case, B=2, Hq=16, Hkv=4, S=1024, P=64, Sq=None):
    """Meta tensors in the layout transformers hands over ((B, S, H, D) memory), per the variant."""
    import torch

    # "tf32": fp32 inputs with torch.backends.cuda.matmul.allow_tf32 set (run_case sets it)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}
    dtype = dtypes[case.dtype]
    opts = dict(VARIANTS[case.variant])
    P = opts.get("P", P)
    Sq = S if Sq is None else Sq
    meta = dict(device="meta", dtype=dtype)
    q = torch.empty(B, Sq, Hq, case.dk, **meta).transpose(1, 2)
    k = torch.empty(B, S, Hkv, case.dk, **meta).transpose(1, 2)
    v = torch.empty(B, S, Hkv, case.dv, **meta).transpose(1, 2)
    prefix = opts.get("prefix", "shared")
    lead = {"shared": (), "row": (B,), "bank": (8,)}[prefix]
    pk = torch.empty(*lead, Hkv, P, case.dk, **meta)
    pv = torch.empty(*lead, Hkv, P, case.dv, **meta)
    idx = torch.empty(B, device="meta", dtype=torch.int64) if prefix == "bank" else None
    kpm = torch.empty(B, S, device="meta", dtype=torch.bool) if opts.get("padding") else None
    doc_bounds = torch.empty(B, S, device="meta", dtype=torch.int32)
    docs = (doc_bounds, doc_bounds) if opts.get("docs") and Sq == S else (None, None)
    sinks = torch.empty(Hq, device="meta", dtype=dtype) if opts.get("sinks") else None
    bias = torch.empty(1, Hq, Sq, P + S, device="meta", dtype=dtype) if opts.get("bias") else None
    return dict(q=q, k=k, v=v, prefix_k=pk, prefix_v=pv, key_padding_mask=kpm, prefix_index=idx,
                doc_start=docs[0], doc_end=docs[1], sinks=sinks, causal=opts.get("causal", True),
                scale=case.dk ** -0.5, softcap=opts.get("softcap", 0.0), window=opts.get("window", 0),
                score_bias=bias)


def run_case(case: Case) -> None:
    """Call the launchers as the op layer would for this case (inside Recorder.recording)."""
    import torch
    from prefixattn.kernels import attention_backward, attention_forward

    if case.mode == "decode":
        x = _inputs(case, B=4, Hq=32, Hkv=8, S=4096, Sq=1)
    else:
        x = _inputs(case)
    deterministic = not case.mode.endswith("_tuned")
    token = _context.set({"case": str(case), "dtype": case.dtype, "dk": case.dk, "dv": case.dv,
                          "variant": case.variant, "mode": case.mode})
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = case.dtype == "tf32"
    try:
        if case.mode in ("fwd", "decode", "fwd_tuned"):
            attention_forward(**x, deterministic=deterministic)
            return
        B, Hq, Sq, _ = x["q"].shape
        out = torch.empty(B, Sq, Hq, case.dv, device="meta", dtype=x["q"].dtype).transpose(1, 2)
        lse = torch.empty(B, Hq, Sq, device="meta", dtype=torch.float32)
        grad_out = torch.empty_like(out)
        need = {"bwd": (True, True, True), "bwd_tuned": (True, True, True), "layer0": (False, False, True),
                "dq_tuned": (True, False, False)}[case.mode]
        attention_backward(
            grad_out, x["q"], x["k"], x["v"], x["prefix_k"], x["prefix_v"], out, lse,
            x["key_padding_mask"], x["prefix_index"], x["doc_start"], x["doc_end"], x["sinks"], x["causal"],
            x["scale"], x["softcap"], x["window"], need_dq=need[0], need_dkv=need[1], need_dprefix=need[2],
            need_dsinks=x["sinks"] is not None, deterministic=deterministic, score_bias=x["score_bias"],
        )
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        _context.reset(token)


def record(cases: list[Case], facts) -> list[Launch]:
    """Every distinct launch the cases make, in first-seen order."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("bench compile needs the compiling triton: unset TRITON_INTERPRET")
    rec = Recorder()
    with rec.recording(facts):
        for case in cases:
            run_case(case)
    return list(rec.launches.values())


def launches_to_json(launches: list[Launch]) -> str:
    return json.dumps([vars(x) for x in launches])
