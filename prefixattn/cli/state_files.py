"""The Trainer's resume state without pickle: optimizer, LR scheduler, gradient scaler and RNG states as
safetensors (the tensors) and JSON (everything else), written atomically.

transformers' Trainer writes these with ``torch.save`` (optimizer.pt, scheduler.pt, scaler.pt,
rng_state.pth). ``PrefixTrainer`` writes these files instead (DeepSpeed and FSDP keep their own
checkpoint formats):

    optimizer.safetensors   every per-parameter state tensor as ``state.<param index>.<name>``; the
                            param groups and non-tensor state values in the metadata (JSON)
    scheduler.json          the LR scheduler's state dict
    scaler.json             the fp16 gradient scaler's state dict (only with one)
    rng_state[_<rank>].safetensors   Python, NumPy, torch CPU (and CUDA) generator states
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..prefix.files import atomic_write, read_tensors, save_tensors

OPTIMIZER_FILE = "optimizer.safetensors"
SCHEDULER_FILE = "scheduler.json"
SCALER_FILE = "scaler.json"


def rng_file(process_index: int | None) -> str:
    return "rng_state.safetensors" if process_index is None else f"rng_state_{process_index}.safetensors"


def _json(data: Any, what: str) -> str:
    try:
        return json.dumps(data, sort_keys=True)
    except TypeError as e:
        raise TypeError(f"the {what} holds a value JSON cannot store ({e}); prefixattn's checkpoints hold no "
                        "pickles") from e


def write_json(path: Path, data: Any, what: str) -> None:
    text = _json(data, what)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot resume: {path} is unreadable ({e})") from None


# ---------------------------------------------------------------------------------------------------
# optimizer
# ---------------------------------------------------------------------------------------------------


def save_optimizer(state_dict: dict[str, Any], path: Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state_dict["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    metadata = {"format": "prefixattn-optimizer",
                "param_groups": _json(state_dict["param_groups"], "optimizer"),
                "scalars": _json(scalars, "optimizer state"),
                "indices": _json(sorted(state_dict["state"]), "optimizer state")}
    save_tensors(path, tensors, metadata)


def load_optimizer(path: Path) -> dict[str, Any]:
    tensors, metadata = read_tensors(path, "optimizer state")
    if metadata.get("format") != "prefixattn-optimizer":
        raise ValueError(f"cannot resume: {path} is not a prefixattn optimizer state file")
    state: dict[int, dict[str, Any]] = {int(i): {} for i in json.loads(metadata["indices"])}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state[int(index)][name] = value
    for index, values in json.loads(metadata["scalars"]).items():
        state[int(index)].update(values)
    groups = json.loads(metadata["param_groups"])
    for group in groups:  # JSON has no tuples; the optimizers' own defaults use them
        for key in ("betas",):
            if isinstance(group.get(key), list):
                group[key] = tuple(group[key])
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------------------------------------
# random number generators
# ---------------------------------------------------------------------------------------------------


def save_rng_states(path: Path) -> None:
    version, mt, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {"python": torch.tensor(mt, dtype=torch.int64),
               "numpy": torch.from_numpy(np_keys.astype(np.int64)),
               "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.random.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    metadata = {"format": "prefixattn-rng",
                "python": _json([version, gauss], "Python RNG state"),
                "numpy": _json([np_kind, int(np_pos), int(np_has_gauss), float(np_gauss)], "NumPy RNG state")}
    save_tensors(path, tensors, metadata)


def load_rng_states(path: Path) -> None:
    tensors, metadata = read_tensors(path, "RNG state")
    if metadata.get("format") != "prefixattn-rng":
        raise ValueError(f"cannot resume: {path} is not a prefixattn RNG state file")
    version, gauss = json.loads(metadata["python"])
    random.setstate((version, tuple(int(x) for x in tensors["python"].tolist()), gauss))
    np_kind, np_pos, np_has_gauss, np_gauss = json.loads(metadata["numpy"])
    np.random.set_state((np_kind, tensors["numpy"].numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.random.set_rng_state(tensors["cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")),
                                       key=lambda k: int(k.split(".")[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.random.set_rng_state_all(cuda[: torch.cuda.device_count()])
