"""Encoder-decoders: PEFT's SEQ_2_SEQ_LM prefix tuning by default (decoder self-attention only, PEFT's slot
layout with its sharing, decoder positions from P), generate() equal to a correct PEFT reference with the
encoder run once, Li & Liang's ``sites="all"`` against the float64 reference, the files, and the bank,
LoRA, gradient checkpointing and mixed precision on these models.

PEFT 0.21.2's generate() hands its prompt over as ``past_key_values``, which transformers >= 5.24 ignores
(tests/tiny_models.peft_generate_fixed is the corrected reference, as for causal LMs).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from family_sweep_encdec import compare_with_reference
from helpers import assert_close_rel
from tiny_encdec import P, peft_prefix_rows, peft_twin, text_batch, tiny_bart
from tiny_models import peft_generate

import prefixattn

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5


def _inputs(padding: str = "right") -> dict:
    ids, mask = text_batch(97, pad=1, padding=padding)
    decoder = torch.randint(3, 97, (2, 5), generator=torch.Generator().manual_seed(4))
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder}


def _twins(encoder_layers: int, decoder_layers: int, family: str = "bart"):
    twin = peft_twin(tiny_bart(encoder_layers, decoder_layers, family=family), "SEQ_2_SEQ_LM")
    with torch.no_grad():  # a prefix that visibly changes the outputs
        twin.prompt_encoder["default"].embedding.weight.mul_(10.0)
    return twin, prefixattn.patch(copy.deepcopy(twin), backend="torch")


@pytest.mark.parametrize("family, encoder_layers, decoder_layers", [
    ("bart", 2, 2), ("bart", 3, 2), ("mbart", 4, 3), ("pegasus", 3, 3), ("marian", 2, 1),
])
def test_matches_peft_with_its_slot_layout(family, encoder_layers, decoder_layers):
    """Decoder layer i reads PEFT's block 2i mod L (L = the encoder's layers): with an even L some layers
    share a block and others are never read. Same logits, and after one AdamW step the same blocks."""
    twin, ours = _twins(encoder_layers, decoder_layers, family)
    L = encoder_layers
    assert ours.prefixattn_prefix.config.layers == tuple(sorted({2 * i % L for i in range(decoder_layers)}))
    batch = _inputs()
    with torch.no_grad():
        assert_close_rel(ours(**batch).logits, twin(**batch).logits, TOL, "logits")
    for m in (twin, ours):
        m.train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        m(**batch, labels=batch["decoder_input_ids"]).loss.backward()
        if m is twin:
            grad = peft_prefix_rows(twin, grad=True)
            unread = sorted(set(range(L)) - set(ours.prefixattn_prefix.config.layers))
            assert not grad[unread].any(), "PEFT's never-read blocks got a gradient"
        opt.step()
        m.eval()
    layers = list(ours.prefixattn_prefix.config.layers)
    assert_close_rel(ours.prefixattn_prefix.kv.detach()[:, :, 0], peft_prefix_rows(twin)[layers], TOL,
                     "prefix after a step")
    with torch.no_grad():
        assert_close_rel(ours(**batch).logits, twin(**batch).logits, TOL, "logits after a step")


def test_a_decoder_deeper_than_the_encoder_is_refused_with_the_reason():
    model = tiny_bart(2, 3)
    twin = peft_twin(model, "SEQ_2_SEQ_LM")
    with pytest.raises(IndexError):  # PEFT's layout has no slots for decoder layer 2
        twin(**_inputs())
    with pytest.raises(ValueError, match="deeper than the encoder"):
        prefixattn.patch(copy.deepcopy(model), num_prefix_tokens=P)
    prefixattn.patch(model, num_prefix_tokens=P, sites="all", backend="torch")(**_inputs())


@pytest.mark.parametrize("kwargs", [
    {"num_beams": 1, "do_sample": False}, {"num_beams": 3, "do_sample": False},
    {"do_sample": True, "top_k": 5}, {"num_beams": 2, "do_sample": False, "num_return_sequences": 2},
])
def test_generate_equals_peft_and_runs_the_encoder_once(kwargs):
    twin, ours = _twins(3, 2)
    base = tiny_bart(3, 2)
    batch = {k: v for k, v in _inputs().items() if k != "decoder_input_ids"}
    gen = {"max_new_tokens": 6, "min_new_tokens": 6, **kwargs}
    calls = []
    ours.get_encoder().register_forward_hook(lambda *a: calls.append(1))
    torch.manual_seed(7)
    expected = peft_generate(twin, **batch, **gen)
    torch.manual_seed(7)
    got = ours.generate(**batch, **gen)
    assert torch.equal(got, expected), (got, expected)
    assert len(calls) == 1, f"the encoder ran {len(calls)} times"
    torch.manual_seed(7)
    assert not torch.equal(base.generate(**batch, **gen), got), "the prefix changed nothing"


@pytest.mark.parametrize("family, padding", [("bart", "right"), ("marian", "left")])
def test_sites_all_equals_the_float64_reference(family, padding):
    """Li & Liang: encoder self-attention, decoder self-attention and cross-attention each their own prefix
    in every layer (a decoder deeper than the encoder too): every attention call of the model equals the
    float64 reference over its own prefix."""
    model = prefixattn.patch(tiny_bart(2, 3, family=family), num_prefix_tokens=P, sites="all", backend="torch")
    config = model.prefixattn_prefix.config
    assert config.site_keys() == (("encoder", 0), ("encoder", 1), ("decoder", 0), ("decoder", 1),
                                  ("decoder", 2), ("cross", 0), ("cross", 1), ("cross", 2))
    compare_with_reference(model, _inputs(padding))
    # the prefix trains: every site gets a gradient
    model.train()
    batch = _inputs(padding)
    model(**batch, labels=batch["decoder_input_ids"]).loss.backward()
    grad = model.prefixattn_prefix.kv.grad
    assert all(grad[i].abs().sum() > 0 for i in range(len(config.layers)))


def test_sites_all_files_and_refusals(tmp_path):
    model = prefixattn.patch(tiny_bart(2, 2), num_prefix_tokens=P, sites="all", backend="torch")
    prefixattn.save_prefix(model, tmp_path / "all.safetensors")
    fresh = prefixattn.patch(tiny_bart(2, 2), num_prefix_tokens=P, sites="all", backend="torch")
    prefixattn.load_prefix(fresh, tmp_path / "all.safetensors")
    torch.testing.assert_close(fresh.prefixattn_prefix.kv, model.prefixattn_prefix.kv, rtol=0, atol=0)
    with pytest.raises(ValueError, match="decoder self-attention only"):
        prefixattn.save_peft(model, tmp_path / "adapter")
    peft_layout = prefixattn.patch(tiny_bart(2, 2), num_prefix_tokens=P, backend="torch")
    with pytest.raises(ValueError, match="sites: file has all, model has decoder"):
        prefixattn.load_prefix(peft_layout, tmp_path / "all.safetensors")
    with pytest.raises(ValueError, match="sites must be"):
        prefixattn.patch(tiny_bart(2, 2), num_prefix_tokens=P, sites="encoder")
    # save_pretrained / from_pretrained through AutoModelForSeq2SeqLM
    from transformers import AutoModelForSeq2SeqLM

    tiny_bart(2, 2).save_pretrained(tmp_path / "base")
    model = prefixattn.patch(AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "base"), num_prefix_tokens=P,
                             sites="all", backend="torch")
    model.save_pretrained(tmp_path / "trained")
    back = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "trained")
    assert back.prefixattn_prefix.config.sites == "all"
    with torch.no_grad():
        assert torch.equal(back(**_inputs()).logits, model(**_inputs()).logits)


def test_peft_adapters_both_ways(tmp_path):
    from peft import PeftModel

    twin, _ = _twins(3, 2)
    twin.save_pretrained(tmp_path / "peft")
    batch = _inputs()
    with torch.no_grad():
        expected = twin(**batch).logits
        ours = prefixattn.load_peft(tiny_bart(3, 2), tmp_path / "peft", backend="torch")
        assert ours.prefixattn_prefix.config.sites == "decoder"
        assert_close_rel(ours(**batch).logits, expected, TOL, "load_peft")
        prefixattn.save_peft(ours, tmp_path / "ours")
        back = PeftModel.from_pretrained(tiny_bart(3, 2), tmp_path / "ours")
        assert back.active_peft_config.task_type == "SEQ_2_SEQ_LM"
        assert_close_rel(back(**batch).logits, expected, TOL, "PEFT loads save_peft")


def test_a_bank_in_one_batch_and_in_generate():
    bank = prefixattn.patch(tiny_bart(3, 2), num_prefix_tokens=P, num_prefixes=3, backend="torch")
    with torch.no_grad():
        bank.prefixattn_prefix.kv.mul_(3.0)
    batch = {k: v for k, v in _inputs().items() if k != "decoder_input_ids"}
    ids = torch.tensor([2, 0])
    got = bank.generate(**batch, prefix_ids=ids, max_new_tokens=5, min_new_tokens=5, num_beams=2)
    for row, entry in enumerate(ids.tolist()):
        single = prefixattn.patch(tiny_bart(3, 2), num_prefix_tokens=P, backend="torch")
        with torch.no_grad():
            single.prefixattn_prefix.kv.copy_(bank.prefixattn_prefix.kv[:, :, entry:entry + 1])
        alone = single.generate(**batch, max_new_tokens=5, min_new_tokens=5, num_beams=2)
        assert torch.equal(got[row], alone[row])


def test_lora_and_a_prefix():
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(tiny_bart(2, 2), LoraConfig(task_type="SEQ_2_SEQ_LM", r=4,
                                                      target_modules=["q_proj", "v_proj"]))
    model = prefixattn.patch(lora, num_prefix_tokens=P, backend="torch")
    batch = _inputs()
    model(**batch, labels=batch["decoder_input_ids"]).loss.backward()
    trained = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    assert any("lora_A" in n for n in trained) and any("prefixattn_prefix" in n for n in trained)


@pytest.mark.parametrize("sites", ["decoder", "all"])
def test_gradient_checkpointing_and_bf16_autocast(sites):
    batch = _inputs()
    grads = []
    for checkpointing in (False, True):
        model = prefixattn.patch(tiny_bart(2, 2), num_prefix_tokens=P, sites=sites, backend="torch").train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        loss = model(**batch, labels=batch["decoder_input_ids"]).loss
        loss.backward()
        grads.append(model.prefixattn_prefix.kv.grad.clone())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(**batch, labels=batch["decoder_input_ids"]).loss
        assert abs(bf16.item() - loss.item()) < 3e-2 * abs(loss.item())
    assert_close_rel(grads[1], grads[0], 1e-5, "prefix gradient with checkpointing")


def test_seq2seq_trainer_predicts_with_generate_under_bf16_and_checkpointing(tmp_path):
    """transformers' Seq2SeqTrainer (predict_with_generate) with bf16 autocast and gradient checkpointing:
    the prefix learns a mapping the frozen model does not know; evaluation generates."""
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

    g = torch.Generator().manual_seed(0)
    src = torch.randint(3, 97, (16, 5), generator=g)  # 16 pairs to fit
    data = [{"input_ids": s, "attention_mask": torch.ones_like(s), "labels": (s[:3] * 7) % 90 + 3} for s in src]
    # weights larger than BART's init (std 0.02 gives near-uniform logits that a prefix moves slowly)
    model = prefixattn.patch(tiny_bart(2, 2, init_std=0.3), num_prefix_tokens=8, backend="torch")
    model.generation_config.max_new_tokens = 4
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), max_steps=40, per_device_train_batch_size=16, per_device_eval_batch_size=8,
        learning_rate=0.2, lr_scheduler_type="constant", bf16=True, gradient_checkpointing=True, use_cpu=True, report_to=[],
        predict_with_generate=True, save_strategy="no", logging_steps=5, dataloader_num_workers=0)
    collator = DataCollatorForSeq2Seq(tokenizer=None, model=model, label_pad_token_id=-100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=data, eval_dataset=data[:8],
                                 data_collator=_pad_free(collator))
        trainer.train()
        predictions = trainer.predict(data[:8])
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.8 * losses[0], losses
    assert predictions.predictions.shape[0] == 8 and predictions.predictions.shape[1] >= 2


def _pad_free(collator):
    """The rows are all the same length: stack them (DataCollatorForSeq2Seq wants a tokenizer to pad)."""
    def collate(rows):
        batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        batch["decoder_input_ids"] = collator.model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
        return batch
    return collate


def test_sites_all_generate_equals_the_model_run_token_by_token():
    """generate() with every site prefixed (the cache holds the sequence only; cross-attention's keys come
    from the cache after the first step) gives the tokens of full forwards without a cache."""
    model = prefixattn.patch(tiny_bart(2, 3), num_prefix_tokens=P, sites="all", backend="torch")
    with torch.no_grad():
        model.prefixattn_prefix.kv.mul_(5.0)
    batch = {k: v for k, v in _inputs("left").items() if k != "decoder_input_ids"}
    got = model.generate(**batch, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    tokens = torch.full((2, 1), model.config.decoder_start_token_id)
    with torch.no_grad():
        for _ in range(5):
            logits = model(**batch, decoder_input_ids=tokens, use_cache=False).logits[:, -1]
            logits[:, model.config.eos_token_id] = -torch.inf  # min_new_tokens
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, tokens)


@pytest.mark.parametrize("sites", ["decoder", "all"])
def test_unpatch_gives_back_the_model_as_it_was(sites):
    base = tiny_bart(3, 2)
    with torch.no_grad():
        expected = base(**_inputs()).logits
    model = prefixattn.patch(base, num_prefix_tokens=P, sites=sites, backend="torch")
    prefixattn.unpatch(model)
    hooks = [m for m in model.modules() if m._forward_pre_hooks]
    tagged = [m for m in model.modules() if any(k.startswith("_prefixattn") for k in m.__dict__)]
    assert not hooks and not tagged, (hooks, tagged)
    with torch.no_grad():
        assert torch.equal(model(**_inputs()).logits, expected)
