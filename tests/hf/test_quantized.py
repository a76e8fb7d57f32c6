"""Quantized base models (bitsandbytes 8-bit and 4-bit, torchao int8 weight-only; a tiny Llama on the CPU):
prefix tuning equals PEFT's with the same quantized weights on both sides, and patching, saving and
unpatching leave the base untouched.

Why the last part needs a test: bitsandbytes 4-bit on a CPU with AVX512-BF16 repacks its weights into a CPU
layout at the first inference forward, and its ``state_dict()`` unpacks and requantizes them (bf16 absmax,
re-nested), which changes the model's logits (by 0.33 at a logit scale of 0.8 on a tiny Llama; PEFT's own
``save_pretrained`` does the same to its base). So ``patch()`` and every save of prefixattn must never walk the
base model's state dict. On a CPU without AVX512-BF16 the repacking never runs and the logits would stay
equal even with a walk, so the walk itself is checked too: no quantized layer's ``_save_to_state_dict`` may
run while patching, saving and unpatching.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import pytest
import torch
from family_sweep import _peft_prefix, compare_with_peft, right_padded_batch

import prefixattn

VOCAB, P = 128, 3
QUANTIZATIONS = ["bnb-8bit", "bnb-4bit", "torchao-int8"]


@pytest.fixture(scope="module")
def fp32_dir(tmp_path_factory) -> Path:
    """A tiny Llama's fp32 weights on disk: every quantized copy is loaded (and so quantized) from them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    where = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(where)
    return where


def _quantization_config(kind: str):
    if kind.startswith("bnb"):
        pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (the test extra pins it)")
        from transformers import BitsAndBytesConfig

        if kind == "bnb-4bit":
            return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
        return BitsAndBytesConfig(load_in_8bit=True)
    # not in the test extra: with torchao installed, transformers.modeling_utils imports it in every process
    # (it about doubled the time of `import prefixattn.hf` here, 21 s -> 39 s on a loaded 2-core machine);
    # torchao 0.18.0 from PyPI passes these tests on the CPU
    pytest.importorskip("torchao", reason="torchao is not installed (pip install torchao==0.18.0 to run it; "
                                          "not in the test extra, see the comment)")
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


def load_quantized(where: Path, kind: str):
    from transformers import LlamaForCausalLM

    quantization = _quantization_config(kind)
    try:
        model = LlamaForCausalLM.from_pretrained(where, quantization_config=quantization, device_map="cpu",
                                                 attn_implementation="eager")
    except (ImportError, RuntimeError) as e:  # a build without a CPU backend for this machine
        pytest.skip(f"{kind} cannot load a model on this CPU: {e}")
    return model.eval()


def quantized_layer_type(kind: str) -> type | None:
    """The layer class whose ``_save_to_state_dict`` changes the model (bitsandbytes 4-bit on a CPU; 8-bit
    checked too); torchao's tensor subclasses have none."""
    if not kind.startswith("bnb"):
        return None
    import bitsandbytes as bnb

    return bnb.nn.Linear4bit if kind == "bnb-4bit" else bnb.nn.Linear8bitLt


def _q_proj_weight(model) -> torch.Tensor:
    weight = model.model.layers[0].self_attn.q_proj.weight
    return weight.data if type(weight).__module__.startswith("bitsandbytes") else weight.dequantize()


def _logits(model) -> torch.Tensor:
    ids, mask = right_padded_batch(VOCAB)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@contextlib.contextmanager
def no_walk_of_the_base(kind: str):
    """Fails the test if any quantized layer writes its state dict (what ``model.state_dict()`` does)."""
    layer = quantized_layer_type(kind)
    if layer is None:
        yield
        return
    walked: list[str] = []
    real = layer._save_to_state_dict

    def recording(self, destination, prefix, keep_vars):
        walked.append(prefix)
        return real(self, destination, prefix, keep_vars)

    layer._save_to_state_dict = recording
    try:
        yield
    finally:
        layer._save_to_state_dict = real
    assert walked == [], f"the base model's state dict was walked: {walked[:4]}"


@pytest.mark.parametrize("kind", QUANTIZATIONS)
def test_quantized_llama_matches_peft(fp32_dir, kind):
    """prefixattn.patch(peft_model) against PEFT's prefix tuning of the same quantized model: the logits of a
    right-padded batch, and the prefix and the logits after one AdamW step (fp32 relative 1e-4: the two sides
    run the very same quantized matmuls, only the attention differs)."""
    from peft import PrefixTuningConfig, get_peft_model

    torch.manual_seed(1)
    peft_model = get_peft_model(load_quantized(fp32_dir, kind),
                                PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    ours = prefixattn.patch(copy.deepcopy(peft_model), backend="torch")
    theirs_q = peft_model.get_base_model().model.layers[0].self_attn.q_proj
    layer = quantized_layer_type(kind)
    if layer is not None:
        assert isinstance(theirs_q, layer) and isinstance(ours.model.layers[0].self_attn.q_proj, layer)
    else:
        assert "torchao" in type(theirs_q.weight).__module__
    # identical quantized weights on both sides (and quantized: not the fp32 weights)
    assert torch.equal(_q_proj_weight(ours), _q_proj_weight(peft_model.get_base_model()))
    assert torch.equal(ours.prefixattn_prefix.kv.detach(), _peft_prefix(peft_model))
    ours_logits, theirs_logits = _logits(ours), _logits(peft_model)
    assert (ours_logits - theirs_logits).abs().max() < 1e-5
    compare_with_peft(peft_model, ours)


@pytest.mark.parametrize("kind", QUANTIZATIONS)
def test_patch_save_and_unpatch_leave_the_quantized_base_bit_exact(fp32_dir, kind, tmp_path):
    model = load_quantized(fp32_dir, kind)
    before = _logits(model)  # a first inference forward: where bitsandbytes repacks 4-bit weights for the CPU
    with no_walk_of_the_base(kind):
        prefixattn.patch(model, num_prefix_tokens=P, backend="torch")
        patched = _logits(model)
        prefixattn.save_prefix(model, tmp_path / "prefix.safetensors")
        prefixattn.save_peft(model, tmp_path / "adapter")
        model.save_pretrained(tmp_path / "saved")
        after_saves = _logits(model)
        prefixattn.unpatch(model)
    assert torch.equal(after_saves, patched), "a save changed the patched model"
    assert torch.equal(_logits(model), before), "patch + saves + unpatch changed the quantized base"
    # the saved directory holds the prefix alone, not the quantized base
    from safetensors import safe_open

    with safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["prefixattn_prefix.kv"]
