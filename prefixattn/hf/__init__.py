"""The transformers integration: prefix-tune a Hugging Face model through the fused prefix attention.

One path: model layer -> transformers AttentionInterface -> ``attention.py`` (reads its layer's entry of
the per-step plan) -> ``prefixattn.prefix_attention``. Each module has one job:

    state.py        PatchState and the names the patcher registers/stores things under
    families.py     which model families are supported, and how each numbers its positions
    verified_families.py  the family sweeps' tables: which families are verified, and how (the README's
                    lists are generated from them)
    plan.py         the per-step plan (prefix computed and cast once, ids checked once, per-layer views)
    hooks.py        the forward pre-hook that builds the plan and numbers positions from P
    attention.py    the registered attention and mask functions
    probe.py        running the frozen model: shape probe, init-from-text
    generate.py     generate() with a bank (prefix_ids through prepare_inputs_for_generation)
    patcher.py      patch_model / unpatch / is_patched: attaching and detaching
    sites.py        encoders' and encoder-decoders' stacks, each attention module's role and site
    roles.py        attaching to them: hooks, PEFT's seq2seq layout, the shape probe, the task head
    positions.py    positions from P inside a family's own position embedding
    peft_models.py  patching PEFT PrefixTuning and Cartridge models, load_peft
    cartridges.py   cartridge options (frozen leading tokens), PEFT's kind, init_prefix_from_cache
    adapters.py     the prefix module a step reads when PEFT wraps it; refusing a prefix PEFT froze
    peft_tuners.py  a prefix next to a PEFT LoRA (weight tuner) adapter on one model
    api.py          patch() / unpatch(): a transformers model or a PEFT model
    saved.py        what save_pretrained writes for a patched model (a directory marked as prefixattn's)
    checkpoint.py   AutoModelForCausalLM.from_pretrained of such a directory: the trained model back

Importing this package registers ``model_type="prefixattn"`` with transformers' Auto classes.
"""

from __future__ import annotations

from .api import patch, unpatch
from .cartridges import init_prefix_from_cache
from .checkpoint import load_prefix_into, register_auto_classes
from .patcher import is_patched
from .peft_models import load_peft

__all__ = ["init_prefix_from_cache", "is_patched", "load_peft", "load_prefix_into", "patch", "unpatch"]

register_auto_classes()
