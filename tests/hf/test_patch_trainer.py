"""The HF Trainer trains a patched model: only the prefix changes, and checkpoints hold only the prefix."""

from __future__ import annotations

import copy
import os

import torch
from tiny_models import VOCAB, tiny_model

import prefixattn


class _Data(torch.utils.data.Dataset):
    def __init__(self, n=8, length=6):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, VOCAB, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_trainer_trains_only_the_prefix_and_saves_only_the_prefix(tmp_path):
    from safetensors import safe_open
    from transformers import Trainer, TrainingArguments

    model = prefixattn.patch(tiny_model("llama"), num_prefix_tokens=4, backend="torch")
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("prefixattn_prefix")}
    prefix_before = model.prefixattn_prefix.kv.detach().clone()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, save_strategy="steps", save_steps=3, report_to=[],
                             use_cpu=True, logging_steps=1, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=_Data())
    trainer.train()

    for k, v in model.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k
    assert not torch.allclose(model.prefixattn_prefix.kv, prefix_before)

    ckpt = tmp_path / "checkpoint-3"
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert list(f.keys()) == ["prefixattn_prefix.kv"]
    assert os.path.getsize(ckpt / "model.safetensors") < 4 * model.prefixattn_prefix.kv.numel() + 4096

    # resuming from that checkpoint restores the prefix
    fresh = prefixattn.patch(tiny_model("llama"), num_prefix_tokens=4, backend="torch")
    trainer2 = Trainer(model=fresh, args=copy.deepcopy(args), train_dataset=_Data())
    trainer2._load_from_checkpoint(str(ckpt))
    torch.testing.assert_close(fresh.prefixattn_prefix.kv, model.prefixattn_prefix.kv)

    # save_pretrained of an unpatched model writes everything again
    prefixattn.unpatch(model)
    model.save_pretrained(str(tmp_path / "full"))
    with safe_open(str(tmp_path / "full" / "model.safetensors"), "pt") as f:
        assert "model.embed_tokens.weight" in set(f.keys())
