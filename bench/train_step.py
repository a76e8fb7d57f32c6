"""Training-step benchmark: one prefix-tuning job run three ways on the same model.

- ``peft_sdpa``: PEFT prefix tuning with transformers' sdpa attention (prefix as a KV cache, a
  (B, 1, S, P + S) mask, SDPA);
- ``peft_eager``: the same with eager attention (materialized scores);
- ``prefixattn``: ``prefixattn.patch`` of that PEFT model (the same prefix carried over).

The model is a Llama-style config with random weights (bf16 on a GPU; a tiny fp32 one on a CPU).
Each provider starts from the same prefix (restored from a snapshot) and first computes the logits
and loss of a fixed batch before training: ``loss0`` and ``logits0_rel_err`` (relative error of the
logits against the first provider, ``peft_sdpa``) are recorded, and ``agree`` says whether they
match within the dtype's tolerance (the random model is initialized so that the prefix visibly moves
the logits: a provider that dropped or misplaced it would not agree). Then warm-up steps and timed
steps (forward, backward, AdamW on the prefix). Records use the common JSON format with mode
``train_step``; ``ms`` is the median step time, ``tokens_per_s`` = B * S / step time, and
``peak_mem_mb`` is the peak allocated memory over the timed steps, weights included (CUDA only: on a
CPU it is null, not measured).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from .timing import free_memory, is_oom, sync

PROVIDERS = ("peft_sdpa", "peft_eager", "prefixattn")
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

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

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
        )


# ~0.5B parameters: 8 layers of a Llama-3.2-1B-like block (hidden 2048, 32 query / 8 KV heads, D 64)
GPU_MODEL = ModelSpec("llama-8L-2048h-32/8heads", 2048, 8192, 8, 32, 8, 32000)
# larger init than the usual 0.02 so a tiny random model's logits are not all near zero
CPU_MODEL = ModelSpec("llama-2L-64h-4/2heads", 64, 128, 2, 4, 2, 256, init_range=0.15)


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
) -> list[dict[str, Any]]:
    """The three providers on one (model, batch) configuration."""
    import prefixattn

    model, snapshot = peft_prefix_model(spec, P, device, dtype)
    base = model.get_base_model()
    batch = _batch(spec, B, S, device)
    dt = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype]
    records = []
    ref_logits: torch.Tensor | None = None
    ref_name = None
    for provider in PROVIDERS:
        rec: dict[str, Any] = {
            "suite": "train",
            "provider": provider,
            "mode": "train_step",
            "B": B,
            "H": spec.heads,
            "Hkv": spec.kv_heads,
            "S": S,
            "Sq": S,
            "Sk": S,
            "P": P,
            "D": spec.head_dim,
            "dtype": dt,
            "model": spec.name,
            "layers": spec.layers,
            "hidden": spec.hidden,
            "ms": None,
            "tflops": None,
            "peak_mem_mb": None,
            "tokens_per_s": None,
            "loss0": None,
            "logits0_rel_err": None,
            "ref": None,
            "agree": None,
            "status": "ok",
            "reason": None,
        }
        records.append(rec)
        model.prompt_encoder.load_state_dict(snapshot)
        if provider == "peft_eager":
            fits, gib = _eager_fits(spec, B, S, P, device)
            if not fits:
                rec.update(status="skipped", reason=f"would need ~{gib:.0f} GiB for eager attention scores")
                log(f"{provider:>12} B={B} S={S}: skipped ({rec['reason']})")
                continue
        try:
            if provider == "prefixattn":
                target = prefixattn.patch(model, backend=backend)  # carries the PEFT prefix over
            else:
                base.set_attn_implementation("eager" if provider == "peft_eager" else "sdpa")
                target = model
            measured, logits0 = _measure(target, batch, device, warmup, steps)
            rec.update(measured)
            rec["tokens_per_s"] = B * S / (rec["ms"] * 1e-3)
            if ref_logits is None:
                ref_logits, ref_name = logits0, provider
            rec["ref"] = ref_name
            rec["logits0_rel_err"] = _rel_err(logits0, ref_logits)
            rec["agree"] = bool(rec["logits0_rel_err"] <= AGREE_TOL.get(dtype, 5e-2))
            log(
                f"{provider:>12} B={B} S={S}: {rec['ms']:.1f} ms/step, {rec['tokens_per_s']:.0f} tokens/s, "
                f"loss0 {rec['loss0']:.4f}, logits vs {ref_name} {rec['logits0_rel_err']:.1e}"
                + (f", peak {rec['peak_mem_mb']:.0f} MiB" if rec["peak_mem_mb"] is not None else "")
                + ("" if rec["agree"] else "  ** DISAGREES **")
            )
        except Exception as e:
            rec.update(status="oom" if is_oom(e) else "error", reason=f"{type(e).__name__}: {str(e)[:200]}")
            rec["ms"] = None
            log(f"{provider:>12} B={B} S={S}: {rec['status']} ({rec['reason']})")
        finally:
            free_memory(device)
    del model, base
    free_memory(device)
    return records


def run_train_bench(
    device: torch.device, *, quick: bool = False, backend: str = "auto", log: Any = print
) -> list[dict[str, Any]]:
    """All training-step records for this device."""
    if device.type == "cuda":
        spec, dtype, P = GPU_MODEL, torch.bfloat16, 64
        shapes = [(2, 1024)] if quick else [(4, 2048), (1, 8192)]
        warmup, steps = (2, 5) if quick else (3, 10)
    else:
        spec, dtype, P = CPU_MODEL, torch.float32, 8
        shapes, warmup, steps = [(2, 32)], 1, 2
    log(f"# training step: {spec.name}, P={P}, {dtype}")
    records = []
    for B, S in shapes:
        records += run_config(spec, B, S, P, device, dtype, backend, warmup, steps, log)
    return records
