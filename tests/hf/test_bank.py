"""A bank of prefixes: ``patch(model, num_prefix_tokens=P, num_prefixes=N)`` and ``model(..., prefix_ids=ids)``.

Every row of a mixed batch must behave exactly as if it ran alone with its own entry, which is checked
against two independent computations: prefixattn with a single prefix holding that entry, and PEFT prefix
tuning holding that entry's values (logits, prefix gradients, greedy/beam/sampled generations with left
padding). Also: a mixed batch trains N tasks at once, unused entries get exactly zero gradient (torch and
triton backends), bad prefix_ids are refused before any attention runs, and saving/loading one entry, the
whole bank, or one entry as a PEFT adapter round-trips (mismatches are clear errors that change nothing);
the HF Trainer trains a bank given remove_unused_columns=False, and says so otherwise.
"""

from __future__ import annotations

import copy
import importlib
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rel, rel_err
from tiny_models import (
    FAMILIES,
    batch,
    generate,
    labels_for,
    patched_twin,
    peft_prefix_as_kv,
    peft_twin,
    tiny_model,
)

import prefixattn
from prefixattn.tasks import SuccessorTask

TOL = 1e-4  # relative, fp32 (as in the PEFT parity tests)
P = 4
N = 3

patch_module = importlib.import_module("prefixattn.hf.attention")


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# Set-up: a bank whose entry i holds the values of an independent PEFT model i
# ----------------------------------------------------------------------------------------------


def _bank_and_twins(family="llama", n=N, backend="torch", num_prefix_tokens=P):
    """(bank model, [PEFT model per entry], [single-prefix prefixattn model per entry]).

    Entry i of the bank is filled from PEFT model i's own embedding through the test helper
    ``peft_prefix_as_kv`` (not through prefixattn's layout code)."""
    base = tiny_model(family)
    peft_models = [peft_twin(base, num_prefix_tokens, seed=10 + i) for i in range(n)]
    bank = prefixattn.patch(copy.deepcopy(base), num_prefix_tokens=num_prefix_tokens, num_prefixes=n,
                            backend=backend, init="zeros")
    with torch.no_grad():
        for i, pm in enumerate(peft_models):
            bank.prefixattn_prefix.kv[:, :, i] = peft_prefix_as_kv(pm)[:, :, 0]
    singles = [patched_twin(pm, backend=backend) for pm in peft_models]
    return bank, peft_models, singles


def _sum_loss(logits, labels):
    """Token-summed next-token loss: its gradient splits exactly into the rows' contributions."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100,
                           reduction="sum")


def _gen(model, ids, mask, **kw):
    return generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=5, pad_token_id=0, **kw)


# ----------------------------------------------------------------------------------------------
# Forward and backward of a mixed batch
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,padding", [*((f, "left") for f in FAMILIES), ("llama", "right"),
                                            ("gemma2", "right"), ("qwen3", "none")])
def test_each_row_of_a_mixed_batch_equals_running_it_alone_with_its_entry(family, padding):
    bank, peft_models, singles = _bank_and_twins(family)
    ids, mask = batch(batch_size=4, length=7, padding=padding, seed=21)
    prefix_ids = torch.tensor([2, 0, 2, 1])
    with torch.no_grad():
        mixed = bank(input_ids=ids, attention_mask=mask, prefix_ids=prefix_ids).logits
        for b, i in enumerate(prefix_ids.tolist()):
            row = dict(input_ids=ids[b : b + 1], attention_mask=mask[b : b + 1])
            assert_close_rel(mixed[b : b + 1], peft_models[i](**row).logits, TOL, f"row {b} vs PEFT entry {i}")
            assert_close_rel(mixed[b : b + 1], singles[i](**row).logits, TOL, f"row {b} vs single entry {i}")
            # the entries really differ: the row would come out otherwise with another entry
            other = (i + 1) % N
            assert rel_err(mixed[b : b + 1], peft_models[other](**row).logits) > 100 * TOL


def test_int32_prefix_ids_are_accepted():
    bank, _, _ = _bank_and_twins()
    ids, mask = batch(batch_size=3, padding="left", seed=22)
    with torch.no_grad():
        a = bank(input_ids=ids, attention_mask=mask, prefix_ids=torch.tensor([1, 2, 0])).logits
        b = bank(input_ids=ids, attention_mask=mask, prefix_ids=torch.tensor([1, 2, 0], dtype=torch.int32)).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _check_mixed_grads(bank, peft_models, singles, ids, mask, prefix_ids, tol=TOL):
    """Sum-reduced loss of the mixed batch: the gradient of entry i must equal PEFT's (and the single
    prefix model's) gradient over the rows that use entry i; entries no row uses get exactly zero."""
    labels = labels_for(ids, mask)
    _sum_loss(bank(input_ids=ids, attention_mask=mask, prefix_ids=prefix_ids).logits, labels).backward()
    grad = bank.prefixattn_prefix.kv.grad
    for i in range(grad.shape[2]):
        rows = (prefix_ids == i).nonzero().flatten()
        if rows.numel() == 0:
            assert torch.count_nonzero(grad[:, :, i]) == 0, f"unused entry {i} got a gradient"
            continue
        sub = dict(input_ids=ids[rows], attention_mask=mask[rows])
        pm, single = peft_models[i], singles[i]
        _sum_loss(pm(**sub).logits, labels[rows]).backward()
        _sum_loss(single(**sub).logits, labels[rows]).backward()
        assert_close_rel(grad[:, :, i], peft_prefix_as_kv(pm, grad=True)[:, :, 0], tol, f"entry {i} vs PEFT")
        assert_close_rel(grad[:, :, i], single.prefixattn_prefix.kv.grad[:, :, 0], tol, f"entry {i} vs single")
    return grad


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_mixed_batch_prefix_gradients_match_peft_per_entry(family):
    bank, peft_models, singles = _bank_and_twins(family, n=4)
    ids, mask = batch(batch_size=5, length=6, padding="left", seed=23)
    prefix_ids = torch.tensor([3, 0, 3, 0, 3])  # entries 1 and 2 unused
    bank.train()
    grad = _check_mixed_grads(bank, peft_models, singles, ids, mask, prefix_ids)
    assert torch.count_nonzero(grad[:, :, 0]) > 0 and torch.count_nonzero(grad[:, :, 3]) > 0
    # the frozen model stays frozen
    assert [n for n, p in bank.named_parameters() if p.requires_grad] == ["prefixattn_prefix.kv"]


def test_triton_backend_mixed_batch_logits_and_grads():
    """The fused kernels (the interpreter on CPU), tiny shapes: logits and per-entry gradients equal PEFT's,
    and the unused entry's gradient is exactly zero."""
    bank, peft_models, singles = _bank_and_twins("llama", n=3, backend="triton", num_prefix_tokens=3)
    ids, mask = batch(batch_size=3, length=5, padding="left", seed=24)
    prefix_ids = torch.tensor([2, 0, 2])  # entry 1 unused
    with torch.no_grad():
        mixed = bank(input_ids=ids, attention_mask=mask, prefix_ids=prefix_ids).logits
    for b, i in enumerate(prefix_ids.tolist()):
        with torch.no_grad():
            alone = peft_models[i](input_ids=ids[b : b + 1], attention_mask=mask[b : b + 1]).logits
        assert_close_rel(mixed[b : b + 1], alone, TOL, f"row {b}")
    grad = _check_mixed_grads(bank, peft_models, singles, ids, mask, prefix_ids)
    assert torch.count_nonzero(grad[:, :, 0]) > 0 and torch.count_nonzero(grad[:, :, 2]) > 0


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_with_a_bank_gives_the_same_gradients(use_reentrant):
    bank, _, _ = _bank_and_twins("llama")
    ckpt = copy.deepcopy(bank)
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(ckpt, "activation_checkpointing_enable"):  # transformers >= 5.2x
        ckpt.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    ids, mask = batch(batch_size=3, padding="left", seed=35)
    grads = []
    for model in (bank, ckpt):
        model.train()
        _sum_loss(model(input_ids=ids, attention_mask=mask, prefix_ids=torch.tensor([2, 0, 2])).logits,
                  labels_for(ids, mask)).backward()
        grads.append(model.prefixattn_prefix.kv.grad)
    assert torch.count_nonzero(grads[1][:, :, 1]) == 0
    assert_close_rel(grads[1], grads[0], 1e-5, "checkpointed grads")


def test_optimizer_step_leaves_unused_entries_unchanged():
    bank, _, _ = _bank_and_twins("llama", n=3)
    bank.train()
    opt = torch.optim.Adam([bank.prefixattn_prefix.kv], lr=1e-2)
    before = bank.prefixattn_prefix.kv.detach().clone()
    ids, mask = batch(batch_size=3, padding="right", seed=25)
    for _ in range(2):
        loss = bank(input_ids=ids, attention_mask=mask, labels=labels_for(ids, mask),
                    prefix_ids=torch.tensor([0, 2, 0])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = bank.prefixattn_prefix.kv.detach()
    assert torch.equal(after[:, :, 1], before[:, :, 1])
    assert not torch.equal(after[:, :, 0], before[:, :, 0]) and not torch.equal(after[:, :, 2], before[:, :, 2])


# ----------------------------------------------------------------------------------------------
# Training N tasks at once
# ----------------------------------------------------------------------------------------------


def _task_loss(model, task, step, rows, split="train", **kw):
    b = task.batch(step, batch_size=rows, split=split)
    return model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels, **kw).loss


def test_a_mixed_batch_trains_each_entry_on_its_own_task():
    """Three successor tasks (different permutations) in every batch, one entry each. The loss is the sum of
    the per-task mean losses, so entry i's gradient is task i's alone: the bank's per-task curves equal
    three single-prefix models trained separately, and each entry ends up solving its own task only."""
    steps, rows, n = 30, 4, 3
    tasks = [SuccessorTask(seed=7 + i, seq_len=10, bos_token_id=1, first_token=3) for i in range(n)]
    base = tiny_model("llama", initializer_range=0.15)
    bank = prefixattn.patch(copy.deepcopy(base), num_prefix_tokens=16, num_prefixes=n, backend="torch")
    singles = []
    for i in range(n):
        single = prefixattn.patch(copy.deepcopy(base), num_prefix_tokens=16, backend="torch", init="zeros")
        with torch.no_grad():
            single.prefixattn_prefix.kv.copy_(bank.prefixattn_prefix.kv[:, :, i : i + 1])
        singles.append(single.train())
    bank.train()

    def eval_matrix():  # [entry, task] held-out loss
        with torch.no_grad():
            return torch.tensor([[_task_loss(bank, t, 0, 16, "eval", prefix_ids=torch.full((16,), i)).item()
                                  for t in tasks] for i in range(n)])

    start = eval_matrix()
    opt = torch.optim.Adam([bank.prefixattn_prefix.kv], lr=5e-2)
    opts = [torch.optim.Adam([s.prefixattn_prefix.kv], lr=5e-2) for s in singles]
    bank_curves, single_curves = torch.zeros(n, steps), torch.zeros(n, steps)
    for step in range(steps):
        bs = [t.batch(step, batch_size=rows) for t in tasks]
        ids = torch.cat([b.input_ids for b in bs])
        labels = torch.cat([b.labels for b in bs])
        prefix_ids = torch.arange(n).repeat_interleave(rows)
        logits = bank(input_ids=ids, prefix_ids=prefix_ids).logits
        per_task = [F.cross_entropy(logits[prefix_ids == i, :-1].flatten(0, 1),
                                    labels[prefix_ids == i, 1:].flatten(), ignore_index=-100) for i in range(n)]
        opt.zero_grad()
        sum(per_task).backward()
        opt.step()
        bank_curves[:, step] = torch.tensor([loss.item() for loss in per_task])
        for i, (single, o) in enumerate(zip(singles, opts, strict=True)):
            loss = _task_loss(single, tasks[i], step, rows)
            o.zero_grad()
            loss.backward()
            o.step()
            single_curves[i, step] = loss.item()
    rel = ((bank_curves - single_curves).abs() / single_curves).max().item()
    assert rel < 1e-3, f"bank and separate training differ by {rel:.2e}\n{bank_curves}\n{single_curves}"
    end = eval_matrix()
    diag = end.diagonal()
    assert (diag < 0.5 * start.diagonal()).all(), (start, end)  # each entry learned its task
    off = end + torch.diag(torch.full((n,), float("inf")))
    assert (diag < 0.7 * off.min(dim=1).values).all(), end  # ... and not the others'
    assert (diag < 0.7 * off.min(dim=0).values).all(), end  # each task is best solved by its own entry


# ----------------------------------------------------------------------------------------------
# generate()
# ----------------------------------------------------------------------------------------------


def test_greedy_and_beam_generate_of_a_mixed_batch_equal_peft_per_row():
    bank, peft_models, _ = _bank_and_twins("llama")
    ids, mask = batch(batch_size=4, length=6, padding="left", seed=26)
    prefix_ids = torch.tensor([1, 2, 0, 1])
    greedy = _gen(bank, ids, mask, prefix_ids=prefix_ids, do_sample=False)
    beams = _gen(bank, ids, mask, prefix_ids=prefix_ids, do_sample=False, num_beams=3, num_return_sequences=2)
    assert beams.shape[0] == 8
    for b, i in enumerate(prefix_ids.tolist()):
        row_ids, row_mask = ids[b : b + 1], mask[b : b + 1]
        assert torch.equal(greedy[b : b + 1], _gen(peft_models[i], row_ids, row_mask, do_sample=False)), b
        expected = _gen(peft_models[i], row_ids, row_mask, do_sample=False, num_beams=3, num_return_sequences=2)
        assert torch.equal(beams[2 * b : 2 * b + 2], expected), b
    # the entries steer generation differently (so the comparison above can fail)
    same = [torch.equal(greedy[b], _gen(peft_models[(i + 1) % N], ids, mask, do_sample=False)[b])
            for b, i in enumerate(prefix_ids.tolist())]
    assert not all(same)


def test_sampled_generate_of_a_mixed_batch_equals_peft_per_row():
    """Sampling draws each row's random numbers independently of the other rows' probabilities, so the same
    seed gives row b of the mixed batch what PEFT with entry prefix_ids[b] gives row b of the whole batch."""
    bank, peft_models, _ = _bank_and_twins("llama")
    ids, mask = batch(batch_size=3, length=6, padding="left", seed=27)
    prefix_ids = torch.tensor([2, 0, 1])
    kw = dict(do_sample=True, top_k=20, temperature=0.9, num_return_sequences=2)
    torch.manual_seed(123)
    got = _gen(bank, ids, mask, prefix_ids=prefix_ids, **kw)
    assert got.shape[0] == 6
    for i in range(N):
        torch.manual_seed(123)
        expected = _gen(peft_models[i], ids, mask, **kw)
        for b in (prefix_ids == i).nonzero().flatten().tolist():
            assert torch.equal(got[2 * b : 2 * b + 2], expected[2 * b : 2 * b + 2]), (b, i)


def test_generate_from_inputs_embeds_with_prefix_ids_equals_from_input_ids():
    """generate() checks which inputs prepare_inputs_for_generation forwards by its signature: the bank's
    wrapper shows the model's own (inputs_embeds included) plus prefix_ids."""
    bank, _, _ = _bank_and_twins("llama")
    ids, mask = batch(batch_size=3, length=6, padding="left", seed=29)
    prefix_ids = torch.tensor([2, 0, 1])
    embeds = bank.get_input_embeddings()(ids)
    kw = dict(attention_mask=mask, prefix_ids=prefix_ids, max_new_tokens=4, pad_token_id=0, do_sample=False)
    from_embeds = bank.generate(inputs_embeds=embeds, **kw)  # the new tokens only
    from_ids = bank.generate(input_ids=ids, **kw)
    assert torch.equal(from_embeds, from_ids[:, ids.shape[1]:])


def test_generate_needs_prefix_ids_on_a_bank_and_refuses_them_on_a_single_prefix():
    bank, peft_models, singles = _bank_and_twins("llama")
    ids, mask = batch(batch_size=2, length=5, padding="left", seed=28)
    with pytest.raises(ValueError, match="pass prefix_ids"):
        _gen(bank, ids, mask, do_sample=False)
    with pytest.raises(ValueError, match="prefix_ids"):
        _gen(singles[0], ids, mask, do_sample=False, prefix_ids=torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="out of range"):
        _gen(bank, ids, mask, do_sample=False, prefix_ids=torch.tensor([0, N]))
    # one id per prompt: generate() repeats them for the beams / returned sequences, not the caller
    with pytest.raises(ValueError, match=r"shape \(batch,\) = \(4,\), got \(8,\).*one id per row"):
        _gen(bank, ids, mask, do_sample=False, num_beams=2, prefix_ids=torch.tensor([0, 1, 0, 1]))


# ----------------------------------------------------------------------------------------------
# Validation: before any attention runs
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def attention_calls(monkeypatch):
    """Counts the calls that reach prefixattn.prefix_attention from the patched model."""
    calls = []
    real = patch_module.prefix_attention

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(patch_module, "prefix_attention", spy)
    return calls


BAD_PREFIX_IDS = [
    ([0, 1, 2], TypeError, "torch.Tensor"),
    (torch.tensor([0.0, 1.0, 2.0]), TypeError, "int64"),
    (torch.tensor([True, False, True]), TypeError, "int64"),
    (torch.tensor([0, 1, 2], dtype=torch.int16), TypeError, "int64"),
    (torch.tensor([0, 1]), ValueError, r"shape \(batch,\) = \(3,\)"),
    (torch.tensor([[0], [1], [2]]), ValueError, r"shape \(batch,\) = \(3,\)"),
    (torch.tensor(1), ValueError, r"shape \(batch,\) = \(3,\)"),
    (torch.tensor([0, 3, 1]), ValueError, r"out of range.*\[0, 3\].*3 entries"),
    (torch.tensor([0, -1, 1]), ValueError, r"out of range.*\[-1, 1\]"),
]


@pytest.mark.parametrize("bad,error,match", BAD_PREFIX_IDS, ids=lambda x: None)
def test_bad_prefix_ids_are_refused_before_any_attention(bad, error, match, attention_calls):
    bank, _, _ = _bank_and_twins("llama")
    attention_calls.clear()  # (patch() itself runs the model once)
    ids, mask = batch(batch_size=3, padding="left", seed=29)
    with pytest.raises(error, match=match):
        bank(input_ids=ids, attention_mask=mask, prefix_ids=bad)
    assert attention_calls == []
    bank(input_ids=ids, attention_mask=mask, prefix_ids=torch.tensor([0, 1, 2]))  # and a good call goes through
    assert attention_calls


def test_missing_or_unexpected_prefix_ids_are_errors(attention_calls):
    bank, _, singles = _bank_and_twins("llama")
    attention_calls.clear()  # (patch() itself runs the model once)
    ids, mask = batch(batch_size=2, padding="left", seed=30)
    with pytest.raises(ValueError, match=f"bank of {N} prefixes: pass prefix_ids"):
        bank(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="single prefix"):
        singles[0](input_ids=ids, attention_mask=mask, prefix_ids=torch.tensor([0, 0]))
    with pytest.raises(TypeError, match="torch.Tensor"):
        _gen(bank, ids, mask, do_sample=False, prefix_ids=[0, 1])
    assert attention_calls == []


def test_a_bank_refuses_the_mlp_reparameterization():
    with pytest.raises(ValueError, match="bank"):
        prefixattn.patch(tiny_model("llama"), num_prefix_tokens=P, num_prefixes=2, prefix_projection=True)


# ----------------------------------------------------------------------------------------------
# save_prefix / load_prefix: one entry, the whole bank
# ----------------------------------------------------------------------------------------------


def _bank(n=N, num_prefix_tokens=P, seed=0, family="llama"):
    model = tiny_model(family)  # (seeds the model with 0)
    torch.manual_seed(seed)  # the prefix's random init
    return prefixattn.patch(model, num_prefix_tokens=num_prefix_tokens, num_prefixes=n, backend="torch")


def _kv(model):
    return model.prefixattn_prefix.kv.detach().clone()


def test_whole_bank_round_trip(tmp_path):
    a, b = _bank(seed=1), _bank(seed=2)
    assert not torch.equal(_kv(a), _kv(b))
    path = tmp_path / "bank.safetensors"
    prefixattn.save_prefix(a, path)
    prefixattn.load_prefix(b, path)
    assert torch.equal(_kv(b), _kv(a))
    ids, mask = batch(batch_size=3, padding="left", seed=31)
    pid = torch.tensor([2, 1, 0])
    with torch.no_grad():
        torch.testing.assert_close(b(input_ids=ids, attention_mask=mask, prefix_ids=pid).logits,
                                   a(input_ids=ids, attention_mask=mask, prefix_ids=pid).logits, rtol=0, atol=0)
    assert sorted(os.listdir(tmp_path)) == ["bank.safetensors"]


def test_one_entry_round_trips_into_any_entry_and_into_a_single_prefix_model(tmp_path):
    a, b = _bank(seed=1), _bank(seed=2)
    path = tmp_path / "entry.safetensors"
    prefixattn.save_prefix(a, path, prefix_id=1)
    # only that entry is in the file
    assert path.stat().st_size < _kv(a)[:, :, 1].numel() * 4 + 4096
    before = _kv(b)
    prefixattn.load_prefix(b, path, prefix_id=2)
    after = _kv(b)
    assert torch.equal(after[:, :, 2], _kv(a)[:, :, 1])
    assert torch.equal(after[:, :, :2], before[:, :, :2])  # the other entries are untouched
    # a single-prefix model loads an entry file as its prefix, and computes what the bank computes
    single = prefixattn.patch(tiny_model("llama"), num_prefix_tokens=P, backend="torch")
    prefixattn.load_prefix(single, path)
    assert torch.equal(_kv(single)[:, :, 0], _kv(a)[:, :, 1])
    ids, mask = batch(batch_size=2, padding="left", seed=32)
    with torch.no_grad():
        torch.testing.assert_close(single(input_ids=ids, attention_mask=mask).logits,
                                   a(input_ids=ids, attention_mask=mask, prefix_ids=torch.tensor([1, 1])).logits,
                                   rtol=0, atol=0)
    # and a single-prefix model's file fills a bank entry
    prefixattn.save_prefix(single, tmp_path / "single.safetensors")
    prefixattn.load_prefix(b, tmp_path / "single.safetensors", prefix_id=0)
    assert torch.equal(_kv(b)[:, :, 0], _kv(a)[:, :, 1])


def test_a_bank_of_one_is_a_single_entry(tmp_path):
    """A whole-bank file of a bank with N=1 is one entry: it fills any entry of a bigger bank."""
    one, target = _bank(n=1, seed=5), _bank(seed=6)
    prefixattn.save_prefix(one, tmp_path / "one.safetensors")
    before = _kv(target)
    prefixattn.load_prefix(target, tmp_path / "one.safetensors", prefix_id=1)
    assert torch.equal(_kv(target)[:, :, 1], _kv(one)[:, :, 0])
    assert torch.equal(_kv(target)[:, :, [0, 2]], before[:, :, [0, 2]])
    with pytest.raises(ValueError, match="num_prefixes: file has 1, model has 3"):
        prefixattn.load_prefix(_bank(seed=6), tmp_path / "one.safetensors")


def test_bank_file_mismatches_are_clear_errors_that_leave_the_model_untouched(tmp_path):
    whole, entry = tmp_path / "whole.safetensors", tmp_path / "entry.safetensors"
    prefixattn.save_prefix(_bank(seed=1), whole)
    prefixattn.save_prefix(_bank(seed=1), entry, prefix_id=0)
    target = _bank(n=4, seed=3)
    before = _kv(target)
    with pytest.raises(ValueError, match="num_prefixes: file has 3, model has 4"):
        prefixattn.load_prefix(target, whole)
    with pytest.raises(ValueError, match="holds a bank of 3 prefixes; prefix_id loads a single-entry file"):
        prefixattn.load_prefix(target, whole, prefix_id=1)
    with pytest.raises(ValueError, match="holds a single prefix but the model has a bank of 4: pass prefix_id"):
        prefixattn.load_prefix(target, entry)
    for bad in (4, -1):
        with pytest.raises(ValueError, match=f"prefix_id {bad} is out of range: the bank has 4 entries"):
            prefixattn.load_prefix(target, entry, prefix_id=bad)
    for bad in (True, 1.0, "1"):
        with pytest.raises(TypeError, match="prefix_id must be an int"):
            prefixattn.load_prefix(target, entry, prefix_id=bad)
    prefixattn.save_prefix(_bank(num_prefix_tokens=P + 1, seed=1), tmp_path / "p5.safetensors", prefix_id=2)
    with pytest.raises(ValueError, match=f"num_tokens: file has {P + 1}, model has {P}"):
        prefixattn.load_prefix(target, tmp_path / "p5.safetensors", prefix_id=2)
    assert torch.equal(_kv(target), before)
    # a whole bank into a single-prefix model, and prefix_id on a single-prefix model
    single = prefixattn.patch(tiny_model("llama"), num_prefix_tokens=P, backend="torch")
    single_before = _kv(single)
    with pytest.raises(ValueError, match="num_prefixes: file has 3, model has 1"):
        prefixattn.load_prefix(single, whole)
    with pytest.raises(ValueError, match="single prefix"):
        prefixattn.load_prefix(single, entry, prefix_id=0)
    assert torch.equal(_kv(single), single_before)


def test_save_with_a_bad_prefix_id_writes_nothing(tmp_path):
    bank = _bank()
    single = prefixattn.patch(tiny_model("llama"), num_prefix_tokens=P, backend="torch")
    with pytest.raises(ValueError, match="out of range"):
        prefixattn.save_prefix(bank, tmp_path / "a.safetensors", prefix_id=N)
    with pytest.raises(ValueError, match="single prefix"):
        prefixattn.save_prefix(single, tmp_path / "b.safetensors", prefix_id=0)
    with pytest.raises(ValueError, match="out of range"):
        prefixattn.save_peft(bank, tmp_path / "c", prefix_id=-1)
    with pytest.raises(ValueError, match="pass prefix_id"):
        prefixattn.save_peft(bank, tmp_path / "d")
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# One entry as a PEFT adapter
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_any_entry_exports_as_a_peft_adapter(tmp_path, family):
    from peft import PeftModel

    base = tiny_model(family)
    bank = prefixattn.patch(copy.deepcopy(base), num_prefix_tokens=P, num_prefixes=N, backend="torch")
    ids, mask = batch(batch_size=3, length=6, padding="left", seed=33)
    for entry in (2, 0):
        out = tmp_path / f"entry{entry}"
        prefixattn.save_peft(bank, out, prefix_id=entry)
        assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
        assert torch.equal(peft_prefix_as_kv(peft_model)[:, :, 0], _kv(bank)[:, :, entry])
        pid = torch.full((3,), entry)
        with torch.no_grad():
            ours = bank(input_ids=ids, attention_mask=mask, prefix_ids=pid).logits
            theirs = peft_model(input_ids=ids, attention_mask=mask).logits
        assert_close_rel(ours, theirs, TOL, f"entry {entry} logits")
        assert torch.equal(_gen(bank, ids, mask, do_sample=False, prefix_ids=pid),
                           _gen(peft_model, ids, mask, do_sample=False))


def test_load_peft_fills_one_entry(tmp_path):
    src, dst = _bank(seed=1), _bank(seed=2)
    prefixattn.save_peft(src, tmp_path, prefix_id=1)
    before = _kv(dst)
    prefixattn.load_peft(dst, tmp_path, prefix_id=0)
    after = _kv(dst)
    assert torch.equal(after[:, :, 0], _kv(src)[:, :, 1])
    assert torch.equal(after[:, :, 1:], before[:, :, 1:])
    with pytest.raises(ValueError, match="pass prefix_id"):
        prefixattn.load_peft(dst, tmp_path)
    with pytest.raises(ValueError, match="out of range"):
        prefixattn.load_peft(dst, tmp_path, prefix_id=N)
    with pytest.raises(ValueError, match="already patched"):
        prefixattn.load_peft(tiny_model("llama"), tmp_path, prefix_id=0)
    assert torch.equal(_kv(dst), after)
    # an unpatched model is patched with the adapter's single-prefix shape: asking for a bank is refused
    # up front, and leaves the model unpatched
    plain = tiny_model("llama")
    with pytest.raises(ValueError, match=r"\['num_prefixes'\] cannot be set here.*patch first"):
        prefixattn.load_peft(plain, tmp_path, num_prefixes=N)
    assert not prefixattn.is_patched(plain)


# ----------------------------------------------------------------------------------------------
# Init from text, copies, unpatch
# ----------------------------------------------------------------------------------------------


def test_init_from_text_gives_each_entry_its_own_text():
    texts = [[5, 6, 7], [40, 41], [90]]
    bank = prefixattn.patch(tiny_model("llama"), num_prefix_tokens=P, num_prefixes=N, init="text",
                            init_text=texts, backend="torch")
    for i, text in enumerate(texts):
        single = prefixattn.patch(tiny_model("llama"), num_prefix_tokens=P, init="text", init_text=text,
                                  backend="torch")
        assert torch.equal(_kv(bank)[:, :, i], _kv(single)[:, :, 0]), i
    with pytest.raises(ValueError, match="init_text lists 2 texts for a bank of 3"):
        prefixattn.patch(tiny_model("llama"), num_prefix_tokens=P, num_prefixes=N, init="text",
                         init_text=texts[:2])


def test_deepcopy_and_unpatch_of_a_bank_model():
    bank = _bank(seed=4)
    ids, mask = batch(batch_size=2, length=5, padding="left", seed=34)
    pid = torch.tensor([2, 0])
    twin = copy.deepcopy(bank)
    assert twin.prepare_inputs_for_generation.model is twin  # the copy generates with its own prefix
    with torch.no_grad():  # the copy's entry i holds the original's entry (i + 1) % N
        twin.prefixattn_prefix.kv.copy_(bank.prefixattn_prefix.kv[:, :, [1, 2, 0]])
    a = _gen(bank, ids, mask, do_sample=False, prefix_ids=pid)
    assert torch.equal(_gen(twin, ids, mask, do_sample=False, prefix_ids=(pid - 1) % N), a)
    assert not torch.equal(_gen(twin, ids, mask, do_sample=False, prefix_ids=pid), a)
    prefixattn.unpatch(bank)
    assert "prepare_inputs_for_generation" not in bank.__dict__
    with pytest.raises(ValueError, match="prefix_ids"):
        _gen(bank, ids, mask, do_sample=False, prefix_ids=pid)


# ----------------------------------------------------------------------------------------------
# The Hugging Face Trainer
# ----------------------------------------------------------------------------------------------


class _TaskData(torch.utils.data.Dataset):
    """Examples of three successor tasks, each with the id of its bank entry."""

    def __init__(self, n=3, rows=4):
        self.items = []
        for i in range(n):
            b = SuccessorTask(seed=7 + i, seq_len=8, bos_token_id=1, first_token=3).batch(0, batch_size=rows)
            self.items += [{"input_ids": b.input_ids[r], "attention_mask": b.attention_mask[r],
                            "labels": b.labels[r], "prefix_ids": torch.tensor(i)} for r in range(rows)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.mark.parametrize("remove_unused_columns", [False, True])
def test_trainer_with_a_bank(tmp_path, remove_unused_columns):
    """The Trainer drops batch keys that forward() does not name unless remove_unused_columns=False; the
    bank then trains through it (only the entries in the batches change), and without it the error says
    what to do."""
    from transformers import Trainer, TrainingArguments

    bank = _bank(n=4, seed=8)
    before = _kv(bank)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=6,
                             learning_rate=1e-2, save_strategy="no", report_to=[], use_cpu=True,
                             dataloader_num_workers=0, remove_unused_columns=remove_unused_columns)
    trainer = Trainer(model=bank, args=args, train_dataset=_TaskData())
    if remove_unused_columns:
        with pytest.raises(ValueError, match=r"remove_unused_columns=False"):
            trainer.train()
        assert torch.equal(_kv(bank), before)
        return
    trainer.train()
    after = _kv(bank)
    for i in range(3):
        assert not torch.equal(after[:, :, i], before[:, :, i]), i
    assert torch.equal(after[:, :, 3], before[:, :, 3])  # no example uses entry 3
