"""``prefixattn train``: prefix-tune a causal LM, with eval, checkpoints, resume and a loss plot.

Default job (no download, runs anywhere in seconds): a tiny Llama-style model built from a config
with seeded random weights, and the built-in successor task (``prefixattn.tasks``). Or a local HF
model directory (``--model``) and a JSONL dataset (``--data``).

Output directory layout::

    OUT/base_model/          the embedded base model (so OUT is self-contained; absent with --model)
    OUT/checkpoint/adapter/  the prefix as a PEFT prefix-tuning adapter (prefixattn.save_peft)
    OUT/checkpoint/prefix.safetensors     the exact trainable prefix (prefixattn.save_prefix)
    OUT/checkpoint/optimizer.safetensors  AdamW moments and the torch RNG state
    OUT/checkpoint/state.json             step, loss history, the run's settings
    OUT/loss.png             train and eval loss against step

No pickle anywhere. ``--resume`` reloads the checkpoint and continues at the next step; batches are a
function of (seed, step), so a resumed run sees the same data as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .progress import Progress
from .tasks import ByteTokenizer, HFTokenizer, JsonlDataset, SuccessorTask

STATE_VERSION = 1
# settings that must match between a checkpoint and a resumed run
RESUME_KEYS = (
    "model",
    "data",
    "num_prefix_tokens",
    "prefix_projection",
    "seed",
    "seq_len",
    "batch_size",
    "lr",
    "dtype",
)


@dataclass
class TrainConfig:
    """Settings of one training run (the CLI flags)."""

    out: str = "runs/prefixattn-train"
    model: str | None = None
    data: str | None = None
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 32
    max_len: int = 256
    num_prefix_tokens: int = 16
    prefix_projection: bool = False
    lr: float = 3e-2
    weight_decay: float = 0.0
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 100
    seed: int = 0
    backend: str = "auto"
    device: str | None = None
    dtype: str = "float32"
    resume: bool = False
    overwrite: bool = False
    plot: bool = True

    def check(self) -> None:
        for name in ("steps", "batch_size", "num_prefix_tokens", "eval_every", "save_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.model is not None and not Path(self.model, "config.json").is_file():
            raise ValueError(
                f"--model {self.model}: not a local Hugging Face model directory (no config.json)"
            )
        if self.data is not None and not Path(self.data).is_file():
            raise ValueError(f"--data {self.data}: no such file")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other")
        if self.backend not in ("auto", "triton", "torch"):
            raise ValueError(f"--backend must be auto, triton or torch, got {self.backend!r}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise ValueError(
                    f"--device {self.device!r} is not a torch device (cpu, cuda, cuda:1, ...)"
                ) from None


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# what a run writes into OUT (and all that --overwrite deletes)
OUTPUTS = ("base_model", "checkpoint", "checkpoint.tmp", "checkpoint.old", "loss.png", "loss.tmp.png")


@dataclass
class History:
    train: list[list[float]] = field(default_factory=list)  # [step, loss, tokens/s]
    eval: list[list[float]] = field(default_factory=list)  # [step, loss, accuracy]


# ---------------------------------------------------------------------------------------------
# model and data
# ---------------------------------------------------------------------------------------------


def tiny_llama_config() -> Any:
    """The embedded model: Llama-style, 2 layers, hidden 64, 4 query / 2 KV heads, byte vocabulary."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=ByteTokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        # larger than the usual 0.02 so a random model's logits are not all near zero
        initializer_range=0.15,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
    )


def build_base_model(cfg: TrainConfig, out: Path) -> tuple[Any, Any]:
    """The frozen base model and its tokenizer. The embedded one is saved to OUT/base_model once and
    reloaded from there on resume, so the frozen weights are the same."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    dtype = DTYPES[cfg.dtype]
    if cfg.model is None:
        saved = out / "base_model"
        if cfg.resume and (saved / "config.json").is_file():
            model = LlamaForCausalLM.from_pretrained(saved, dtype=dtype)
        else:
            torch.manual_seed(cfg.seed)
            model = LlamaForCausalLM(tiny_llama_config()).to(dtype)
            model.save_pretrained(saved)
        return model, ByteTokenizer()
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype)
    return model, load_tokenizer(cfg.model, model)


def load_tokenizer(model_dir: str, model: Any) -> Any:
    """The model directory's tokenizer, or the byte tokenizer when it has none and the vocab allows it."""
    has_tok = any(
        Path(model_dir, f).is_file()
        for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    )
    if has_tok:
        from transformers import AutoTokenizer

        return HFTokenizer(AutoTokenizer.from_pretrained(model_dir))
    if model.config.vocab_size >= ByteTokenizer.vocab_size:
        return ByteTokenizer()
    raise ValueError(
        f"--model {model_dir} has no tokenizer files and its vocabulary ({model.config.vocab_size}) "
        f"is too small for byte tokens ({ByteTokenizer.vocab_size})"
    )


def build_task(cfg: TrainConfig, tokenizer: Any, model: Any) -> Any:
    if cfg.data is not None:
        return JsonlDataset(cfg.data, tokenizer, max_len=cfg.max_len, seed=cfg.seed)
    vocab = model.config.vocab_size
    if vocab >= ByteTokenizer.vocab_size:
        return SuccessorTask(seed=cfg.seed, seq_len=cfg.seq_len, bos_token_id=ByteTokenizer.bos_token_id)
    if vocab < 20:
        raise ValueError(f"the model's vocabulary ({vocab}) is too small for the built-in task")
    # a small-vocabulary model: letters become ids 3..18, BOS is id 1
    return SuccessorTask(seed=cfg.seed, seq_len=cfg.seq_len, bos_token_id=1, first_token=3)


# ---------------------------------------------------------------------------------------------
# checkpoints (safetensors + json, no pickle)
# ---------------------------------------------------------------------------------------------


def save_checkpoint(
    out: Path, model: Any, opt: torch.optim.Optimizer, step: int, history: History, cfg: TrainConfig
) -> Path:
    """Write OUT/checkpoint atomically (a temporary directory renamed over the old one)."""
    from safetensors.torch import save_file

    import prefixattn

    final, tmp = out / "checkpoint", out / "checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    prefixattn.save_peft(model, tmp / "adapter")
    prefixattn.save_prefix(model, tmp / "prefix.safetensors")
    sd = opt.state_dict()
    tensors = {"rng.torch": torch.get_rng_state()}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"state.{idx}.{name}"] = t.detach().cpu().contiguous()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    state = {
        "version": STATE_VERSION,
        "step": step,
        "config": asdict(cfg),
        "history": asdict(history),
        "param_groups": sd["param_groups"],
    }
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    old = out / "checkpoint.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    out: Path, model: Any, opt: torch.optim.Optimizer, cfg: TrainConfig
) -> tuple[int, History]:
    """Restore the prefix, the optimizer and the RNG from OUT/checkpoint; returns (step, history)."""
    from safetensors.torch import load_file

    import prefixattn

    ckpt = out / "checkpoint"
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot resume: {ckpt / 'state.json'} is missing or unreadable ({e})") from None
    saved = state.get("config", {})
    diff = [
        f"{k}: checkpoint {saved.get(k)!r}, now {getattr(cfg, k)!r}"
        for k in RESUME_KEYS
        if saved.get(k) != getattr(cfg, k)
    ]
    if diff:
        raise ValueError("cannot resume with different settings:\n  " + "\n  ".join(diff))
    prefixattn.load_prefix(model, ckpt / "prefix.safetensors")
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith("state."):
            _, idx, name = key.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = t
    opt.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    h = state["history"]
    return int(state["step"]), History(train=h["train"], eval=h["eval"])


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: Any, task: Any, cfg: TrainConfig, device: torch.device) -> tuple[float, float]:
    """Mean loss and next-token accuracy over the held-out batches."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for i in range(cfg.eval_batches):
        b = task.batch(i, cfg.batch_size, split="eval").to(device)
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1].float()
        target = b.labels[:, 1:]
        valid = target != -100
        loss_sum += float(torch.nn.functional.cross_entropy(logits[valid], target[valid], reduction="sum"))
        correct += int((logits.argmax(-1) == target)[valid].sum())
        count += int(valid.sum())
    model.train(was_training)
    return loss_sum / max(count, 1), correct / max(count, 1)


def train(cfg: TrainConfig, log: Any = print) -> dict[str, Any]:
    """Run (or resume) a training job; returns a summary. Raises ValueError on bad settings."""
    import prefixattn

    cfg.check()
    out = Path(cfg.out)
    has_ckpt = (out / "checkpoint" / "state.json").is_file()
    if has_ckpt and not (cfg.resume or cfg.overwrite):
        raise ValueError(
            f"{out} already holds a checkpoint: pass --resume to continue it or --overwrite to start again"
        )
    if cfg.resume and not has_ckpt:
        raise ValueError(f"--resume: no checkpoint in {out}")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is available")
    if cfg.overwrite and out.exists():
        # only what a run writes: OUT may be a directory holding other things
        for name in OUTPUTS:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)

    base, tokenizer = build_base_model(cfg, out)
    base.to(device)
    task = build_task(cfg, tokenizer, base)
    model = prefixattn.patch(
        base,
        num_prefix_tokens=cfg.num_prefix_tokens,
        prefix_projection=cfg.prefix_projection,
        backend=cfg.backend,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    history, start = History(), 0
    if cfg.resume:
        start, history = load_checkpoint(out, model, opt, cfg)
        if start > cfg.steps:
            raise ValueError(
                f"--resume: the checkpoint is already at step {start}, past --steps {cfg.steps}; "
                f"pass a larger --steps to train further"
            )
        log(f"resumed from {out / 'checkpoint'} at step {start}")
    n_params = sum(p.numel() for p in params)
    log(
        f"{task.describe()}\nmodel: {type(base).__name__} ({cfg.model or 'embedded tiny Llama'}), "
        f"{cfg.dtype}, on {device}; prefix: P={cfg.num_prefix_tokens}, {n_params} trainable parameters"
    )
    if start == 0:
        ev = evaluate(model, task, cfg, device)
        history.eval.append([0, *ev])
        log(f"step 0: eval loss {ev[0]:.4f}, accuracy {ev[1]:.1%}")

    model.train()
    bar = Progress(range(start + 1, cfg.steps + 1), desc="train")
    t_tokens, t_time = 0, 0.0
    step = done = start
    try:
        for step in bar:
            b = task.batch(step, cfg.batch_size).to(device)
            t0 = time.perf_counter()
            loss = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss
            loss.backward()
            opt.step()
            done = step
            opt.zero_grad(set_to_none=True)
            lv = float(loss.detach())
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            tokens = int(b.attention_mask.sum())
            t_tokens, t_time = t_tokens + tokens, t_time + dt
            history.train.append([step, lv, tokens / dt])
            bar.set(loss=lv, tok_s=round(tokens / dt))
            if not math.isfinite(lv):
                raise FloatingPointError(f"loss became {lv} at step {step}")
            if step % cfg.eval_every == 0 or step == cfg.steps:
                ev = evaluate(model, task, cfg, device)
                history.eval.append([step, *ev])
                bar.write(f"step {step}: train loss {lv:.4f}, eval loss {ev[0]:.4f}, accuracy {ev[1]:.1%}")
            if step % cfg.save_every == 0 or step == cfg.steps:
                save_checkpoint(out, model, opt, step, history, cfg)
    except KeyboardInterrupt:
        bar.close()
        history.train = [r for r in history.train if r[0] <= done]
        save_checkpoint(out, model, opt, done, history, cfg)
        log(f"interrupted: checkpoint saved at step {done}; continue with --resume")
        raise
    plot_path = plot_history(history, out / "loss.png") if cfg.plot else None
    first, last = history.eval[0], history.eval[-1]
    summary = {
        "out": str(out),
        "step": step,
        "eval_loss_start": first[1],
        "eval_loss": last[1],
        "eval_accuracy_start": first[2],
        "eval_accuracy": last[2],
        "tokens_per_s": t_tokens / t_time if t_time else None,
        "plot": str(plot_path) if plot_path else None,
        "checkpoint": str(out / "checkpoint"),
    }
    log(
        f"done: eval loss {first[1]:.4f} -> {last[1]:.4f}, accuracy {first[2]:.1%} -> {last[2]:.1%}"
        + (f", {summary['tokens_per_s']:.0f} tokens/s" if summary["tokens_per_s"] else "")
    )
    log(
        f"checkpoint (PEFT adapter + prefix): {out / 'checkpoint'}"
        + (f"; loss curve: {plot_path}" if plot_path else "")
    )
    return summary


def plot_history(history: History, path: Path) -> Path | None:
    """Train and eval loss against step, as a PNG (None if matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    if history.train:
        ax.plot([r[0] for r in history.train], [r[1] for r in history.train], lw=1, label="train loss")
    if history.eval:
        ax.plot([r[0] for r in history.eval], [r[1] for r in history.eval], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("prefix tuning: loss")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
