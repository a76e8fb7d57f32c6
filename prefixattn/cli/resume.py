"""``prefixattn train --resume``: a resumed run takes its settings from its checkpoint.

The marker of a complete checkpoint (``checkpoint-N/prefixattn.json``) holds every setting of the run
that wrote it. On ``--resume``, an option left out takes the run's value (not the command's default),
so ``prefixattn train --out DIR --resume`` continues any run. An option given again must agree with the
run, except those that only say how long and how to run (``MAY_CHANGE``); a disagreement is refused
before anything runs, naming each option with both values.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import fields, replace
from typing import Any

# how long and how to run: these may differ from the run's (--steps with a constant LR only:
# a linear or cosine schedule decays over --steps, so another --steps would change the LR mid-run);
# batch_size and grad_accum as long as the global batch stays the run's (checked on its own)
MAY_CHANGE = frozenset({"steps", "eval_every", "save_every", "keep_checkpoints", "report_to", "plot",
                        "backend", "device", "gradient_checkpointing", "batch_size", "grad_accum"})
# what the command does, not what it trains: never taken from the checkpoint
NOT_SETTINGS = frozenset({"out", "resume", "overwrite"})
# settings that are paths: compared (and saved) as absolute paths, so a run resumes from any directory
PATHS = ("model", "tokenizer", "data", "init_text")
DECAYING = ("linear", "cosine")


def flag(name: str) -> str:
    return "--no-plot" if name == "plot" else "--" + name.replace("_", "-")


def shown(name: str, value: Any) -> str:
    if value is None and name in ("model", "data", "tokenizer"):
        return {"model": "the embedded model", "data": "the built-in task",
                "tokenizer": "the model directory's"}[name]
    if name == "plot":
        return "given" if value is False else "not given"
    if isinstance(value, bool):
        return "on" if value else "off"
    return repr(value) if value is None or isinstance(value, str) and not value else str(value)


def absolute(value: str | None) -> str | None:
    return None if value is None else os.path.abspath(value)


def given_by_default(cfg: Any) -> set[str]:
    """For a TrainConfig built in Python: the fields that differ from their defaults count as given."""
    return {f.name for f in fields(cfg) if getattr(cfg, f.name) != f.default}


def settings_for_resume(cfg: Any, saved: dict[str, Any], given: Iterable[str] | None, where: str,
                        world_size: int) -> Any:
    """``cfg`` with every option that was not given taken from the run's ``saved`` settings. Raises
    ValueError naming each given option that conflicts with the run (``where``: its checkpoint)."""
    given = set(given_by_default(cfg) if given is None else given)
    taken: dict[str, Any] = {}
    conflicts = []
    for f in fields(cfg):
        name = f.name
        if name in NOT_SETTINGS or name not in saved:
            continue
        theirs, ours = saved[name], getattr(cfg, name)
        if name in PATHS:
            theirs, ours = absolute(theirs), absolute(ours)
        if name not in given:
            taken[name] = theirs
        elif ours != theirs and name not in MAY_CHANGE:
            conflicts.append(f"{flag(name)} {shown(name, ours)} (the run has {shown(name, theirs)})")
    resumed = replace(cfg, **taken)
    if ("steps" in given and resumed.steps != saved.get("steps", resumed.steps)
            and resumed.lr_schedule in DECAYING):
        conflicts.append(f"--steps {resumed.steps} (the run has {saved['steps']}): its {resumed.lr_schedule} "
                         f"LR schedule decays to 0 at step {saved['steps']}; another --steps would change "
                         f"the LR mid-run")
    global_batch = resumed.batch_size * world_size * resumed.grad_accum
    if "global_batch" in saved and global_batch != saved["global_batch"]:
        processes = f"{world_size} process{'es' if world_size > 1 else ''}"
        conflicts.append(f"global batch {resumed.batch_size} per process x {processes} x "
                         f"{resumed.grad_accum} accumulation = {global_batch} (the run has "
                         f"{saved['global_batch']}): choose "
                         f"--batch-size and --grad-accum so the product is {saved['global_batch']}")
    if conflicts:
        raise ValueError(f"--resume: these options disagree with the run in {where}:\n  "
                         + "\n  ".join(conflicts)
                         + "\nleave them out to keep the run's settings, or start a new run (--overwrite, or "
                           "another --out)")
    return resumed
