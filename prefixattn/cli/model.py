"""The base model and tokenizer of ``prefixattn train``: the embedded demo model (no download: a tiny
Llama-style model built from a config with seeded weights and transformers' ByT5Tokenizer, which is
byte-level and needs no files), or a local Hugging Face model directory, checked before loading, with its
own tokenizer or the one ``--tokenizer`` names (never the byte tokenizer: token ids mean what the model
was trained on, so a model without tokenizer files is refused rather than fed byte ids)."""

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


def has_tokenizer_files(directory: str) -> bool:
    return any(Path(directory, f).is_file() for f in TOKENIZER_FILES)


def check_tokenizer_source(model_dir: str | None, tokenizer_dir: str | None) -> None:
    """Where the tokenizer of a run comes from, checked before anything loads: the demo's byte tokenizer
    (no --model, no --tokenizer), --tokenizer DIR, or the --model directory's own files."""
    if tokenizer_dir is not None:
        if model_dir is None:
            raise ValueError("--tokenizer is for --model: the embedded demo model has its own byte-level "
                             "tokenizer")
        if not Path(tokenizer_dir).is_dir():
            raise ValueError(f"--tokenizer {tokenizer_dir}: no such directory (a local tokenizer directory, "
                             "as tokenizer.save_pretrained writes)")
        if not has_tokenizer_files(tokenizer_dir):
            raise ValueError(f"--tokenizer {tokenizer_dir}: no tokenizer files (none of "
                             f"{', '.join(TOKENIZER_FILES)})")
        return
    if model_dir is not None and not has_tokenizer_files(model_dir):
        files = ", ".join(TOKENIZER_FILES)
        raise ValueError(f"--model {model_dir} has no tokenizer files (none of {files}), "
                         "and token ids only mean something to the model in its own tokenizer: pass "
                         "--tokenizer DIR (the directory of the tokenizer the model was trained with), or "
                         f"save that tokenizer into {model_dir} (tokenizer.save_pretrained)")


def build_base_model(model_dir: str | None, dtype: str, seed: int,
                     auto_class: str = "AutoModelForCausalLM",
                     tokenizer_dir: str | None = None) -> tuple[Any, Any]:
    """(frozen base model, tokenizer). The embedded model's weights are a function of the seed, so
    every process of a distributed run, and a resumed run, builds the same one. ``auto_class``: the
    transformers Auto class that loads ``model_dir`` (``kinds.AUTO_CLASS``); ``tokenizer_dir``: where
    the tokenizer is, when not in ``model_dir``."""
    import transformers
    from transformers import LlamaForCausalLM

    if model_dir is None:
        tokenizer = byte_tokenizer()
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_llama_config(len(tokenizer))).to(DTYPES[dtype])
        return model, tokenizer
    check_model_dir(model_dir)
    check_tokenizer_source(model_dir, tokenizer_dir)
    model = getattr(transformers, auto_class).from_pretrained(model_dir, dtype=DTYPES[dtype])
    return model, load_tokenizer(tokenizer_dir or model_dir, model)


def load_tokenizer(directory: str, model: Any) -> Any:
    """The tokenizer saved in ``directory`` (checked by ``check_tokenizer_source``), with a pad token, and
    no ids beyond the model's vocabulary."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tok) > vocab:
        raise ValueError(f"the tokenizer in {directory} has {len(tok)} tokens, more than the model's "
                         f"{vocab} embeddings: it is not this model's tokenizer")
    return tok
