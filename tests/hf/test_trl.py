"""Real clients: TRL's SFTTrainer with its defaults for memory-lean training (bf16 autocast, gradient
checkpointing, padding-free batches: position_ids + cu_seq_lens_q/k) on a patched model, the first
padding-free loss against the same documents padded, and a LoRA + prefix model under SFTTrainer and the
HF Trainer (checkpoint + resume). The HF Trainer with bf16 on a plain patched model is in
test_mixed_precision.py.
"""

from __future__ import annotations

import copy
import importlib
import math

import pytest
import torch
from tiny_models import VOCAB, tiny_model

import prefixattn
from prefixattn.hf.state import get_state
from prefixattn.prefix import find_prefix

trl = pytest.importorskip("trl")
attention_module = importlib.import_module("prefixattn.hf.attention")
P = 3
BYTES = 384  # ByT5's vocabulary: tiny models that TRL can feed with its byte tokenizer


def _tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def test_sft_trainer_trains_a_patched_model_bf16_checkpointed_padding_free(tmp_path, monkeypatch):
    from datasets import Dataset

    model = prefixattn.patch(tiny_model("llama").train(), num_prefix_tokens=4, backend="torch")
    seen = []
    real = attention_module.prefix_attention

    def spy(q, k, v, pk, pv, **kw):
        seen.append((pk.dtype, kw["documents"] is not None))
        return real(q, k, v, pk, pv, **kw)

    monkeypatch.setattr(attention_module, "prefix_attention", spy)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, VOCAB, (int(n),), generator=g).tolist()
            for n in torch.randint(3, 12, (16,), generator=g)]
    data = Dataset.from_dict({"input_ids": rows})
    before = model.prefixattn_prefix.kv.detach().clone()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    args = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3,
                         learning_rate=1e-2, use_cpu=True, bf16=True, gradient_checkpointing=True,
                         padding_free=True, max_length=None, report_to=[], save_strategy="no", logging_steps=1,
                         dataset_num_proc=None)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=_tokenizer())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert {dtype for dtype, _ in seen} == {torch.bfloat16}  # autocast reached the layers
    assert {packed for _, packed in seen} == {True}  # padding-free batches arrive as documents
    assert not torch.equal(model.prefixattn_prefix.kv.detach(), before)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


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
    the loss equals the same documents run padded only if no document attends to another. Then TRL's
    defaults (bf16 autocast, gradient checkpointing) train on that batch: the loss falls."""
    docs = _docs(4, seed=1)
    model = prefixattn.patch(tiny_model("llama", vocab_size=BYTES), num_prefix_tokens=P, backend="torch")
    frozen = _frozen(model)
    before = find_prefix(model).kv.detach().clone()
    extra = dict(packing=True, packing_strategy="bfd", max_length=64) if packing else dict(max_length=None)
    trainer = _sft(model, _sft_args(tmp_path, padding_free=True, **extra), docs)  # one batch: the 4 docs
    packed = next(iter(trainer.get_train_dataloader()))
    assert packed["input_ids"].shape[0] == 1 and "position_ids" in packed  # one padding-free row
    expected = _padded_loss(model, docs)
    with torch.no_grad():
        got = trainer.compute_loss(model, dict(packed))  # the first step's loss, as the trainer computes it
    assert abs(got.item() - expected) < 1e-4 * abs(expected), (got.item(), expected)

    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0], losses
    assert not torch.equal(find_prefix(model).kv, before)
    _assert_unchanged(model, frozen)
    # what TRL's defaults switched on: checkpointed layers, and steps planned in the autocast dtype
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    assert get_state(model).plan.dtype == torch.bfloat16


class _Data(torch.utils.data.Dataset):
    def __init__(self, n=8, length=6):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, BYTES, (n, length), generator=g)

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


def _lora_prefix(vocab=BYTES, seed=1):
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
