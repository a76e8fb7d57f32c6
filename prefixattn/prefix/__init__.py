"""The trainable prefix layer: the ``PrefixKV`` module and its config, finding it in a model, and its
file formats (prefixattn's own ``save_prefix``/``load_prefix``, PEFT's adapter format ``save_peft``).

It knows nothing about transformers: the patcher (``prefixattn.hf``) builds on it, never the reverse.

    config.py       PrefixConfig (the prefix's shape; an encoder-decoder's sites), PeftLayout (PEFT's shape
                    for a model), check_prefix_id
    module.py       PrefixKV, MODULE_NAME (the submodule a patched model carries), find_prefix,
                    active_copy (through PEFT's modules_to_save wrapper)
    heads.py        the task head that trains with the prefix (PEFT's modules_to_save), in both files
    peft_rows.py    PEFT's flat (P, L*2*Hkv*D) row layout <-> ours (L, 2, N, Hkv, P, D)
    files.py        atomic writes, safetensors reading with clear errors
    native.py       save_prefix / load_prefix
    peft_format.py  save_peft, read_peft_adapter, adapter shape checks (PREFIX_TUNING and CARTRIDGE)
    cartridge_format.py  compose_cartridges (concatenating PEFT CARTRIDGE adapters or prefix files)
"""

from __future__ import annotations

from .cartridge_format import compose_cartridges
from .config import ROLES, SITES, PeftLayout, PrefixConfig, SiteKey, check_prefix_id
from .heads import PEFT_PREFIX, head_problems, load_head_tensors
from .module import MODULE_NAME, PrefixKV, active_copy, find_prefix, find_prefix_owner
from .native import load_prefix, save_prefix
from .peft_format import (
    check_adapter_for,
    check_against_peft_config,
    peft_format_problems,
    peft_layout,
    read_peft_adapter,
    save_peft,
)
from .peft_rows import kv_to_peft_rows, peft_rows_to_kv

__all__ = [
    "MODULE_NAME",
    "PEFT_PREFIX",
    "ROLES",
    "SITES",
    "PeftLayout",
    "PrefixConfig",
    "PrefixKV",
    "SiteKey",
    "active_copy",
    "check_adapter_for",
    "check_against_peft_config",
    "check_prefix_id",
    "compose_cartridges",
    "find_prefix",
    "find_prefix_owner",
    "head_problems",
    "kv_to_peft_rows",
    "load_head_tensors",
    "load_prefix",
    "peft_format_problems",
    "peft_layout",
    "peft_rows_to_kv",
    "read_peft_adapter",
    "save_peft",
    "save_prefix",
]
