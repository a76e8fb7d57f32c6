"""Kernel tuning probe for the GPU: times prefixattn against the fastest concat baseline on a few
representative shapes, and reports the autotuner's choices. Used to fill bench/TUNING.md.

    python -m bench.tune [--shapes main|all] [--json FILE]

Timings: triton.testing.do_bench medians (CUDA events), fresh random inputs, ratios against the
baseline measured in the same run. Not a unit test.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def causal_flops(B, Hq, Sq, Sk, P, D, causal=True):
    pairs = sum(min(Sk, i + Sk - Sq + 1) for i in range(Sq)) if causal else Sq * Sk
    return 4.0 * B * Hq * D * (Sq * P + pairs)


def main(argv=None) -> int:
    import triton

    import prefixattn
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="main")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dev = "cuda"
    dt = torch.bfloat16
    shapes = [
        # B, Hq, Hkv, S, P, D
        (4, 32, 8, 4096, 64, 128),
        (8, 32, 8, 1024, 64, 128),
        (4, 32, 32, 2048, 16, 64),
        (2, 32, 8, 8192, 256, 128),
    ]
    if args.shapes == "all":
        shapes += [(16, 32, 8, 512, 64, 128), (4, 16, 16, 4096, 64, 64)]
    rows = []
    for B, Hq, Hkv, S, P, D in shapes:
        G = Hq // Hkv
        q = torch.randn(B, Hq, S, D, device=dev, dtype=dt, requires_grad=True)
        k = torch.randn(B, Hkv, S, D, device=dev, dtype=dt, requires_grad=True)
        v = torch.randn(B, Hkv, S, D, device=dev, dtype=dt, requires_grad=True)
        pk = torch.randn(Hkv, P, D, device=dev, dtype=dt, requires_grad=True)
        pv = torch.randn(Hkv, P, D, device=dev, dtype=dt, requires_grad=True)
        do = torch.randn(B, Hq, S, D, device=dev, dtype=dt)

        def ours():
            return prefixattn.prefix_attention(q, k, v, pk, pv)

        def concat():
            kk = torch.cat([pk.unsqueeze(0).expand(B, -1, -1, -1), k], 2).repeat_interleave(G, 1)
            vv = torch.cat([pv.unsqueeze(0).expand(B, -1, -1, -1), v], 2).repeat_interleave(G, 1)
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                              SDPBackend.EFFICIENT_ATTENTION]):
                return torch.nn.functional.scaled_dot_product_attention(
                    q, kk, vv, attn_mask=causal_lower_right(S, S + P))

        err = (ours().float() - concat().float()).norm() / concat().float().norm()
        fl = causal_flops(B, Hq, S, S, P, D)
        res = {"B": B, "Hq": Hq, "Hkv": Hkv, "S": S, "P": P, "D": D, "rel_err_vs_concat": float(err)}
        for name, fn in (("prefixattn", ours), ("concat_causal", concat)):
            t_f = triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")

            def fb(fn=fn):
                out = fn()
                torch.autograd.grad(out, (q, k, v, pk, pv), do)

            t_fb = triton.testing.do_bench(fb, warmup=50, rep=200, return_mode="median")
            res[f"{name}_fwd_ms"] = t_f
            res[f"{name}_fwdbwd_ms"] = t_fb
            res[f"{name}_fwd_tflops"] = fl / t_f / 1e9
            res[f"{name}_fwdbwd_tflops"] = 3.5 * fl / t_fb / 1e9

        # layer 0: only the prefix needs a gradient
        q0, k0, v0 = q.detach(), k.detach(), v.detach()

        def l0():
            out = prefixattn.prefix_attention(q0, k0, v0, pk, pv)
            torch.autograd.grad(out, (pk, pv), do)

        res["prefixattn_layer0_fwdbwd_ms"] = triton.testing.do_bench(l0, warmup=50, rep=200,
                                                                      return_mode="median")
        res["speedup_fwd"] = res["concat_causal_fwd_ms"] / res["prefixattn_fwd_ms"]
        res["speedup_fwdbwd"] = res["concat_causal_fwdbwd_ms"] / res["prefixattn_fwdbwd_ms"]
        rows.append(res)
        print(json.dumps(res), flush=True)
        del q, k, v, pk, pv, do
        torch.cuda.empty_cache()

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "rows": rows}, f, indent=1)
    return 0


def _print_best_configs():
    try:
        from prefixattn.kernels import backward, forward
    except Exception:
        return
    for name, kern in (("fwd", forward._fwd_kernel), ("dq", backward._dq_kernel),
                       ("dkdv", backward._dkdv_kernel)):
        cache = getattr(kern, "cache", {})
        for key, cfg in list(cache.items())[:8]:
            print(f"best {name} {key[:4]} -> {cfg}", flush=True)


if __name__ == "__main__":
    rc = main()
    _print_best_configs()
    sys.exit(rc)
