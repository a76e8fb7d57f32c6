"""TRL's SFTTrainer as a real client with its defaults for memory-lean training: bf16 autocast, gradient
checkpointing and padding-free batches (position_ids + cu_seq_lens_q/k); the patched model trains (loss
finite, the prefix moves, the base stays frozen)."""

from __future__ import annotations

import importlib

import pytest
import torch
from tiny_models import VOCAB, tiny_model

trl = pytest.importorskip("trl")
attention_module = importlib.import_module("prefixattn.hf.attention")


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

    import prefixattn

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
