"""Host overhead of the patched attention layer, and host syncs per forward of a patched model.

Run from a checkout with the project installed: ``python -m bench.layer_overhead [--calls 2000]``.
The library never imports this module.

1. Per-layer host time (CPU, tiny tensors: B=1, Hq=2, Hkv=2, S=4, D=16, P=4). A real forward of a tiny
   patched Llama records the exact arguments transformers hands the registered attention function in
   each layer (the step the pre-hook prepared included); the timing then replays one layer's call many
   times, the way a layer calls it:
   - ``layer (torch backend)``: the whole call, op included, on the torch backend;
   - ``glue only``: the same call with the op replaced by a stub that returns a ready tensor, i.e. the
     patcher's own per-layer work (argument checks, indexing the step, casts, the output transpose).
     The triton backend's host cost cannot be isolated on a CPU (the interpreter runs the kernel body
     in Python), so the glue number is the part the patcher owns on either backend.
   The function is found through transformers' AttentionInterface and the op through the function's
   globals, so the script measures whatever the installed code registers (before and after a refactor).
2. Host syncs per forward: a tiny Llama with 8 layers, a bank of 4 prefixes, prefix_ids given. Every
   device-to-host read (Tensor.item, __int__, __float__, __bool__, __index__, tolist, numpy) during one
   forward is counted, outermost calls only, split into those made from prefixattn's code and the rest
   (transformers' own).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch

import prefixattn
from bench.env import environment

_READS = ("item", "__int__", "__float__", "__bool__", "__index__", "tolist", "numpy")


def _tiny_llama(num_layers: int, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def _registered_function():
    from transformers import AttentionInterface

    return AttentionInterface()["prefixattn"]


def _record_calls(model, **inputs) -> list[tuple[tuple, dict]]:
    """Run one forward and return the (args, kwargs) of every call to the registered attention function."""
    from transformers import AttentionInterface

    real = _registered_function()
    calls: list[tuple[tuple, dict]] = []

    def recorder(*args: Any, **kwargs: Any):
        calls.append((args, dict(kwargs)))
        return real(*args, **kwargs)

    AttentionInterface.register("prefixattn", recorder)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        AttentionInterface.register("prefixattn", real)
    return calls


def _time_calls(fn, args: tuple, kwargs: dict, n: int) -> float:
    """The fastest of 5 rounds' mean time per call, in microseconds (the minimum: on a shared machine
    other load only ever adds time)."""
    with torch.no_grad():
        for _ in range(50):
            fn(*args, **kwargs)
        rounds = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(n):
                fn(*args, **kwargs)
            rounds.append((time.perf_counter() - t0) / n * 1e6)
    return min(rounds)


@contextlib.contextmanager
def _stubbed_op(fn) -> Iterator[None]:
    """Replace the op the attention function calls by one that returns a ready (B, Hq, Sq, D) tensor."""
    g = fn.__globals__
    real = g["prefix_attention"]
    cache: dict[tuple, torch.Tensor] = {}

    def stub(q, k, v, *args: Any, **kwargs: Any) -> torch.Tensor:
        key = (tuple(q.shape), v.shape[-1], q.dtype)
        if key not in cache:
            cache[key] = torch.empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1],
                                     dtype=q.dtype).transpose(1, 2)
        return cache[key]

    g["prefix_attention"] = stub
    try:
        yield
    finally:
        g["prefix_attention"] = real


def layer_time(calls: int, bank: bool, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    model = _tiny_llama(2).to(dtype)
    kwargs = {"num_prefixes": 4} if bank else {}
    model = prefixattn.patch(model, num_prefix_tokens=4, backend="torch", **kwargs)
    ids = torch.randint(3, 97, (1, 4))
    inputs: dict[str, Any] = {"input_ids": ids}
    if bank:
        inputs["prefix_ids"] = torch.tensor([2])
    recorded = _record_calls(model, **inputs)
    args, kw = recorded[-1]
    fn = _registered_function()
    out = {"layer (torch backend)": _time_calls(fn, args, kw, calls)}
    with _stubbed_op(fn):
        out["glue only (op stubbed)"] = _time_calls(fn, args, kw, calls)
    return out


class _ReadCounter:
    """Counts outermost device-to-host reads while active, by call site."""

    def __init__(self) -> None:
        self.total = 0
        self.ours = 0
        self.sites: Counter[str] = Counter()
        self._depth = 0

    def _wrap(self, name: str, real):
        counter = self

        def wrapper(*args: Any, **kwargs: Any):
            if counter._depth == 0:
                frame = sys._getframe(1)
                site = f"{frame.f_code.co_filename.rsplit('site-packages/', 1)[-1]}:{frame.f_lineno} ({name})"
                counter.total += 1
                counter.sites[site] += 1
                if "/prefixattn/" in frame.f_code.co_filename.replace("\\", "/"):
                    counter.ours += 1
            counter._depth += 1
            try:
                return real(*args, **kwargs)
            finally:
                counter._depth -= 1

        return wrapper

    @contextlib.contextmanager
    def active(self) -> Iterator[_ReadCounter]:
        saved = {name: getattr(torch.Tensor, name) for name in _READS}
        for name, real in saved.items():
            setattr(torch.Tensor, name, self._wrap(name, real))
        try:
            yield self
        finally:
            for name, real in saved.items():
                setattr(torch.Tensor, name, real)


def host_syncs(num_layers: int = 8, packed: bool = False) -> _ReadCounter:
    """Reads during one forward of the bank model: 3 rows of 6 tokens with an attention mask, or (packed)
    one row of three documents given by position_ids that restart, no mask (padding-free batches)."""
    model = prefixattn.patch(_tiny_llama(num_layers), num_prefix_tokens=4, num_prefixes=4, backend="torch")
    if packed:
        inputs = {"input_ids": torch.randint(3, 97, (1, 9)), "prefix_ids": torch.tensor([2]),
                  "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])}
    else:
        ids = torch.randint(3, 97, (3, 6))
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                  "prefix_ids": torch.tensor([0, 3, 1])}
    with torch.no_grad():
        model(**inputs)  # warm up (lazy imports, caches)
        counter = _ReadCounter()
        with counter.active():
            model(**inputs)
    return counter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per timing round")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    env = environment(torch.device("cpu"))
    print(f"date {env.get('date')}  machine {env['device']}, {os.cpu_count()} cores  python {env['python']}  "
          f"torch {env['torch']}  transformers {env['transformers']}  prefixattn {prefixattn.__version__}")
    print("\n1. per-layer host time, B=1 Hq=2 Hkv=2 S=4 D=16 P=4, 1 thread, "
          f"{args.calls} calls x 5 rounds (fastest), microseconds per call")
    print("| prefix | layer (torch backend) | glue only (op stubbed) |")
    print("|---|---|---|")
    cases = (("single, fp32 model", False, torch.float32), ("bank of 4 + prefix_ids, fp32 model", True,
             torch.float32), ("single, bf16 model (fp32 prefix)", False, torch.bfloat16))
    for name, bank, dtype in cases:
        t = layer_time(args.calls, bank, dtype)
        print(f"| {name} | {t['layer (torch backend)']:.1f} | {t['glue only (op stubbed)']:.1f} |")
    for packed in (False, True):
        counter = host_syncs(packed=packed)
        what = "one packed row of 3 documents (position_ids, no mask)" if packed else "B=3 S=6 with a mask"
        print(f"\n2{'b' if packed else ''}. host syncs in one forward, tiny Llama, 8 layers, bank of 4, "
              f"prefix_ids given, {what}")
        print(f"total {counter.total}, from prefixattn {counter.ours}")
        for site, n in sorted(counter.sites.items()):
            print(f"  {n:3d}  {site}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
