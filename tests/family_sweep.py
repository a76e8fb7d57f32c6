"""The family sweep's runner: classify one transformers causal-LM family against PEFT prefix tuning.

``classify(model_type)`` builds the family's tiny model (tests/family_configs.py), and returns what
happens when it is prefix-tuned:

- ``"match_peft"``: a PEFT PrefixTuning twin runs; ``prefixattn.patch(peft_model)`` gives the same
  logits on a right-padded batch, and after one AdamW step on both, the same prefix and logits;
- ``"refused: <message>"``: ``prefixattn.patch`` itself raised a ValueError (the caller checks that the
  message names the reason);
- ``"match_reference"``: PEFT cannot run this family; the patched model runs, and every attention
  layer's output equals a float64 reference: the layer's own eager attention (its modeling file's
  ``eager_attention_forward``, so sinks, softcaps and scalings are the family's) over the prefix
  concatenated in front of the sequence keys, with an explicit mask; ``tests/helpers.concat_reference``
  where the family has no eager function of its own;
- anything else raises: ``BuildError`` (no tiny model), ``Mismatch`` (numbers differ), or the crash itself.

Run it as a script to print every family's class: ``python tests/family_sweep.py [model_type ...]``;
``python tests/family_sweep.py --readme`` rewrites README's family list from tests/family_table.py.
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

TOL = 1e-4  # relative, fp32
NUM_VIRTUAL_TOKENS = 3


class BuildError(Exception):
    """The family's tiny model cannot be built or run without any prefix."""


class Mismatch(AssertionError):
    """prefixattn's numbers differ from PEFT's or from the reference."""


class FamilyTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    """SIGALRM-based limit for one family (the sweep runs in one process, on the main thread)."""

    def _raise(signum, frame):
        raise FamilyTimeout(f"more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(actual: torch.Tensor, expected: torch.Tensor, what: str, tol: float = TOL) -> None:
    if actual.shape != expected.shape:
        raise Mismatch(f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    if not torch.isfinite(actual).all():
        raise Mismatch(f"{what}: non-finite values")
    err = rel_err(actual, expected)
    if err > tol:
        raise Mismatch(f"{what}: relative error {err:.2e} > {tol:.0e}")


def right_padded_batch(vocab: int, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, min(vocab, 100), (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _labels(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return ids.masked_fill(mask == 0, -100)


def _vocab(model) -> int:
    return model.get_input_embeddings().weight.shape[0]


def build(model_type: str):
    from family_configs import tiny_causal_lm

    try:
        model = tiny_causal_lm(model_type)
        ids, mask = right_padded_batch(_vocab(model))
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    except FamilyTimeout:
        raise
    except Exception as e:
        raise BuildError(f"{type(e).__name__}: {e}") from e
    return model


def _cache_under_its_new_name(module, args, kwargs):
    """PEFT (0.21.2) hands its prefix to the model as ``past_key_values``. transformers >= 5.24 calls it
    ``cache``; most families rename the old keyword inside forward, but some new ones (dory, ergo) have no such
    alias and drop it into ``**kwargs``: PEFT then runs without its prefix. The reference hands it over
    under the name the model reads."""
    if kwargs.get("past_key_values") is not None and kwargs.get("cache") is None:
        kwargs["cache"] = kwargs.pop("past_key_values")
    return args, kwargs


CACHE_HOOK = "_sweep_cache_hook"  # where peft_twin keeps the handle of the renaming hook (a model attribute)


def _hand_the_cache_over(peft_model) -> None:
    base = peft_model.get_base_model()
    peft_model.__dict__[CACHE_HOOK] = base.register_forward_pre_hook(_cache_under_its_new_name, with_kwargs=True)


def peft_twin(model):
    """A PEFT PrefixTuning twin that runs the batch forward and backward, or None where PEFT fails on
    this family."""
    import inspect

    from peft import PrefixTuningConfig, get_peft_model

    torch.manual_seed(1)
    try:
        peft_model = get_peft_model(copy.deepcopy(model), PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=NUM_VIRTUAL_TOKENS))
        if "cache" in inspect.signature(peft_model.get_base_model().forward).parameters:
            _hand_the_cache_over(peft_model)
        ids, mask = right_padded_batch(_vocab(model))
        # with gradients, as the comparison trains a step: PEFT cannot train some families it can run
        # (dory deep-copies its cache, which then holds PEFT's non-leaf prefix)
        peft_model(input_ids=ids, attention_mask=mask).logits.sum().backward()
        peft_model.zero_grad(set_to_none=True)
    except FamilyTimeout:
        raise
    except Exception:
        return None
    return peft_model


def peft_drops_its_prefix(peft_model, model) -> bool:
    """Whether PEFT as it is, without the reference's renaming hook, gives the logits of the model without
    any prefix (its prompt swallowed by a forward written for ``cache`` alone). ``model``: the base model
    PEFT's twin was made from."""
    hook = peft_model.__dict__.get(CACHE_HOOK)
    if hook is None:
        return False
    ids, mask = right_padded_batch(_vocab(model))
    hook.remove()
    try:
        with torch.no_grad():
            as_peft_runs = peft_model(input_ids=ids, attention_mask=mask).logits
    finally:
        _hand_the_cache_over(peft_model)
    with torch.no_grad():
        without_prefix = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()  # (padded positions differ: PEFT's mask has P more columns)
    return torch.equal(as_peft_runs[real], without_prefix[real])


def _peft_prefix(peft_model) -> torch.Tensor:
    """PEFT's prefix in prefixattn's (L, 2, 1, Hkv, P, D) layout."""
    cfg = peft_model.active_peft_config
    rows = peft_model.prompt_encoder["default"].embedding.weight.detach()
    L, H = cfg.num_layers, cfg.num_attention_heads
    return rows.view(cfg.num_virtual_tokens, L, 2, H, cfg.token_dim // H).permute(1, 2, 3, 0, 4).unsqueeze(2)


def compare_with_peft(peft_model, ours) -> None:
    ids, mask = right_padded_batch(_vocab(ours))
    with torch.no_grad():
        check(ours(input_ids=ids, attention_mask=mask).logits,
              peft_model(input_ids=ids, attention_mask=mask).logits, "logits")
    peft_model.train()
    ours.train()
    opt_p = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    opt_o = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    for model, opt in ((peft_model, opt_p), (ours, opt_o)):
        model(input_ids=ids, attention_mask=mask, labels=_labels(ids, mask)).loss.backward()
        opt.step()
    # PEFT's rows cover every layer; ours the layers PEFT gives a prefix (Gemma 4 skips larger ones)
    layers = list(ours.prefixattn_prefix.config.layers)
    check(ours.prefixattn_prefix.kv.detach(), _peft_prefix(peft_model)[layers], "prefix after one step")
    peft_model.eval()
    ours.eval()
    with torch.no_grad():
        check(ours(input_ids=ids, attention_mask=mask).logits,
              peft_model(input_ids=ids, attention_mask=mask).logits, "logits after one step")


# ---------------------------------------------------------------------------------------------------
# The float64 layer-by-layer reference (families PEFT cannot run)
# ---------------------------------------------------------------------------------------------------


@dataclass
class LayerCall:
    module: Any
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    scaling: float | None
    kwargs: dict = field(default_factory=dict)
    out: torch.Tensor | None = None


@contextlib.contextmanager
def record_attention_calls(calls: list[LayerCall]):
    """Wrap the function registered under prefixattn's name in transformers' AttentionInterface."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from prefixattn.hf.attention import padding_mask
    from prefixattn.hf.position_bias import is_t5_attention
    from prefixattn.hf.state import IMPL_NAME as name

    real = ALL_ATTENTION_FUNCTIONS[name]

    def recorder(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        out, weights = real(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        mask = padding_mask(attention_mask, is_t5_attention(module))
        calls.append(LayerCall(module, query.detach(), key.detach(), value.detach(), mask, scaling, kwargs,
                               out.detach()))
        return out, weights

    AttentionInterface.register(name, recorder)
    try:
        yield
    finally:
        AttentionInterface.register(name, real)


def _layer_prefix(model, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prefix keys and values of one layer, (Hkv, P, Dk) and (Hkv, P, Dv)."""
    prefix = model.prefixattn_prefix
    if hasattr(prefix, "layer_prefix"):
        return prefix.layer_prefix(layer_idx)
    kv = prefix.compute().detach()  # (L, 2, N, Hkv, P, D)
    slot = prefix.slot(layer_idx)
    return kv[slot, 0, 0], kv[slot, 1, 0]


def _is_causal(module) -> bool:
    """The module's causality: what its role in the model says (an encoder's or encoder-decoder's modules:
    the patcher records it, some BERT copies set no ``is_causal``), else its ``is_causal``."""
    from prefixattn.hf.sites import CAUSAL_ATTR

    return bool(module.__dict__.get(CAUSAL_ATTR, getattr(module, "is_causal", True)))


def _mask_4d(call: LayerCall, P: int) -> torch.Tensor:
    """Additive float64 (B, 1, Sq, P + Sk) mask: prefix always visible; causal and padding on the keys."""
    B, _, Sq, _ = call.query.shape
    Sk = call.key.shape[2]
    i = torch.arange(Sq).view(Sq, 1) + (Sk - Sq)
    j = torch.arange(Sk).view(1, Sk)
    visible = (j <= i) if _is_causal(call.module) else torch.ones(Sq, Sk, dtype=torch.bool)
    window = call.kwargs.get("sliding_window")
    if window:
        visible = visible & (j > i - window)
        if not _is_causal(call.module):  # two-sided (ModernBERT's local layers)
            visible = visible & (j < i + window)
    visible = visible.view(1, 1, Sq, Sk).expand(B, 1, Sq, Sk)
    if call.mask is not None:
        visible = visible & call.mask.bool().view(B, 1, 1, Sk)
    full = torch.cat([torch.ones(B, 1, Sq, P, dtype=torch.bool), visible], dim=-1)
    return torch.zeros(full.shape, dtype=torch.float64).masked_fill(~full, torch.finfo(torch.float64).min)


def reference_layer(call: LayerCall, pk: torch.Tensor, pv: torch.Tensor,
                    score_bias: torch.Tensor | None = None) -> torch.Tensor:
    """float64 reference output (B, Sq, Hq, Dv) of one recorded layer call (``score_bias``: T5's position
    bias over [prefix; keys], built by the caller)."""
    from helpers import concat_reference

    B = call.query.shape[0]
    q = call.query.double()
    k = torch.cat([pk.double().unsqueeze(0).expand(B, -1, -1, -1), call.key.double()], dim=2)
    v = torch.cat([pv.double().unsqueeze(0).expand(B, -1, -1, -1), call.value.double()], dim=2)
    eager = getattr(sys.modules[type(call.module).__module__], "eager_attention_forward", None)
    if eager is not None and hasattr(call.module, "num_key_value_groups") and score_bias is None:
        kwargs = {k_: v_ for k_, v_ in call.kwargs.items() if k_ not in ("prefixattn_step",)}
        # by keyword: the eager functions do not all take (scaling, dropout) in that order (Gemma 4)
        out, _ = eager(call.module, q, k, v, _mask_4d(call, pk.shape[1]), scaling=call.scaling, dropout=0.0,
                       **kwargs)
        return out
    out = concat_reference(call.query, call.key, call.value, pk, pv, key_padding_mask=call.mask,
                           causal=_is_causal(call.module), scale=call.scaling,
                           softcap=call.kwargs.get("softcap") or 0.0,
                           sliding_window=call.kwargs.get("sliding_window"), score_bias=score_bias)
    return out.transpose(1, 2)


def compare_with_reference(ours) -> None:
    ids, mask = right_padded_batch(_vocab(ours))
    calls: list[LayerCall] = []
    with record_attention_calls(calls), torch.no_grad():
        ours(input_ids=ids, attention_mask=mask)
    if not calls:
        raise Mismatch("no attention layer went through prefixattn")
    for call in calls:
        pk, pv = _layer_prefix(ours, call.module.layer_idx)
        check(call.out, reference_layer(call, pk, pv), f"layer {call.module.layer_idx} attention output")


def compare_decode_with_full(ours) -> None:
    """generate() on the torch backend keeps the prefix in the KV cache where the patch-time probe allows
    (``prefixattn/hf/decode_cache.py``): its decode steps' logits must equal the full forward's."""
    from prefixattn.hf.decode_cache import PrefixedCacheLayer
    from prefixattn.hf.state import get_state

    if not get_state(ours).cache_layers:
        return
    ids, _ = right_padded_batch(_vocab(ours))
    ids = ids[:, :4]  # real tokens on both rows
    with torch.no_grad():
        out = ours.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2,
                            do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
        full = ours(input_ids=out.sequences[:, :-1]).logits
    cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
    if not any(isinstance(layer, PrefixedCacheLayer) for layer in getattr(cache, "layers", [])):
        return  # generate() made another kind of cache (BERT-style LMs: not causal, compared above)
    check(out.logits[1], full[:, -1], "logits of a decode step over a cache that holds the prefix")


def classify(model_type: str, backend: str = "torch", seen: dict | None = None) -> str:
    """Build, prefix-tune and compare one family; returns its class (see the module docstring). ``seen``
    gets ``"peft_drops_its_prefix"``: whether PEFT itself ran without its prefix (where a PEFT twin runs)."""
    import prefixattn

    model = build(model_type)
    peft_model = peft_twin(model)
    if seen is not None and peft_model is not None:
        seen["peft_drops_its_prefix"] = peft_drops_its_prefix(peft_model, model)
    try:
        if peft_model is not None:
            ours = prefixattn.patch(copy.deepcopy(peft_model), backend=backend)
        else:
            ours = prefixattn.patch(copy.deepcopy(model), num_prefix_tokens=NUM_VIRTUAL_TOKENS, backend=backend)
    except ValueError as e:
        return f"refused: {e}"
    if peft_model is not None:
        compare_with_peft(peft_model, ours)
        outcome = "match_peft"
    else:
        compare_with_reference(ours)
        outcome = "match_reference"
    if backend == "torch":
        compare_decode_with_full(ours)
    return outcome


def replace_readme_section(readme_path: str, begin: str, end_marker: str, section: str) -> None:
    """Replace the README text from ``begin`` to ``end_marker`` (both included) with ``section``."""
    with open(readme_path) as f:
        text = f.read()
    start, end = text.index(begin), text.index(end_marker) + len(end_marker)
    with open(readme_path, "w") as f:
        f.write(text[:start] + section + text[end:])


def classify_timed(classify, model_type: str, seconds: int) -> tuple[str, float]:
    """A family's outcome (or the exception that ended it, on one line) and the seconds it took."""
    t0 = time.time()
    try:
        with time_limit(seconds):
            result = classify(model_type)
    except Exception as e:
        result = f"{type(e).__name__}: {e}"
    return " ".join(result.split()), time.time() - t0


def write_readme_section(readme_path: str) -> None:
    """Replace README's generated family list with the one rendered from tests/family_table.py."""
    from family_table import README_BEGIN, README_END, readme_section

    replace_readme_section(readme_path, README_BEGIN, README_END, readme_section())


def main(argv: list[str]) -> None:
    import warnings

    if argv == ["--readme"]:
        write_readme_section(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md"))
        return

    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    for model_type in argv or list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        result, seconds = classify_timed(classify, model_type, 60)
        print(f"{model_type:28s} {seconds:5.1f}s {result[:200]}", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main(sys.argv[1:])
