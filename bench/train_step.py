"""Training-step benchmark: one prefix-tuning job run several ways on the same model.

- ``peft_sdpa``: PEFT prefix tuning with transformers' sdpa attention (prefix as a KV cache, a
  (B, 1, S, P + S) mask, SDPA);
- ``peft_eager``: the same with eager attention (materialized scores);
- ``prefixattn``: ``prefixattn.patch`` of that PEFT model (the same prefix carried over).

The model is a Llama-style config with random weights (bf16 on a GPU; fp32 on a CPU: a tiny one with
``--quick``, else ``CPU_BENCH_MODEL``, the sizes of issue 18's table).
Each provider starts from the same prefix (restored from a snapshot) and first computes the logits
and loss of a fixed batch before training: ``loss0`` and ``logits0_rel_err`` (relative error of the
logits against the first provider, ``peft_sdpa``) are recorded, and ``agree`` says whether they
match within the dtype's tolerance (the random model is initialized so that the prefix visibly moves
the logits: a provider that dropped or misplaced it would not agree). Then warm-up steps and timed
steps (forward, backward, AdamW on the prefix). Records use the common JSON format with mode
``train_step``; ``ms`` is the median step time, ``tokens_per_s`` = B * S / step time, and
``peak_mem_mb`` is the peak allocated memory over the timed steps, weights included (CUDA only: on a
CPU it is null). On a CPU the providers live side by side and their steps are interleaved (round r
times one step of each), so load from other processes hits all of them alike; ``cpu_peak_alloc_mb``
is what one step allocates through the CPU allocator at its peak beyond what was allocated before it
(torch.profiler's allocation events: every tensor, kernel scratch included).

``speedup_paired`` (interleaved runs): the median over rounds of the first provider's step time over
this one's in the same round.

``run_decode`` (CPU full runs, and ``python -m bench train_step --decode``): one greedy decode step
of ``generate()`` (one new token per row over a KV cache of a prompt), PEFT (its prefix in the cache,
positions from P, as its generate() does) against the patched model; logits compared, steps
interleaved. Records: suite ``decode``, mode ``decode_step``.

``run_decode_tokens``: 32 greedy tokens in a row after a fresh prefill (the cache grows as in
generate()), per-token time, PEFT against the patched model; the generated tokens must agree.
Records: suite ``decode``, mode ``decode_tokens``.

``python -m bench train_step`` runs one configuration from the command line (for example the
head-dim-512 case on a GPU: ``--model wide512``) and writes its records as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .timing import free_memory, is_oom, sync

PROVIDERS = ("peft_sdpa", "peft_eager", "prefixattn")
CPU_PROVIDERS = ("peft_sdpa", "prefixattn")  # the CPU runs of issue 18's table
# relative error of the first logits up to which a provider agrees with peft_sdpa (a whole model)
AGREE_TOL = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    init_range: float = 0.02
    head_dim_override: int | None = None  # None: hidden // heads

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden // self.heads

    def config(self) -> Any:
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            max_position_embeddings=16384,
            tie_word_embeddings=False,
            initializer_range=self.init_range,
            head_dim=self.head_dim,
        )


# ~0.5B parameters: 8 layers of a Llama-3.2-1B-like block (hidden 2048, 32 query / 8 KV heads, D 64)
GPU_MODEL = ModelSpec("llama-8L-2048h-32/8heads", 2048, 8192, 8, 32, 8, 32000)
# larger init than the usual 0.02 so a tiny random model's logits are not all near zero
CPU_MODEL = ModelSpec("llama-2L-64h-4/2heads", 64, 128, 2, 4, 2, 256, init_range=0.15)
# issue 18's CPU table: 4 layers, hidden 256, 8 query / 4 KV heads (head dim 32), B=4, P=16, S=256 and 1024
CPU_BENCH_MODEL = ModelSpec("llama-4L-256h-8/4heads", 256, 1024, 4, 8, 4, 1024, init_range=0.1)
CPU_BENCH = {"B": 4, "P": 16, "S": (256, 1024)}
# Gemma 4's global layers have head dim 512, beyond the Triton kernels: the torch backend runs them
WIDE_MODEL = ModelSpec("llama-4L-2048h-8/2heads-D512", 2048, 8192, 4, 8, 2, 32000, head_dim_override=512)
MODELS = {"gpu": GPU_MODEL, "cpu": CPU_BENCH_MODEL, "tiny": CPU_MODEL, "wide512": WIDE_MODEL}


def _batch(spec: ModelSpec, B: int, S: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab, (B, S), generator=g).to(device)
    return {"input_ids": ids, "labels": ids}


def _measure(
    model: Any, batch: dict[str, torch.Tensor], device: torch.device, warmup: int, steps: int
) -> tuple[dict[str, Any], torch.Tensor]:
    """Step time, peak memory and the first loss; also returns the first logits (for agreement)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("nothing to train: no parameter requires grad")
    opt = torch.optim.AdamW(params, lr=1e-3)
    with torch.no_grad():
        out0 = model(**batch)
        loss0, logits0 = float(out0.loss), out0.logits.detach().float().cpu()
        del out0

    def step() -> None:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "ms": statistics.median(times),
        "peak_mem_mb": peak,
        "loss0": loss0,
        "trainable_params": sum(p.numel() for p in params),
    }, logits0


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _eager_fits(spec: ModelSpec, B: int, S: int, P: int, device: torch.device) -> tuple[bool, float]:
    """Eager keeps bf16 scores, fp32 softmax and bf16 probabilities of every layer for backward."""
    need = spec.layers * B * spec.heads * S * (S + P) * 8
    if device.type != "cuda":
        return True, need / 2**30
    free, _ = torch.cuda.mem_get_info(device)
    return need < 0.8 * free, need / 2**30


def peft_prefix_model(spec: ModelSpec, P: int, device: torch.device, dtype: torch.dtype) -> tuple[Any, dict]:
    """A random Llama of ``spec`` (SDPA attention) with a PEFT prefix of P tokens, seeded, and a
    snapshot of the prefix that restores it between providers."""
    import peft
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):  # initialized where it runs: a 0.5B model is slow to init on a CPU
        base = LlamaForCausalLM(spec.config())
    base = base.to(dtype=dtype)
    base.set_attn_implementation("sdpa")
    torch.manual_seed(1)
    model = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    snapshot = {k: v.detach().clone() for k, v in model.prompt_encoder.state_dict().items()}
    return model, snapshot


def cpu_step_peak_mb(step: Any) -> float | None:
    """MiB that one call of ``step`` allocates through the CPU allocator at its peak, beyond what was
    allocated before it: the running sum of torch.profiler's allocation events (frees negative), every
    tensor included (saved activations, gradients, kernel scratch). None if the profiler gives no events."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, int(node.extra_fields.alloc_size)))
        stack.extend(node.children)
    if not events:
        return None
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak / 2**20


def _record(spec: ModelSpec, provider: str, B: int, S: int, P: int, dt: str) -> dict[str, Any]:
    return {
        "suite": "train", "provider": provider, "mode": "train_step", "B": B, "H": spec.heads,
        "Hkv": spec.kv_heads, "S": S, "Sq": S, "Sk": S, "P": P, "D": spec.head_dim, "dtype": dt,
        "model": spec.name, "layers": spec.layers, "hidden": spec.hidden, "ms": None, "tflops": None,
        "peak_mem_mb": None, "tokens_per_s": None, "loss0": None, "logits0_rel_err": None, "ref": None,
        "agree": None, "status": "ok", "reason": None,
    }


def _target(provider: str, model: Any, backend: str, fresh: bool) -> Any:
    """The model a provider trains: the PEFT model with sdpa or eager attention, or its patched copy
    (``fresh``: a deep copy, so that the providers can live side by side)."""
    import prefixattn

    if fresh:
        model = copy.deepcopy(model)
    if provider == "prefixattn":
        return prefixattn.patch(model, backend=backend)  # carries the PEFT prefix over
    model.get_base_model().set_attn_implementation("eager" if provider == "peft_eager" else "sdpa")
    return model


def run_config(
    spec: ModelSpec,
    B: int,
    S: int,
    P: int,
    device: torch.device,
    dtype: torch.dtype,
    backend: str,
    warmup: int,
    steps: int,
    log: Any = print,
    providers: tuple[str, ...] = PROVIDERS,
    interleave: bool = False,
) -> list[dict[str, Any]]:
    """The providers on one (model, batch) configuration: one after the other, or (``interleave``) side
    by side with their steps interleaved, plus the CPU step peak (CPU runs)."""
    model, snapshot = peft_prefix_model(spec, P, device, dtype)
    batch = _batch(spec, B, S, device)
    dt = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype]
    records: list[dict[str, Any]] = []
    ref_logits: torch.Tensor | None = None
    ref_name = None
    live: dict[str, tuple[dict[str, Any], Any]] = {}
    for provider in providers:
        rec = _record(spec, provider, B, S, P, dt)
        records.append(rec)
        model.prompt_encoder.load_state_dict(snapshot)
        if provider == "peft_eager":
            fits, gib = _eager_fits(spec, B, S, P, device)
            if not fits:
                rec.update(status="skipped", reason=f"would need ~{gib:.0f} GiB for eager attention scores")
                log(f"{provider:>12} B={B} S={S}: skipped ({rec['reason']})")
                continue
        try:
            target = _target(provider, model, backend, fresh=interleave)
            if interleave:
                logits0 = _first_logits(target, batch, rec)
                live[provider] = (rec, target)
            else:
                measured, logits0 = _measure(target, batch, device, warmup, steps)
                rec.update(measured)
                rec["tokens_per_s"] = B * S / (rec["ms"] * 1e-3)
            if ref_logits is None:
                ref_logits, ref_name = logits0, provider
            rec["ref"] = ref_name
            rec["logits0_rel_err"] = _rel_err(logits0, ref_logits)
            rec["agree"] = bool(rec["logits0_rel_err"] <= AGREE_TOL.get(dtype, 5e-2))
            if not interleave:
                _log_record(rec, log)
        except Exception as e:
            rec.update(status="oom" if is_oom(e) else "error", reason=f"{type(e).__name__}: {str(e)[:200]}")
            rec["ms"] = None
            live.pop(provider, None)
            log(f"{provider:>12} B={B} S={S}: {rec['status']} ({rec['reason']})")
        finally:
            free_memory(device)
    if interleave and live:
        _measure_interleaved(live, batch, device, warmup, steps, log)
        for rec, _ in live.values():
            if rec["status"] == "ok":
                rec["tokens_per_s"] = B * S / (rec["ms"] * 1e-3)
                _log_record(rec, log)
    del model, live
    free_memory(device)
    return records


def _log_record(rec: dict[str, Any], log: Any) -> None:
    mem = ""
    if rec.get("peak_mem_mb") is not None:
        mem = f", peak {rec['peak_mem_mb']:.0f} MiB"
    elif rec.get("cpu_peak_alloc_mb") is not None:
        mem = f", step peak {rec['cpu_peak_alloc_mb']:.0f} MiB (CPU allocator)"
    log(f"{rec['provider']:>12} B={rec['B']} S={rec['S']}: {rec['ms']:.1f} ms/step, "
        f"{rec['tokens_per_s']:.0f} tokens/s, loss0 {rec['loss0']:.4f}, "
        f"logits vs {rec['ref']} {rec['logits0_rel_err']:.1e}" + mem
        + ("" if rec["agree"] else "  ** DISAGREES **"))


def _first_logits(model: Any, batch: dict[str, torch.Tensor], rec: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch)
    rec["loss0"] = float(out.loss)
    rec["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return out.logits.detach().float().cpu()


def _measure_interleaved(live: dict[str, tuple[dict[str, Any], Any]], batch: dict[str, torch.Tensor],
                         device: torch.device, warmup: int, rounds: int, log: Any) -> None:
    """Warm-up steps of every provider, then ``rounds`` rounds of one timed step each (medians); then
    one more step each under the profiler for the CPU step peak. Fills the records in ``live``."""
    steps = {}
    for name, (_, model) in live.items():
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3)

        def step(model=model, opt=opt) -> None:
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps[name] = step
    times: dict[str, list[float]] = {name: [] for name in steps}
    failed: set[str] = set()

    def run(name: str, timed: bool) -> None:
        try:
            sync(device)
            t0 = time.perf_counter()
            steps[name]()
            sync(device)
            if timed:
                times[name].append((time.perf_counter() - t0) * 1e3)
        except Exception as e:
            rec = live[name][0]
            rec.update(status="oom" if is_oom(e) else "error", reason=f"{type(e).__name__}: {str(e)[:200]}")
            failed.add(name)
            log(f"{name:>12}: {rec['status']} ({rec['reason']})")

    for _ in range(warmup):
        for name in steps:
            if name not in failed:
                run(name, timed=False)
    for _ in range(rounds):
        for name in steps:
            if name not in failed:
                run(name, timed=True)
    first = next((n for n in steps if n not in failed), None)
    for name, (rec, _) in live.items():
        if name in failed:
            rec["ms"] = None
            continue
        rec["ms"] = statistics.median(times[name])
        rec["ms_all"] = [round(t, 2) for t in times[name]]
        rec["speedup_paired"] = paired_speedup(times[first], times[name])
        rec["speedup_paired_vs"] = first
        if device.type == "cpu":
            rec["cpu_peak_alloc_mb"] = cpu_step_peak_mb(steps[name])


def paired_speedup(ref_ms: list[float], ms: list[float]) -> float:
    """Median over rounds of ref / this in the same round: a round's load hits both of its steps, so the
    per-round ratio is steadier than the ratio of medians on a shared machine."""
    return statistics.median(r / t for r, t in zip(ref_ms, ms, strict=True))


def run_train_bench(
    device: torch.device, *, quick: bool = False, backend: str = "auto", log: Any = print
) -> list[dict[str, Any]]:
    """All training-step records for this device (and, on a full CPU run, the decode-step records)."""
    interleave = device.type == "cpu"
    providers = PROVIDERS
    if device.type == "cuda":
        spec, dtype, P = GPU_MODEL, torch.bfloat16, 64
        shapes = [(2, 1024)] if quick else [(4, 2048), (1, 8192)]
        warmup, steps = (2, 5) if quick else (3, 10)
    elif quick:
        spec, dtype, P = CPU_MODEL, torch.float32, 8
        shapes, warmup, steps = [(2, 32)], 1, 2
    else:
        spec, dtype, P = CPU_BENCH_MODEL, torch.float32, CPU_BENCH["P"]
        shapes, warmup, steps = [(CPU_BENCH["B"], S) for S in CPU_BENCH["S"]], 2, 9
        providers = CPU_PROVIDERS
    log(f"# training step: {spec.name}, P={P}, {dtype}" + (", steps interleaved" if interleave else ""))
    records = []
    for B, S in shapes:
        records += run_config(spec, B, S, P, device, dtype, backend, warmup, steps, log, providers,
                              interleave)
    if device.type == "cpu" and not quick:
        records += run_decode(spec, CPU_BENCH["B"], 256, P, device, dtype, backend, rounds=31, log=log)
        records += run_decode_tokens(spec, CPU_BENCH["B"], 256, P, device, dtype, backend, rounds=7, log=log)
    return records


# ---------------------------------------------------------------------------------------------------
# one decode step of generate()
# ---------------------------------------------------------------------------------------------------


def run_decode(spec: ModelSpec, B: int, prompt: int, P: int, device: torch.device, dtype: torch.dtype,
               backend: str, rounds: int, log: Any = print, warmup: int = 3) -> list[dict[str, Any]]:
    """One greedy decode step (B rows, one new token each, a KV cache of ``prompt`` tokens) of PEFT
    prefix tuning and of the patched model, interleaved; the cache is cropped back after every step so
    each step sees the same cache. PEFT's step is what its generate() runs: the prefix as the first P
    cache entries, the attention mask P + prompt + 1 long, positions from P. The patched model's is what
    its generate() runs: a fresh DynamicCache handed to the prefill (which on the torch backend then holds
    each row's prefix in front, and a step is one SDPA call per layer; on CUDA the kernels read it in
    place), the attention mask prompt + 1 long."""
    from transformers import DynamicCache

    import prefixattn

    model, snapshot = peft_prefix_model(spec, P, device, dtype)
    model.prompt_encoder.load_state_dict(snapshot)
    model.eval()
    base = model.get_base_model()
    patched = prefixattn.patch(copy.deepcopy(model), backend=backend).eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, spec.vocab, (B, prompt), generator=g).to(device)
    dt = str(dtype).removeprefix("torch.")

    with torch.no_grad():
        peft_cache = model.get_prompt(batch_size=B)
        out = base(input_ids=ids, attention_mask=torch.ones(B, P + prompt, dtype=torch.long, device=device),
                   past_key_values=peft_cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        # as generate() does: a fresh DynamicCache handed in (on the torch backend the patched model then
        # keeps each row's prefix in it, as PEFT does; decode_cache.py)
        our_cache = DynamicCache(config=base.config)
        patched(input_ids=ids, use_cache=True, past_key_values=our_cache)

    def peft_step() -> torch.Tensor:
        logits = base(input_ids=token, past_key_values=peft_cache, use_cache=True,
                      attention_mask=torch.ones(B, P + prompt + 1, dtype=torch.long, device=device)).logits
        peft_cache.crop(-1)  # the new token out again (negative: tokens to drop, in every transformers)
        return logits

    def our_step() -> torch.Tensor:
        logits = patched(input_ids=token, past_key_values=our_cache, use_cache=True,
                         attention_mask=torch.ones(B, prompt + 1, dtype=torch.long, device=device)).logits
        our_cache.crop(-1)
        return logits

    providers = {"peft_sdpa": peft_step, "prefixattn": our_step}
    records = []
    with torch.no_grad():
        ref = peft_step().float().cpu()
        logits = {name: fn().float().cpu() for name, fn in providers.items()}
        for _ in range(warmup):
            for fn in providers.values():
                fn()
        times: dict[str, list[float]] = {name: [] for name in providers}
        for _ in range(rounds):
            for name, fn in providers.items():
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                times[name].append((time.perf_counter() - t0) * 1e3)
    for name in providers:
        err = _rel_err(logits[name], ref)
        rec = {
            "suite": "decode", "provider": name, "mode": "decode_step", "B": B, "H": spec.heads,
            "Hkv": spec.kv_heads, "S": prompt, "Sq": 1, "Sk": prompt + 1, "P": P, "D": spec.head_dim,
            "dtype": dt, "model": spec.name, "layers": spec.layers, "hidden": spec.hidden,
            "ms": statistics.median(times[name]), "ms_all": [round(t, 3) for t in times[name]],
            "tflops": None, "peak_mem_mb": None, "tokens_per_s": B / (statistics.median(times[name]) * 1e-3),
            "logits_rel_err": err, "ref": "peft_sdpa", "agree": bool(err <= AGREE_TOL.get(dtype, 5e-2)),
            "speedup_paired": paired_speedup(times["peft_sdpa"], times[name]),
            "speedup_paired_vs": "peft_sdpa",
            "status": "ok", "reason": None,
        }
        records.append(rec)
        log(f"{name:>12} decode step B={B}, cache {prompt}: {rec['ms']:.2f} ms, logits vs peft_sdpa {err:.1e}"
            + ("" if rec["agree"] else "  ** DISAGREES **"))
    free_memory(device)
    return records


def run_decode_tokens(spec: ModelSpec, B: int, prompt: int, P: int, device: torch.device, dtype: torch.dtype,
                      backend: str, rounds: int, tokens: int = 32, log: Any = print) -> list[dict[str, Any]]:
    """``tokens`` greedy decode steps in a row, as generate() runs them (the cache grows by one row per
    step; ``run_decode`` re-times one step over a cache cropped back), PEFT against the patched model.
    Each round starts from a fresh prefill of the same prompt (not timed); the rounds alternate between
    the providers. Records: suite ``decode``, mode ``decode_tokens``, ``ms`` per generated token; the
    generated tokens must be the same."""
    from transformers import DynamicCache

    import prefixattn

    model, snapshot = peft_prefix_model(spec, P, device, dtype)
    model.prompt_encoder.load_state_dict(snapshot)
    model.eval()
    base = model.get_base_model()
    patched = prefixattn.patch(copy.deepcopy(model), backend=backend).eval()
    ids = torch.randint(0, spec.vocab, (B, prompt), generator=torch.Generator().manual_seed(2)).to(device)
    ones = torch.ones(B, P + prompt + tokens, dtype=torch.long, device=device)

    def peft_tokens() -> tuple[float, torch.Tensor]:
        cache = model.get_prompt(batch_size=B)  # PEFT's generate(): the prefix as the first P entries
        logits = base(input_ids=ids, attention_mask=ones[:, :P + prompt], past_key_values=cache,
                      use_cache=True).logits
        return _greedy(lambda tok, n: base(input_ids=tok, past_key_values=cache, use_cache=True,
                                           attention_mask=ones[:, :P + n]).logits, logits, prompt)

    def our_tokens() -> tuple[float, torch.Tensor]:
        cache = DynamicCache(config=base.config)  # generate()'s fresh cache
        logits = patched(input_ids=ids, attention_mask=ones[:, :prompt], past_key_values=cache,
                         use_cache=True).logits
        return _greedy(lambda tok, n: patched(input_ids=tok, past_key_values=cache, use_cache=True,
                                              attention_mask=ones[:, :n]).logits, logits, prompt)

    def _greedy(step: Any, logits: torch.Tensor, n: int) -> tuple[float, torch.Tensor]:
        out = []
        sync(device)
        t0 = time.perf_counter()
        for _ in range(tokens):
            token = logits[:, -1:].argmax(-1)
            out.append(token)
            n += 1
            logits = step(token, n)
        sync(device)
        return (time.perf_counter() - t0) * 1e3 / tokens, torch.cat(out, 1)

    providers = {"peft_sdpa": peft_tokens, "prefixattn": our_tokens}
    times: dict[str, list[float]] = {name: [] for name in providers}
    generated: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for r in range(rounds + 1):
            for name, fn in providers.items():
                ms, toks = fn()
                if r:  # round 0 warms up
                    times[name].append(ms)
                generated[name] = toks
    same = torch.equal(generated["prefixattn"], generated["peft_sdpa"])
    records = []
    for name in providers:
        med = statistics.median(times[name])
        records.append({
            "suite": "decode", "provider": name, "mode": "decode_tokens", "B": B, "H": spec.heads,
            "Hkv": spec.kv_heads, "S": prompt, "Sq": 1, "Sk": prompt + tokens, "P": P, "D": spec.head_dim,
            "tokens": tokens, "dtype": str(dtype).removeprefix("torch."), "model": spec.name,
            "layers": spec.layers, "hidden": spec.hidden, "ms": med,
            "ms_all": [round(t, 3) for t in times[name]],
            "tflops": None, "peak_mem_mb": None, "tokens_per_s": B / (med * 1e-3), "ref": "peft_sdpa",
            "agree": same, "speedup_paired": paired_speedup(times["peft_sdpa"], times[name]),
            "speedup_paired_vs": "peft_sdpa", "status": "ok", "reason": None,
        })
        log(f"{name:>12} {tokens} greedy tokens B={B} after a prompt of {prompt}: {med:.2f} ms/token"
            + ("" if same else "  ** GENERATES OTHER TOKENS **"))
    free_memory(device)
    return records


# ---------------------------------------------------------------------------------------------------
# python -m bench train_step
# ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """One training-step configuration from the command line, its records written as JSON."""
    from .env import environment

    ap = argparse.ArgumentParser(prog="python -m bench train_step", description=main.__doc__)
    ap.add_argument("--model", choices=sorted(MODELS), default="cpu",
                    help="cpu: issue 18's CPU sizes; wide512: head dim 512 (GPU); gpu: the GPU suite's model")
    ap.add_argument("--batch", type=int, default=None, help="default: 4 (2 for wide512)")
    ap.add_argument("--seq", type=int, nargs="+", default=None, help="sequence lengths (default per model)")
    ap.add_argument("--prefix", type=int, default=None, help="P (default 16 on CPU, 64 on GPU)")
    ap.add_argument("--providers", default=None, help=f"comma-separated subset of {','.join(PROVIDERS)}")
    ap.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"))
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=9, help="timed steps (rounds when interleaved)")
    ap.add_argument("--decode", action="store_true", help="also one decode step, PEFT vs prefixattn")
    ap.add_argument("--json", type=Path, default=None, help="write {environment, records} here")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = MODELS[args.model]
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    B = args.batch or (2 if args.model == "wide512" else 4)
    seqs = args.seq or ([2048] if args.model == "wide512" else [256, 1024] if not gpu else [2048])
    P = args.prefix or (64 if gpu else 16)
    providers = tuple(args.providers.split(",")) if args.providers else (PROVIDERS if gpu else CPU_PROVIDERS)
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        ap.error(f"unknown provider(s) {unknown}")
    env = environment(device)
    print(f"train_step on {env['device']} (torch {env['torch']}): {spec.name}, B={B}, S={seqs}, P={P}, "
          f"{dtype}", flush=True)
    records = []
    for S in seqs:
        records += run_config(spec, B, S, P, device, dtype, args.backend, args.warmup, args.steps,
                              providers=providers, interleave=not gpu)
    if args.decode:
        records += run_decode(spec, B, min(seqs), P, device, dtype, args.backend, rounds=max(args.steps, 11))
        records += run_decode_tokens(spec, B, min(seqs), P, device, dtype, args.backend,
                                     rounds=max(args.steps // 2, 5))
    ok = all(r["status"] in ("ok", "skipped") and r.get("agree", True) is not False for r in records)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        command = "python -m bench train_step " + " ".join(sys.argv[1:] if argv is None else argv)
        doc = {**env, "command": command, "records": records}
        args.json.write_text(json.dumps(doc, indent=1))
        print(f"wrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
