"""Kernel tuning probe for the GPU: times prefixattn against the fastest concat baseline on a few
representative shapes, and reports the autotuner's choices. Used to fill bench/TUNING.md.

    python -m bench tune [--shapes main|all] [--json FILE]

Timings: triton.testing.do_bench medians (CUDA events), fresh random inputs, ratios against the
baseline measured in the same run. Not a unit test.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

import prefixattn

from .env import environment
from .flops import attention_flops

MAIN_SHAPES = [  # B, Hq, Hkv, S, P, D
    (4, 32, 8, 4096, 64, 128),
    (8, 32, 8, 1024, 64, 128),
    (4, 32, 32, 2048, 16, 64),
    (2, 32, 8, 8192, 256, 128),
]
EXTRA_SHAPES = [(16, 32, 8, 512, 64, 128), (4, 16, 16, 4096, 64, 64)]


def probe_shape(B: int, Hq: int, Hkv: int, S: int, P: int, D: int,
                dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """fwd and fwd+bwd of prefixattn and of concat + SDPA (lower-right causal), plus layer 0."""
    import triton

    from .providers import concat_sdpa_causal, make_inputs, prefixattn_provider

    x = make_inputs(B=B, H=Hq, Hkv=Hkv, Sq=S, Sk=S, P=P, D=D, dtype=dtype, device=torch.device("cuda"))
    do = torch.randn(B, Hq, S, D, device="cuda", dtype=dtype)
    ours, _ = prefixattn_provider(x)
    # deterministic=False: the autotuner picks the configs (deterministic=True pins them, so its cache
    # would stay empty) and dq / the prefix gradient go through atomics; best_configs() reads its choice
    tuned, _ = prefixattn_provider(x, deterministic=False)
    concat, sdpa_backend = concat_sdpa_causal(x)

    ref = concat().float()
    res: dict[str, Any] = {"B": B, "Hq": Hq, "Hkv": Hkv, "S": S, "P": P, "D": D, "concat_sdpa": sdpa_backend,
                           "rel_err_vs_concat": float((ours().float() - ref).norm() / ref.norm())}
    shape = dict(B=B, H=Hq, Sq=S, Sk=S, P=P, D=D)
    bench = lambda fn: triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")  # noqa: E731
    for name, fn in (("prefixattn", ours), ("prefixattn_autotuned", tuned), ("concat_causal", concat)):
        t_f = bench(fn)
        t_fb = bench(lambda fn=fn: torch.autograd.grad(fn(), x.tensors(), do))
        res[f"{name}_fwd_ms"] = t_f
        res[f"{name}_fwdbwd_ms"] = t_fb
        res[f"{name}_fwd_tflops"] = attention_flops("fwd", **shape) / t_f / 1e9
        res[f"{name}_fwdbwd_tflops"] = attention_flops("fwd_bwd", **shape) / t_fb / 1e9

    # layer 0: only the prefix needs a gradient
    q0, k0, v0 = x.q.detach(), x.k.detach(), x.v.detach()
    res["prefixattn_layer0_fwdbwd_ms"] = bench(
        lambda: torch.autograd.grad(prefixattn.prefix_attention(q0, k0, v0, x.pk, x.pv), (x.pk, x.pv), do))
    res["speedup_fwd"] = res["concat_causal_fwd_ms"] / res["prefixattn_fwd_ms"]
    res["speedup_fwdbwd"] = res["concat_causal_fwdbwd_ms"] / res["prefixattn_fwdbwd_ms"]
    # what pinning the configs (bitwise-reproducible gradients) costs against the autotuned atomics path
    res["pinned_vs_autotuned_fwdbwd"] = res["prefixattn_fwdbwd_ms"] / res["prefixattn_autotuned_fwdbwd_ms"]
    return res


def best_configs() -> list[str]:
    """The autotuner's choice per kernel and key (after a probe has run; filled by the
    deterministic=False runs, the deterministic ones launch pinned configs)."""
    from prefixattn.kernels import backward, forward

    lines = []
    kernels = (("fwd", forward._fwd_kernel), ("dq", backward._dq_kernel), ("dkdv", backward._dkdv_kernel))
    for name, kern in kernels:
        for key, cfg in list(getattr(kern, "cache", {}).items())[:8]:
            lines.append(f"best {name} {key[:4]} -> {cfg}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench tune", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", choices=("main", "all"), default="main")
    ap.add_argument("--json", default=None, help="write the rows and the environment here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.tune needs a CUDA GPU", file=sys.stderr)
        return 2
    shapes = MAIN_SHAPES + (EXTRA_SHAPES if args.shapes == "all" else [])
    rows = []
    for shape in shapes:
        rows.append(probe_shape(*shape))
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    configs = best_configs()
    print("\n".join(configs), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**environment(torch.device("cuda")), "rows": rows, "configs": configs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
