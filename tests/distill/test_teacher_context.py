"""The teacher reads the context once: a patched model over the kept keys and values of a prefilled context
equals the plain model on [context; conversation] (float64, across causal families), and
PEFT's prefix-as-cache holding the same keys and values."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import VOCAB, peft_twin, tiny_model

import prefixattn
from prefixattn.hf.context import prefill_context, reading_context, running_bare, teacher_logits

FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "gpt_neox", "opt", "gemma")  # mistral: within its window

pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(*shape, seed=0):
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _setup(family, C=11):
    # the reference runs SDPA: transformers' eager attention takes its softmax in fp32 even for a float64
    # model (a 4e-8 error that is the reference's, not the teacher's)
    base = tiny_model(family, attn_implementation="sdpa").double()
    student = prefixattn.patch(copy.deepcopy(base), num_prefix_tokens=3, backend="torch")
    context = _ids(C, seed=1)
    return base, student, context


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_over_kept_kv_equals_the_plain_model(family):
    base, student, context = _setup(family)
    kept = prefill_context(student, context, chunk_size=4)  # chunks of 4, 4, 3
    assert kept.length == 11 and kept.kv.dtype == torch.float64
    conv = _ids(2, 7, seed=2)
    mask = torch.ones_like(conv)
    mask[1, 5:] = 0  # right padding
    with torch.no_grad():
        full = base(input_ids=torch.cat([context.expand(2, -1), conv], 1),
                    attention_mask=torch.cat([torch.ones(2, 11, dtype=torch.long), mask], 1)).logits[:, 11:]
    got = teacher_logits(student, kept, conv, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], full[real], rtol=1e-9, atol=1e-9)
    # the student's own prefix is back afterwards, and the bare model is the base
    assert prefixattn.prefix.find_prefix(student).config.num_tokens == 3
    with torch.no_grad(), running_bare(student):
        bare = student(input_ids=conv).logits
        assert torch.allclose(bare, base(input_ids=conv).logits, rtol=1e-9, atol=1e-9)


def test_prefill_chunks_do_not_matter_and_generate_continues_at_c():
    base, student, context = _setup("llama", C=13)
    one = prefill_context(student, context, chunk_size=64)
    many = prefill_context(student, context, chunk_size=1)
    torch.testing.assert_close(one.kv, many.kv, rtol=1e-10, atol=1e-10)
    prompt = _ids(1, 5, seed=4)
    with torch.no_grad():
        want = base.generate(torch.cat([context[None], prompt], 1), max_new_tokens=6, do_sample=False)[:, 13:]
        with reading_context(student, one):
            got = student.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                   do_sample=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", ("llama", "gpt2"))
def test_teacher_equals_peft_prefix_as_cache(family):
    base, student, context = _setup(family)
    kept = prefill_context(student, context)
    peft_model = peft_twin(base, num_virtual_tokens=11).double()
    cfg = peft_model.active_peft_config
    # prefixattn's (L, 2, 1, Hkv, C, D) -> PEFT's rows (C, L * 2 * Hkv * D)
    rows = kept.kv[:, :, 0].permute(3, 0, 1, 2, 4).reshape(11, -1)
    assert rows.shape == (cfg.num_virtual_tokens, cfg.num_layers * 2 * cfg.token_dim)
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(rows)
        conv = _ids(2, 6, seed=5)
        want = peft_model(input_ids=conv).logits
    torch.testing.assert_close(teacher_logits(student, kept, conv), want, rtol=1e-9, atol=1e-9)


def test_bad_contexts_are_refused():
    base, student, _ = _setup("llama")
    with pytest.raises(ValueError, match="empty"):
        prefill_context(student, [])
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        prefill_context(student, [5, VOCAB + 3])
    with pytest.raises(ValueError, match="256 positions"):
        prefill_context(student, _ids(300))
    with pytest.raises(TypeError, match="not patched"):
        prefill_context(base, _ids(5))
    kept = prefill_context(student, _ids(250))
    with pytest.raises(ValueError, match="exceed the model's 256 positions"):
        teacher_logits(student, kept, _ids(1, 10))
    window = prefixattn.patch(tiny_model("mistral", sliding_window=8), num_prefix_tokens=2, backend="torch")
    with pytest.raises(ValueError, match="sliding window"):
        prefill_context(window, _ids(20))
