"""The serving tests' model, prefixes and reference, built offline in the main environment.

The model is a tiny Llama with head size 32 (vLLM's CPU attention needs >= 32) and the byte-level
ByT5 tokenizer (no files to download) with a small chat template, saved with save_pretrained. The prefixes
cover every adapter kind the server reads: a PEFT adapter (prefixattn.save_peft), a prefixattn file, the
same file under a second name, a bank of two, an MLP-reparameterized prefix. Two prefixes have 37 tokens
(longer than a 32-token KV block, and equal in length, so only their cache salts keep their blocks apart).

The reference is transformers + prefixattn: the patched model with the prefix loaded by prefixattn's own
loaders (load_peft, load_prefix), greedy decoding by full forwards without a KV cache (argmax of the last
position, every step), so it shares nothing with vLLM's paged cache or with the server's adapter reading.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

import prefixattn

VOCAB = 259  # the byte tokenizer's size: the model can only produce ids the tokenizer decodes
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")
BLOCK_SIZE = 32


def tokenizer():
    from transformers import ByT5Tokenizer

    tok = ByT5Tokenizer(extra_ids=0)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def model_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
                       tie_word_embeddings=False, initializer_range=0.15, bos_token_id=None, eos_token_id=1,
                       pad_token_id=0)


def base_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@dataclass(frozen=True)
class Fixture:
    root: Path
    model_dir: Path
    prefix_args: list[str]  # NAME=PATH for prefixattn serve
    loaders: dict[str, tuple]  # served name -> how the reference loads it


def build(root: Path) -> Fixture:
    """Write the model and the adapters under ``root`` (deterministic: seeded)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # xdist workers share the cores: oversubscribed OpenMP threads spin
    try:
        _build(root)
    finally:
        torch.set_num_threads(threads)
    return load(root)


def _build(root: Path) -> None:
    from transformers import LlamaForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    model_dir = root / "model"
    torch.manual_seed(1234)
    LlamaForCausalLM(model_config()).save_pretrained(model_dir)
    tokenizer().save_pretrained(model_dir)

    def patched(**kw):
        return prefixattn.patch(base_model(model_dir), backend="torch", **kw)

    torch.manual_seed(1)
    prefixattn.save_peft(patched(num_prefix_tokens=37), root / "peft37")
    torch.manual_seed(2)
    prefixattn.save_prefix(patched(num_prefix_tokens=37), root / "file37.safetensors")
    torch.manual_seed(3)
    prefixattn.save_prefix(patched(num_prefix_tokens=8, num_prefixes=2), root / "bank8.safetensors")
    torch.manual_seed(4)
    prefixattn.save_prefix(patched(num_prefix_tokens=5, prefix_projection=True, projection_hidden_size=48),
                           root / "proj5.safetensors")
    (root / "fixture.json").write_text(json.dumps({"built": True}))


def load(root: Path) -> Fixture:
    """The fixture ``build`` wrote under ``root``."""
    prefix_args = [f"peft37={root / 'peft37'}", f"file37={root / 'file37.safetensors'}",
                   f"same37={root / 'file37.safetensors'}", f"bank8={root / 'bank8.safetensors'}",
                   f"proj5={root / 'proj5.safetensors'}"]
    loaders = {
        "peft37": ("peft", root / "peft37", {}, None),
        "file37": ("file", root / "file37.safetensors", {"num_prefix_tokens": 37}, None),
        "same37": ("file", root / "file37.safetensors", {"num_prefix_tokens": 37}, None),
        "bank8/0": ("file", root / "bank8.safetensors", {"num_prefix_tokens": 8, "num_prefixes": 2}, 0),
        "bank8/1": ("file", root / "bank8.safetensors", {"num_prefix_tokens": 8, "num_prefixes": 2}, 1),
        "proj5": ("file", root / "proj5.safetensors",
                  {"num_prefix_tokens": 5, "prefix_projection": True, "projection_hidden_size": 48}, None),
    }
    return Fixture(root, root / "model", prefix_args, loaders)


class Reference:
    """Greedy decoding with transformers + prefixattn, one patched model per served name."""

    def __init__(self, fixture: Fixture) -> None:
        self.fixture = fixture
        self._models: dict[str | None, tuple] = {}
        self._done: dict[tuple, tuple[list[int], list[float]]] = {}

    def _model(self, name: str | None):
        if name not in self._models:
            base = base_model(self.fixture.model_dir)
            if name is None:
                self._models[name] = (base, None)
            else:
                kind, path, kw, entry = self.fixture.loaders[name]
                if kind == "peft":
                    model = prefixattn.load_peft(base, path, backend="torch")
                else:
                    model = prefixattn.patch(base, backend="torch", init="zeros", **kw)
                    prefixattn.load_prefix(model, path)
                self._models[name] = (model.eval(), entry)
        return self._models[name]

    def greedy(self, name: str | None, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
        """(generated ids, their log-probabilities), EOS ignored, no KV cache (memoized)."""
        key = (name, tuple(prompt), max_tokens)
        if key not in self._done:
            self._done[key] = self._greedy(name, prompt, max_tokens)
        return self._done[key]

    @torch.no_grad()
    def _greedy(self, name: str | None, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
        model, entry = self._model(name)
        ids = list(prompt)
        out, logprobs = [], []
        for _ in range(max_tokens):
            kwargs = {} if entry is None else {"prefix_ids": torch.tensor([entry])}
            logits = model(input_ids=torch.tensor([ids]), **kwargs).logits[0, -1].double()
            token = int(logits.argmax())
            out.append(token)
            logprobs.append(float(torch.log_softmax(logits, -1)[token]))
            ids.append(token)
        return out, logprobs
