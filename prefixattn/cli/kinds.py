"""What ``prefixattn train --model DIR`` trains, by the model's kind: a causal LM (``{"text"}`` or
``{"prompt", "completion"}`` lines, ``data.py``), an encoder-decoder (``{"prompt", "completion"}``: the
prompt is the encoder's input, the completion the decoder's target), or a sequence classifier
(``{"text", "label"}``: the label an int, or one of the config's ``label2id`` names). For each: the
model's Auto class, how a JSONL line becomes an example, the collator, and the evaluation metric.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..tasks import IGNORE

KINDS = ("causal", "seq2seq", "classifier")
DESCRIBED = {"causal": "a causal LM", "seq2seq": "an encoder-decoder", "classifier": "a sequence classifier"}
AUTO_CLASS = {"causal": "AutoModelForCausalLM", "seq2seq": "AutoModelForSeq2SeqLM",
              "classifier": "AutoModelForSequenceClassification"}


def model_kind(model_dir: str | None) -> str:
    """The kind of a local model directory, from its config.json (the embedded demo: causal)."""
    if model_dir is None:
        return "causal"
    config = json.loads((Path(model_dir) / "config.json").read_text())
    if config.get("is_encoder_decoder"):
        return "seq2seq"
    if any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or ()):
        return "classifier"
    return "causal"


def _string(row: dict, name: str, where: str, shape: str) -> str:
    if name not in row:
        found = ", ".join(repr(k) for k in row) or "none"
        raise ValueError(f"{where}: missing field {name!r} (fields: {found}); lines are {shape}")
    if not isinstance(row[name], str):
        raise ValueError(f"{where}: field {name!r} must be a string, got {type(row[name]).__name__}")
    return row[name]


def encode_seq2seq_row(row: Any, tokenizer: Any, max_len: int, where: str) -> dict[str, list[int]]:
    """A ``{"prompt", "completion"}`` line: the prompt's ids (the encoder's input) and the completion's
    (the decoder's labels), each with the tokenizer's special tokens, cut to ``max_len``."""
    shape = '{"prompt": str, "completion": str}'
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object ({shape}), got {type(row).__name__}")
    prompt, completion = _string(row, "prompt", where, shape), _string(row, "completion", where, shape)
    ids = tokenizer(prompt)["input_ids"][:max_len]
    labels = tokenizer(text_target=completion)["input_ids"][:max_len]
    if not ids or not labels:
        raise ValueError(f"{where}: an empty prompt or completion")
    return {"input_ids": ids, "labels": labels}


def classifier_encoder(config: Any) -> Any:
    """The line encoder of a sequence classifier with this config (its labels: ints or label2id names)."""
    num_labels = int(config.num_labels)
    names = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}

    def encode(row: Any, tokenizer: Any, max_len: int, where: str) -> dict[str, Any]:
        shape = '{"text": str, "label": int or a label name}'
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object ({shape}), got {type(row).__name__}")
        text = _string(row, "text", where, shape)
        if "label" not in row:
            raise ValueError(f"{where}: missing field 'label' (lines are {shape})")
        label = row["label"]
        if isinstance(label, str) and label in names:
            label = names[label]
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < num_labels:
            raise ValueError(f"{where}: label {row['label']!r} is not one of the model's {num_labels} labels "
                             f"(0..{num_labels - 1}" + (f" or {sorted(names)}" if names else "") + ")")
        ids = tokenizer(text)["input_ids"][:max_len]
        if not ids:
            raise ValueError(f"{where}: an empty text")
        return {"input_ids": ids, "labels": label}

    return encode


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out


class EncoderCollator:
    """Right-pads input_ids (attention_mask); labels: padded with IGNORE (an encoder-decoder's targets: the
    model shifts them into its decoder inputs) or one per row (a classifier)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = _pad([f["input_ids"] for f in features], self.pad)
        mask = _pad([[1] * len(f["input_ids"]) for f in features], 0)
        labels = [f["labels"] for f in features]
        label_tensor = _pad(labels, IGNORE) if isinstance(labels[0], list) else torch.tensor(labels)
        return {"input_ids": ids, "attention_mask": mask, "labels": label_tensor}


def seq2seq_accuracy(pred: Any) -> dict[str, float]:
    """Target-token accuracy of an encoder-decoder: its logits line up with the labels (no shift)."""
    preds, labels = np.asarray(pred.predictions), np.asarray(pred.label_ids)
    valid = labels != IGNORE
    return {"accuracy": float((preds == labels)[valid].mean()) if valid.any() else float("nan")}


def classifier_accuracy(pred: Any) -> dict[str, float]:
    preds, labels = np.asarray(pred.predictions), np.asarray(pred.label_ids)
    return {"accuracy": float((preds.reshape(-1) == labels.reshape(-1)).mean())}


def line_encoder(kind: str, model: Any) -> Any:
    """How a JSONL line becomes an example for a model of this kind (None: the causal LM's)."""
    if kind == "seq2seq":
        return encode_seq2seq_row
    if kind == "classifier":
        return classifier_encoder(model.config)
    return None


def metric(kind: str, causal: Any) -> Any:
    """The evaluation's accuracy for this kind (``causal``: the causal LM's next-token accuracy)."""
    return {"seq2seq": seq2seq_accuracy, "classifier": classifier_accuracy}.get(kind, causal)


def check_options(kind: str, data: str | None, packing: bool) -> None:
    if kind == "causal":
        return
    what = "an encoder-decoder" if kind == "seq2seq" else "a sequence classifier"
    if data is None:
        lines = '{"prompt", "completion"}' if kind == "seq2seq" else '{"text", "label"}'
        raise ValueError(f"--model is {what}: pass --data FILE.jsonl with {lines} lines (the built-in task "
                         "is for causal LMs)")
    if packing:
        raise ValueError(f"--packing is for causal LMs; --model is {what}")
