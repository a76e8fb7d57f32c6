"""Real clients: TRL's SFTTrainer (its defaults: bf16 autocast and gradient checkpointing; padding-free
packing) and the HF Trainer with bf16, on patched tiny models, and on a LoRA + prefix model.

Tiny models take ByT5's byte vocabulary (384 ids) so TRL's tokenizer fits them; every run is a few
steps on the CPU.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tiny_models import tiny_model

import prefixattn
from prefixattn.hf.state import get_state
from prefixattn.prefix import find_prefix

P = 3
VOCAB = 384


def _docs(n: int = 8, seed: int = 0, lengths=(5, 9, 3, 12, 7, 4, 10, 6)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 259, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


def _dataset(docs):
    from datasets import Dataset

    return Dataset.from_list([{"input_ids": d} for d in docs])


def _sft_args(tmp_path, **kw):
    from trl import SFTConfig

    base = dict(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, report_to=[],
                use_cpu=True, bf16=True, gradient_checkpointing=True, logging_steps=1, learning_rate=3e-2,
                save_strategy="no", dataloader_num_workers=0)
    base.update(kw)
    return SFTConfig(**base)


def _sft(model, args, docs):
    from transformers import ByT5Tokenizer
    from trl import SFTTrainer

    return SFTTrainer(model=model, args=args, train_dataset=_dataset(docs), processing_class=ByT5Tokenizer())


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _frozen(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if not p.requires_grad and "prefixattn_prefix" not in n}


def _assert_unchanged(model, frozen):
    params = dict(model.named_parameters())
    for n, v in frozen.items():
        assert torch.equal(params[n], v), n


def test_sft_trainer_defaults_bf16_and_gradient_checkpointing_train_the_prefix(tmp_path):
    model = prefixattn.patch(tiny_model("llama", vocab_size=VOCAB), num_prefix_tokens=P, backend="torch")
    frozen = _frozen(model)
    before = find_prefix(model).kv.detach().clone()
    trainer = _sft(model, _sft_args(tmp_path), _docs(4))  # one batch: every step sees the same documents
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0], losses
    assert not torch.equal(find_prefix(model).kv, before)
    _assert_unchanged(model, frozen)
    # what TRL's defaults switched on: checkpointed layers, and steps planned in the autocast dtype
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    assert get_state(model).plan.dtype == torch.bfloat16


def _padded_loss(model, docs):
    """The mean next-token loss of ``docs`` run as a right-padded batch (no packing)."""
    S = max(len(d) for d in docs)
    ids = torch.zeros(len(docs), S, dtype=torch.long)
    mask = torch.zeros(len(docs), S, dtype=torch.long)
    for i, d in enumerate(docs):
        ids[i, : len(d)] = torch.tensor(d)
        mask[i, : len(d)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()


@pytest.mark.parametrize("packing", [True, False])
def test_sft_trainer_padding_free_first_loss_equals_the_padded_loss(tmp_path, packing):
    """padding_free=True puts a batch's documents in one row with position_ids restarting per document:
    the loss equals the same documents run padded only if no document attends to another."""
    docs = _docs(4, seed=1)
    model = prefixattn.patch(tiny_model("llama", vocab_size=VOCAB), num_prefix_tokens=P, backend="torch")
    extra = dict(packing=True, packing_strategy="bfd", max_length=64) if packing else dict(max_length=None)
    args = _sft_args(tmp_path, padding_free=True, bf16=False, gradient_checkpointing=False, max_steps=2,
                     **extra)
    trainer = _sft(model, args, docs)
    packed = next(iter(trainer.get_train_dataloader()))
    assert packed["input_ids"].shape[0] == 1 and "position_ids" in packed  # one padding-free row
    expected = _padded_loss(model, docs)
    with torch.no_grad():
        got = trainer.compute_loss(model, dict(packed))  # the first step's loss, as the trainer computes it
    assert abs(got.item() - expected) < 1e-4 * abs(expected), (got.item(), expected)
    trainer.train()
    assert all(math.isfinite(x) for x in _losses(trainer))


class _Data(torch.utils.data.Dataset):
    def __init__(self, n=8, length=6):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, VOCAB, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _trainer_args(tmp_path, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=3e-2,
                report_to=[], use_cpu=True, logging_steps=1, dataloader_num_workers=0, save_strategy="no")
    base.update(kw)
    return TrainingArguments(**base)


def test_hf_trainer_bf16_trains_a_patched_model(tmp_path):
    from transformers import Trainer

    model = prefixattn.patch(tiny_model("llama", vocab_size=VOCAB), num_prefix_tokens=P, backend="torch")
    frozen = _frozen(model)
    before = find_prefix(model).kv.detach().clone()
    trainer = Trainer(model=model, args=_trainer_args(tmp_path, bf16=True), train_dataset=_Data())
    trainer.train()
    assert all(math.isfinite(x) for x in _losses(trainer))
    assert not torch.equal(find_prefix(model).kv, before)
    assert find_prefix(model).kv.dtype == torch.float32  # the fp32 master stays fp32
    assert get_state(model).plan.dtype == torch.bfloat16  # cast once per step to the autocast dtype
    _assert_unchanged(model, frozen)


def _lora_prefix(vocab=VOCAB, seed=1):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lora = get_peft_model(tiny_model("llama", vocab_size=vocab),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    return prefixattn.patch(lora, num_prefix_tokens=P, backend="torch")


def _trained_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_sft_trainer_trains_lora_and_prefix(tmp_path):
    model = _lora_prefix()
    frozen = _frozen(model)
    before = _trained_state(model)
    trainer = _sft(model, _sft_args(tmp_path, max_steps=3), _docs())
    trainer.train()
    assert all(math.isfinite(x) for x in _losses(trainer))
    after = _trained_state(model)
    for name in ("lora_B", "prefixattn_prefix"):
        assert any(name in n and not torch.equal(after[n], before[n]) for n in after), name
    _assert_unchanged(model, frozen)


def test_trainer_checkpoint_and_resume_keep_lora_and_prefix(tmp_path):
    from transformers import Trainer

    model = _lora_prefix()
    trainer = Trainer(model=model, args=_trainer_args(tmp_path, save_strategy="steps", save_steps=3),
                      train_dataset=_Data())
    trainer.train()
    trained = _trained_state(model)
    assert any("lora_B" in n for n in trained) and any("prefixattn" in n for n in trained)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "checkpoint-3" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.prefixattn_prefix.kv" in keys and any("lora_B" in k for k in keys)

    fresh = _lora_prefix(seed=9)  # the same recipe, other initial values
    assert not all(torch.equal(p, trained[n]) for n, p in _trained_state(fresh).items())
    trainer2 = Trainer(model=fresh, args=copy.deepcopy(trainer.args), train_dataset=_Data())
    trainer2._load_from_checkpoint(str(tmp_path / "checkpoint-3"))  # what resume_from_checkpoint runs
    restored = _trained_state(fresh)
    assert restored.keys() == trained.keys()
    for n in trained:
        torch.testing.assert_close(restored[n], trained[n], rtol=0, atol=0, msg=n)
