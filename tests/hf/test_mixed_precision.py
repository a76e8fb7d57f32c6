"""Mixed precision: under torch.autocast (HF Trainer / TRL with bf16=True) transformers hands the
attention q and k in fp32 and v in bf16; the patched model computes in the autocast dtype with the prefix
cast once per step (the plan), matches PEFT under the same autocast, and trains under the HF Trainer with
bf16=True (with gradient checkpointing too: tests/hf/test_trl.py)."""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import rel_err
from tiny_models import batch, labels_for, patched_twin, peft_prefix_as_kv, peft_twin, tiny_model

attention_module = importlib.import_module("prefixattn.hf.attention")

BF16_TOL = 3e-2  # relative error of a whole bf16 forward against another bf16 implementation


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_autocast_forward_and_prefix_grad_match_peft_under_the_same_autocast(family, monkeypatch):
    peft_model = peft_twin(tiny_model(family), num_virtual_tokens=4)
    ours = patched_twin(peft_model, backend="torch")
    seen = []
    real = attention_module.prefix_attention

    def spy(q, k, v, pk, pv, **kw):
        seen.append((q.dtype, v.dtype, pk.dtype, pk.untyped_storage().data_ptr()))
        out = real(q, k, v, pk, pv, **kw)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(attention_module, "prefix_attention", spy)
    ids, mask = batch(padding="left")
    labels = labels_for(ids, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_p = peft_model(input_ids=ids, attention_mask=mask, labels=labels)
        out_o = ours(input_ids=ids, attention_mask=mask, labels=labels)
    out_p.loss.backward()
    out_o.loss.backward()
    assert rel_err(out_o.logits.float(), out_p.logits.float()) < BF16_TOL
    grad_p = peft_prefix_as_kv(peft_model, grad=True)
    assert rel_err(ours.prefixattn_prefix.kv.grad, grad_p) < 5 * BF16_TOL
    # every layer got the prefix already in bf16, one tensor for the step (views into it), and the
    # output came back in bf16
    calls = [s for s in seen if isinstance(s, tuple)]
    assert len(calls) == 2 and all(pk == torch.bfloat16 for _, _, pk, _ in calls)
    assert len({storage for *_, storage in calls}) == 1
    assert all(s == torch.bfloat16 for s in seen if not isinstance(s, tuple))
    assert ours.prefixattn_prefix.kv.dtype == torch.float32 and ours.prefixattn_prefix.kv.grad.dtype == torch.float32
    # and the autocast result is a bf16 rounding of the fp32 one, not something else
    with torch.no_grad():
        fp32 = ours(input_ids=ids, attention_mask=mask).logits
    assert rel_err(out_o.logits.float(), fp32) < BF16_TOL


def test_the_hf_trainer_trains_a_patched_model_in_bf16(tmp_path, monkeypatch):
    """(bf16 with gradient checkpointing: tests/hf/test_trl.py, TRL's defaults.)"""
    from transformers import Trainer, TrainingArguments

    import prefixattn

    model = prefixattn.patch(tiny_model("llama").train(), num_prefix_tokens=4, backend="torch")
    dtypes = []
    real = attention_module.prefix_attention
    monkeypatch.setattr(attention_module, "prefix_attention",
                        lambda q, k, v, pk, pv, **kw: dtypes.append(pk.dtype) or real(q, k, v, pk, pv, **kw))
    ids, mask = batch(batch_size=8, length=9, padding="right", seed=3)
    data = [{"input_ids": i, "attention_mask": m, "labels": labels_for(i[None], m[None])[0]}
            for i, m in zip(ids, mask, strict=True)]
    before = model.prefixattn_prefix.kv.detach().clone()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4,
                             learning_rate=1e-2, use_cpu=True, bf16=True, report_to=[], save_strategy="no",
                             logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert dtypes and set(dtypes) == {torch.bfloat16}  # the Trainer's autocast reached the layers
    after = model.prefixattn_prefix.kv.detach()
    assert after.dtype == torch.float32 and not torch.equal(after, before)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
