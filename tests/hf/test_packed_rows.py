"""Packed (padding-free) rows: DataCollatorWithFlattening's output (position_ids that restart, and
optionally flash-attn's cu_seq_lens_q/k) through a patched model gives, per document, the logits and the
prefix gradient of running that document alone through PEFT (positions from P in every document), on the
torch backend and on the Triton kernels; packing with a KV cache is refused; the HF Trainer trains on
flattened batches."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_rel
from tiny_models import VOCAB, patched_twin, peft_prefix_as_kv, peft_twin, tiny_model
from transformers import DataCollatorWithFlattening, DynamicCache

from prefixattn.ops.backend import missing_kernel_features

TOL = 1e-4
DOC_LENGTHS = (3, 6, 1, 4)  # one single-token document


def _documents(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in DOC_LENGTHS]


def _needs_kernel_documents(backend: str) -> None:
    if backend == "triton" and missing_kernel_features(dk=16, dv=16, sliding_window=None, documents=True,
                                                       sinks=None):
        pytest.skip("the Triton kernels do not implement documents yet (backend='triton' refuses them)")


@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_packed_row_equals_each_document_alone(family, backend, flash_kwargs):
    _needs_kernel_documents(backend)
    peft_model = peft_twin(tiny_model(family), num_virtual_tokens=3)
    ours = patched_twin(peft_model, backend=backend)
    docs = _documents()
    packed = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)([{"input_ids": d} for d in docs])
    assert packed["input_ids"].shape == (1, sum(DOC_LENGTHS)) and "attention_mask" not in packed
    inputs = {k: v for k, v in packed.items() if k not in ("labels", "max_length_q", "max_length_k")}
    weights = torch.randn(1, sum(DOC_LENGTHS), VOCAB, generator=torch.Generator().manual_seed(5))

    logits = ours(**inputs).logits
    (logits * weights).sum().backward()

    expected, start = [], 0
    for d in docs:
        alone = peft_model(input_ids=torch.tensor([d])).logits
        (alone * weights[:, start : start + len(d)]).sum().backward()
        expected.append(alone)
        start += len(d)
    assert_close_rel(logits, torch.cat(expected, dim=1), TOL, "logits")
    assert_close_rel(ours.prefixattn_prefix.kv.grad, peft_prefix_as_kv(peft_model, grad=True), TOL, "grad")
    # the documents really are separate: the same row read as one sequence differs
    with torch.no_grad():
        one_sequence = ours(input_ids=packed["input_ids"]).logits
    assert (one_sequence - logits).abs().max() > 1e-2


def test_packed_rows_with_a_bank_and_several_rows():
    """Two packed rows (different documents, different bank entries) equal each document alone."""
    import prefixattn

    model = prefixattn.patch(tiny_model("qwen2"), num_prefix_tokens=2, num_prefixes=3, backend="torch")
    rows = [_documents(1), _documents(2)[::-1]]
    flat = [DataCollatorWithFlattening()([{"input_ids": d} for d in docs]) for docs in rows]
    ids = torch.cat([f["input_ids"] for f in flat])
    pos = torch.cat([f["position_ids"] for f in flat])
    prefix_ids = torch.tensor([2, 0])
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=pos, prefix_ids=prefix_ids).logits
        for b, docs in enumerate(rows):
            start = 0
            for d in docs:
                alone = model(input_ids=torch.tensor([d]), prefix_ids=prefix_ids[b : b + 1]).logits
                assert_close_rel(logits[b : b + 1, start : start + len(d)], alone, TOL, f"row {b}")
                start += len(d)


def test_packing_with_a_kv_cache_is_refused():
    import prefixattn

    model = prefixattn.patch(tiny_model("llama"), num_prefix_tokens=2, backend="torch")
    packed = DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": d} for d in _documents()])
    with torch.no_grad(), pytest.raises(ValueError, match="packed rows .*KV cache"):
        model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
              past_key_values=DynamicCache(config=model.config))
    with torch.no_grad(), pytest.raises(ValueError, match="packed rows .*KV cache"):
        model(input_ids=packed["input_ids"], cu_seq_lens_q=packed["cu_seq_lens_q"],
              cu_seq_lens_k=packed["cu_seq_lens_k"], past_key_values=DynamicCache(config=model.config))
    # positions that simply continue (chunked prefill with a cache) are not packing
    with torch.no_grad():
        model(input_ids=packed["input_ids"][:, :5], position_ids=torch.arange(5)[None],
              past_key_values=DynamicCache(config=model.config))


def test_the_hf_trainer_trains_on_flattened_batches(tmp_path):
    from transformers import Trainer, TrainingArguments

    import prefixattn

    model = prefixattn.patch(tiny_model("llama").train(), num_prefix_tokens=2, backend="torch")
    data = [{"input_ids": d} for seed in range(4) for d in _documents(seed)]
    before = model.prefixattn_prefix.kv.detach().clone()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3,
                             learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no",
                             logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=DataCollatorWithFlattening())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(model.prefixattn_prefix.kv.detach(), before)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
