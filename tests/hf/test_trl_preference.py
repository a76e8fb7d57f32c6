"""TRL's preference and RL trainers with ``ref_model=None`` on a patched model.

DPOTrainer and GRPOTrainer (with a KL term) rebuild the reference model from the policy's path with the
policy's ``attn_implementation`` ("prefixattn"). That reference is never patched: it must be the frozen base
model (what PEFT's disabled adapter gives), not an error and not a model with the prefix.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, tiny_model
from transformers import AutoModelForCausalLM

import prefixattn

trl = pytest.importorskip("trl")


def _tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _words(g, n):
    return " ".join(f"t{i}" for i in torch.randint(3, VOCAB, (n,), generator=g).tolist())


@pytest.fixture
def policy(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    return prefixattn.patch(base, num_prefix_tokens=3, backend="torch"), tmp_path


def _check_reference(ref_model, base_path, policy_model):
    """The reference is the unpatched base: same logits as the base model, other than the policy's."""
    assert not prefixattn.is_patched(ref_model)
    assert ref_model.config._attn_implementation == "prefixattn"
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad():
        ref = ref_model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(base_path)(input_ids=ids).logits
        ours = policy_model(input_ids=ids).logits
    assert torch.allclose(ref, base, atol=1e-5), (ref - base).abs().max()
    assert (ours - base).abs().max() > 1e-2


def test_dpo_trainer_builds_the_base_model_as_reference(policy):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model, tmp_path = policy
    g = torch.Generator().manual_seed(0)
    data = Dataset.from_list([{"prompt": _words(g, 4), "chosen": _words(g, 3), "rejected": _words(g, 3)}
                              for _ in range(8)])
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=2, per_device_train_batch_size=4,
                     learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                     bf16=False)  # fp32: the reference's logits compare exactly with the base model's
    before = model.prefixattn_prefix.kv.detach().clone()
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=data,
                         processing_class=_tokenizer())
    trainer.train()
    _check_reference(trainer.ref_model, tmp_path / "base", model)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(model.prefixattn_prefix.kv.detach(), before)  # the prefix trained


def test_grpo_trainer_with_a_kl_term_builds_the_base_model_as_reference(policy):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    model, tmp_path = policy
    g = torch.Generator().manual_seed(1)
    data = Dataset.from_list([{"prompt": _words(g, 4)} for _ in range(8)])

    def reward_len(completions, **kwargs):
        return [float(len(c.split())) for c in completions]

    args = GRPOConfig(output_dir=str(tmp_path / "grpo"), max_steps=1, per_device_train_batch_size=4,
                      num_generations=2, max_completion_length=4, beta=0.1, learning_rate=1e-2, report_to=[],
                      use_cpu=True, save_strategy="no", logging_steps=1, bf16=False)
    trainer = GRPOTrainer(model=model, reward_funcs=reward_len, args=args, train_dataset=data,
                          processing_class=_tokenizer())
    trainer.train()
    _check_reference(trainer.ref_model, tmp_path / "base", model)
    assert any("kl" in k for r in trainer.state.log_history for k in r)
