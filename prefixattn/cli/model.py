"""The base model and tokenizer of ``prefixattn train``: the embedded demo model (no download: a tiny
Llama-style model built from a config with seeded weights and transformers' ByT5Tokenizer, which is
byte-level and needs no files), or a local Hugging Face model directory, checked before loading."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def byte_tokenizer() -> Any:
    """UTF-8 bytes as ids 3..258, pad 0, eos 1, unk 2 (transformers' ByT5Tokenizer; no files)."""
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer(extra_ids=0)


def tiny_llama_config(vocab_size: int) -> Any:
    """The embedded model: Llama-style, 2 layers, hidden 64, 4 query / 2 KV heads."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        # larger than the usual 0.02 so a random model's logits are not all near zero
        initializer_range=0.15,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=0,
    )


def check_model_dir(model_dir: str) -> None:
    """A clear error for a path that is not a loadable local model directory."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ValueError(f"--model {model_dir}: no such directory (a local Hugging Face model directory)")
    if not (path / "config.json").is_file():
        raise ValueError(f"--model {model_dir}: not a local Hugging Face model directory (no config.json)")
    if not any((path / f).is_file() for f in WEIGHT_FILES) and not any(path.glob("*.safetensors")):
        raise ValueError(f"--model {model_dir}: has a config.json but no weights "
                         f"(none of {', '.join(WEIGHT_FILES)})")


def build_base_model(model_dir: str | None, dtype: str, seed: int,
                     auto_class: str = "AutoModelForCausalLM") -> tuple[Any, Any]:
    """(frozen base model, tokenizer). The embedded model's weights are a function of the seed, so
    every process of a distributed run, and a resumed run, builds the same one. ``auto_class``: the
    transformers Auto class that loads ``model_dir`` (``kinds.AUTO_CLASS``)."""
    import transformers
    from transformers import LlamaForCausalLM

    if model_dir is None:
        tokenizer = byte_tokenizer()
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_llama_config(len(tokenizer))).to(DTYPES[dtype])
        return model, tokenizer
    check_model_dir(model_dir)
    model = getattr(transformers, auto_class).from_pretrained(model_dir, dtype=DTYPES[dtype])
    return model, load_tokenizer(model_dir, model)


def load_tokenizer(model_dir: str, model: Any) -> Any:
    """The model directory's tokenizer, or the byte tokenizer when it has none and the vocab allows it."""
    if any(Path(model_dir, f).is_file() for f in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
        return tok
    tok = byte_tokenizer()
    if model.config.vocab_size >= len(tok):
        return tok
    raise ValueError(f"--model {model_dir} has no tokenizer files and its vocabulary "
                     f"({model.config.vocab_size}) is too small for byte tokens ({len(tok)})")
