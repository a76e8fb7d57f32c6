"""Encoders (P-tuning v2; PEFT's SEQ_CLS / TOKEN_CLS / QUESTION_ANS / FEATURE_EXTRACTION prefix tuning):
PEFT's semantics (positions from P by each family's own rule, P leading prefix slots in the mask,
bidirectional attention), the task head trained as PEFT trains it (modules_to_save), PEFT adapters both
ways with the head, prefixattn's file with the head, and what is refused.

The PEFT reference needs the backbone's ``past_key_values`` argument on transformers >= 5.24, where it is
named ``cache``: tests/tiny_encdec.restore_old_cache_name restores the old name on the backbone of the
reference only (PEFT then computes what it computes on transformers 5.17); no assertion is loosened.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import assert_close_rel
from tiny_encdec import P, peft_prefix_rows, peft_twin, restore_old_cache_name, text_batch, tiny_encoder

import prefixattn

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5
HEADS = {"SEQ_CLS": "ForSequenceClassification", "TOKEN_CLS": "ForTokenClassification",
         "QUESTION_ANS": "ForQuestionAnswering", "FEATURE_EXTRACTION": "Model"}


def _out(out) -> torch.Tensor:
    if getattr(out, "start_logits", None) is not None:
        return torch.cat([out.start_logits, out.end_logits], dim=-1)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _loss(task: str, out, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    y = _out(out)
    if task == "SEQ_CLS":
        return torch.nn.functional.cross_entropy(y, torch.tensor([0, 2]))
    if task == "TOKEN_CLS":
        return torch.nn.functional.cross_entropy(y.flatten(0, 1), (ids % 3).flatten(),
                                                 reduction="none")[mask.flatten() == 1].mean()
    # not mean(y ** 2): a last hidden state comes out of LayerNorm, whose mean square is ~1 whatever the
    # input (a tiny model's LayerNorm has unit weight and zero bias), so that loss's gradient is rounding
    # noise (|g| < 1e-7 here) and two correct implementations disagree on it
    weights = torch.linspace(-1.0, 1.0, y.shape[-1], dtype=torch.float32)
    return (y.float() * weights).mean()


@pytest.mark.parametrize("family, task, padding", [
    ("bert", "SEQ_CLS", "right"), ("roberta", "TOKEN_CLS", "left"), ("electra", "QUESTION_ANS", "right"),
    ("xlm-roberta", "FEATURE_EXTRACTION", "left"), ("roberta", "SEQ_CLS", "right"),
])
def test_matches_peft_logits_and_one_step(family, task, padding):
    """Same outputs as PEFT's prefix tuning of that task type, and the same prefix, task head and outputs
    after one AdamW step on both (RoBERTa's padded rows carry padding_idx, so its positions depend on
    the mask: PEFT's padding_idx + (cumsum + P) * mask)."""
    model = tiny_encoder(family, HEADS[task])
    twin = peft_twin(model, task)
    ours = prefixattn.patch(copy.deepcopy(twin), backend="torch")
    ids, mask = text_batch(97, pad=1, padding=padding)
    with torch.no_grad():
        assert_close_rel(_out(ours(input_ids=ids, attention_mask=mask)),
                         _out(twin(input_ids=ids, attention_mask=mask)), TOL, "outputs")
    for m in (twin, ours):
        m.train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        _loss(task, m(input_ids=ids, attention_mask=mask), ids, mask).backward()
        opt.step()
        m.eval()
    prefix = ours.prefixattn_prefix
    assert_close_rel(prefix.kv.detach()[:, :, 0], peft_prefix_rows(twin), TOL, "prefix after a step")
    for path in prefix.heads:
        twin_head = dict(twin.get_base_model().get_submodule(path).named_parameters())
        for name, p in ours.get_submodule(path).named_parameters():
            assert_close_rel(p.detach(), twin_head[name].detach(), TOL, f"head {path}.{name} after a step")
    with torch.no_grad():
        assert_close_rel(_out(ours(input_ids=ids, attention_mask=mask)),
                         _out(twin(input_ids=ids, attention_mask=mask)), TOL, "outputs after a step")


def test_the_task_head_trains_as_peft_trains_it():
    """PEFT's SEQ_CLS marks ``classifier`` / ``score`` (modules_to_save), QUESTION_ANS ``qa_outputs``; the
    rest stays frozen; unpatch restores the flags."""
    for head, names in (("ForSequenceClassification", {"classifier.weight", "classifier.bias"}),
                        ("ForQuestionAnswering", {"qa_outputs.weight", "qa_outputs.bias"}),
                        ("Model", set())):
        model = prefixattn.patch(tiny_encoder("bert", head), num_prefix_tokens=P, backend="torch")
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == names | {"prefixattn_prefix.kv"}, head
        assert model.prefixattn_prefix.heads == tuple(sorted({n.rsplit(".", 1)[0] for n in names}))
        prefixattn.unpatch(model)
        assert all(p.requires_grad for p in model.parameters())


def _position_ids_seen(model, **inputs) -> torch.Tensor:
    seen = []
    emb = model.get_submodule(model.base_model_prefix).embeddings.position_embeddings
    handle = emb.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    return seen[0]


def test_positions_are_peft_s_by_each_family_s_rule():
    """BERT: arange + P. RoBERTa: padding_idx + (cumsum(ids != pad) + P) * (ids != pad), its own rule fed
    PEFT's cache length P. An encoder's explicit position_ids stay as they are (PEFT hands them on)."""
    ids, mask = text_batch(97, pad=1, padding="right")
    bert = prefixattn.patch(tiny_encoder("bert"), num_prefix_tokens=P, backend="torch")
    pos = _position_ids_seen(bert, input_ids=ids, attention_mask=mask)
    assert torch.equal(pos.expand(2, -1), (torch.arange(7) + P).expand(2, -1))
    roberta = prefixattn.patch(tiny_encoder("roberta"), num_prefix_tokens=P, backend="torch")
    pos = _position_ids_seen(roberta, input_ids=ids, attention_mask=mask)
    real = (ids != 1).long()
    assert torch.equal(pos, 1 + (real.cumsum(1) + P) * real)
    explicit = torch.arange(7).flip(0).expand(2, -1)
    assert torch.equal(_position_ids_seen(bert, input_ids=ids, position_ids=explicit), explicit)


def _fresh_shimmed(head: str):
    model = tiny_encoder("bert", head)
    restore_old_cache_name(model)
    return model


@pytest.mark.parametrize("task", ["SEQ_CLS", "QUESTION_ANS"])
def test_peft_adapters_both_ways_with_the_task_head(task, tmp_path):
    """A PEFT adapter (prompt + the trained head) loads into an unpatched model (load_peft), and PEFT loads
    what save_peft writes: the same outputs as the model that wrote it."""
    from peft import PeftModel

    twin = peft_twin(tiny_encoder("bert", HEADS[task]), task)
    with torch.no_grad():  # a trained head, not the base model's
        for p in twin.get_base_model().get_submodule(
                "classifier" if task == "SEQ_CLS" else "qa_outputs").modules_to_save.default.parameters():
            p.add_(torch.randn_like(p))
    twin.save_pretrained(tmp_path / "peft")
    ids, mask = text_batch(97, pad=1)
    with torch.no_grad():
        expected = _out(twin(input_ids=ids, attention_mask=mask))
        ours = prefixattn.load_peft(tiny_encoder("bert", HEADS[task]), tmp_path / "peft", backend="torch")
        assert_close_rel(_out(ours(input_ids=ids, attention_mask=mask)), expected, TOL, "load_peft")
        prefixattn.save_peft(ours, tmp_path / "ours")
        back = PeftModel.from_pretrained(_fresh_shimmed(HEADS[task]), tmp_path / "ours")
        assert back.active_peft_config.task_type == task
        assert_close_rel(_out(back(input_ids=ids, attention_mask=mask)), expected, TOL, "PEFT loads save_peft")


def test_prefix_file_carries_the_task_head(tmp_path):
    model = prefixattn.patch(tiny_encoder("roberta"), num_prefix_tokens=P, backend="torch")
    with torch.no_grad():
        model.classifier.out_proj.weight.add_(1.0)
        model.prefixattn_prefix.kv.mul_(2.0)
    prefixattn.save_prefix(model, tmp_path / "p.safetensors")
    fresh = prefixattn.patch(tiny_encoder("roberta"), num_prefix_tokens=P, backend="torch")
    prefixattn.load_prefix(fresh, tmp_path / "p.safetensors")
    ids, mask = text_batch(97, pad=1)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids, attention_mask=mask).logits,
                           model(input_ids=ids, attention_mask=mask).logits)
    # a file without a head loads the prefix and says the head was left as it was
    bare = prefixattn.patch(tiny_encoder("roberta", "Model"), num_prefix_tokens=P, backend="torch")
    prefixattn.save_prefix(bare, tmp_path / "bare.safetensors")
    with pytest.warns(UserWarning, match="without the task head"):
        prefixattn.load_prefix(fresh, tmp_path / "bare.safetensors")
    # a head of another shape is refused before anything is loaded
    other = prefixattn.patch(tiny_encoder("roberta", num_labels=5), num_prefix_tokens=P, backend="torch")
    with pytest.raises(ValueError, match="out_proj"):
        prefixattn.load_prefix(other, tmp_path / "p.safetensors")


def test_a_bank_runs_on_a_bare_encoder_and_is_refused_with_a_task_head():
    bank = prefixattn.patch(tiny_encoder("bert", "Model"), num_prefix_tokens=P, num_prefixes=2,
                            backend="torch")
    single = prefixattn.patch(tiny_encoder("bert", "Model"), num_prefix_tokens=P, backend="torch")
    with torch.no_grad():
        single.prefixattn_prefix.kv.copy_(bank.prefixattn_prefix.kv[:, :, 1:2])
        ids, mask = text_batch(97, pad=1)
        got = bank(input_ids=ids, attention_mask=mask, prefix_ids=torch.tensor([1, 1])).last_hidden_state
        assert_close_rel(got, single(input_ids=ids, attention_mask=mask).last_hidden_state, TOL, "bank entry")
    with pytest.raises(ValueError, match="shares one task head"):
        prefixattn.patch(tiny_encoder("bert"), num_prefix_tokens=P, num_prefixes=2)


def test_gradient_checkpointing_and_bf16_autocast():
    """Checkpointing gives the same prefix and head gradients; under bf16 autocast the loss is close."""
    ids, mask = text_batch(97, pad=1)
    grads = []
    for checkpointing in (False, True):
        model = prefixattn.patch(tiny_encoder("bert"), num_prefix_tokens=P, backend="torch").train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        loss = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2])).loss
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2])).loss
        assert abs(bf16.item() - loss.item()) < 3e-2 * abs(loss.item())
    for a, b in zip(*grads, strict=True):
        assert_close_rel(b, a, 1e-5, "gradient with checkpointing")


def test_lora_and_a_prefix_on_a_classifier():
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(tiny_encoder("bert"), LoraConfig(task_type="SEQ_CLS", r=4,
                                                           target_modules=["query", "value"]))
    model = prefixattn.patch(lora, num_prefix_tokens=P, backend="torch")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in names) and any("prefixattn_prefix" in n for n in names)
    assert any("classifier" in n for n in names)  # PEFT's own modules_to_save for SEQ_CLS
    ids, mask = text_batch(97, pad=1)
    model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2])).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "default" in n)


def test_refusals_name_the_reason():
    from transformers import AutoConfig, AutoModelForSequenceClassification

    deberta = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(
        "deberta-v2", vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=32))
    with pytest.raises(ValueError, match="own attention code"):
        prefixattn.patch(deberta, num_prefix_tokens=P)
    with pytest.raises(ValueError, match="applies to encoder-decoders"):
        prefixattn.patch(tiny_encoder("bert"), num_prefix_tokens=P, sites="all")


def test_hf_trainer_trains_a_classifier_with_bf16_and_checkpointing(tmp_path):
    """The HF Trainer with bf16 autocast and gradient checkpointing: the prefix and the classifier learn a
    task the frozen encoder does not know; the rest stays frozen; the checkpoint holds prefix and head."""
    from safetensors import safe_open
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 97, (16, 6), generator=g)
    labels = (ids[:, 0] > 50).long()  # 16 examples to fit
    data = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": y}
            for i, y in zip(ids, labels, strict=True)]
    model = prefixattn.patch(tiny_encoder("bert", num_labels=2), num_prefix_tokens=P, backend="torch")
    frozen = {k: v.clone() for k, v in model.state_dict().items()
              if not k.startswith(("prefixattn_prefix", "classifier"))}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=40, per_device_train_batch_size=16,
                             learning_rate=0.2, lr_scheduler_type="constant", bf16=True, gradient_checkpointing=True, use_cpu=True,
                             report_to=[], save_strategy="steps", save_steps=40, logging_steps=5,
                             dataloader_num_workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.5 * losses[0], losses
    for k, v in model.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k
    with safe_open(str(tmp_path / "checkpoint-40" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == {"prefixattn_prefix.kv", "classifier.weight", "classifier.bias"}


def test_unpatch_gives_back_the_model_as_it_was():
    base = tiny_encoder("roberta")
    ids, mask = text_batch(97, pad=1)
    with torch.no_grad():
        expected = base(input_ids=ids, attention_mask=mask).logits
    model = prefixattn.unpatch(prefixattn.patch(base, num_prefix_tokens=P, backend="torch"))
    assert not [m for m in model.modules() if m._forward_pre_hooks]
    assert not [m for m in model.modules() if any(k.startswith("_prefixattn") for k in m.__dict__)]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, expected)


def test_a_decoder_only_classifier_matches_peft_s_seq_cls():
    """PEFT's SEQ_CLS on a causal LM's classification head (Llama's ``score``): the same logits, and the
    head is PEFT's modules_to_save."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=32, pad_token_id=0, num_labels=3)).eval()
    twin = peft_twin(model, "SEQ_CLS")
    ours = prefixattn.patch(copy.deepcopy(twin), backend="torch")
    assert ours.prefixattn_prefix.heads == ("score",)
    ids, mask = text_batch(97, pad=0)
    with torch.no_grad():
        assert_close_rel(ours(input_ids=ids, attention_mask=mask).logits,
                         twin(input_ids=ids, attention_mask=mask).logits, TOL, "logits")
