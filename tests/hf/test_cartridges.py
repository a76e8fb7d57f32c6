"""Cartridges (PEFT's CARTRIDGE type) both ways: ``patch(peft_cartridge_model)`` and ``load_peft`` of PEFT's
CARTRIDGE adapters give PEFT's logits, gradients and generations (PEFT's generate() with its prompt handed
over as the installed transformers reads it: ``tiny_models.peft_generate``); ``save_peft`` writes adapters
PEFT loads, as CARTRIDGE or PREFIX_TUNING; the frozen leading tokens get no gradient and stay bitwise equal
through AdamW with weight decay, the HF Trainer, its checkpoints and resumption; initialisation from text
and from a cache equals PEFT's helpers; composition equals PEFT's compose_cartridge_adapters."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import assert_close_rel
from tiny_models import VOCAB, batch, labels_for, peft_generate, tiny_model

import prefixattn
from prefixattn.prefix import find_prefix

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-4
BYTES = 384  # ByT5's vocabulary (a tokenizer with no files)


def peft_cartridge(base, P=6, frozen=2, seed=1):
    from peft import CartridgeConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, num_frozen_tokens=frozen)
    return get_peft_model(copy.deepcopy(base), cfg)


def as_kv(rows, peft_model):
    """PEFT's flat rows (n, L*2*Hkv*D) in prefixattn's (L, 2, 1, Hkv, n, D) layout."""
    cfg = peft_model.active_peft_config
    H = cfg.num_attention_heads
    return rows.reshape(rows.shape[0], cfg.num_layers, 2, H, cfg.token_dim // H).permute(1, 2, 3, 0, 4).unsqueeze(2)


def whole_prefix(model):
    return find_prefix(model).compute().detach()


def _gen(model, ids, mask, peft=False):
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    return peft_generate(model, **kw) if peft else model.generate(**kw)


@pytest.mark.parametrize("family,backend,padding", [("llama", "torch", "left"), ("gpt2", "torch", "right"),
                                                    ("qwen2", "triton", "left")])
def test_patched_peft_cartridge_matches_peft(family, backend, padding):
    peft_model = peft_cartridge(tiny_model(family))
    ours = prefixattn.patch(copy.deepcopy(peft_model), backend=backend)
    module = find_prefix(ours)
    assert module.config.cartridge and module.config.num_frozen_tokens == 2
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == ["prefixattn_prefix.kv"]
    ids, mask = batch(padding=padding)
    labels = labels_for(ids, mask)
    out_p = peft_model(input_ids=ids, attention_mask=mask, labels=labels)
    out_o = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert_close_rel(out_o.logits, out_p.logits, TOL, "logits")
    out_p.loss.backward()
    out_o.loss.backward()
    enc = peft_model.prompt_encoder["default"]
    assert_close_rel(module.kv.grad, as_kv(enc.trainable_embedding.grad, peft_model), TOL, "trainable grad")
    assert enc.frozen_embedding.grad is None and module.frozen_kv.grad is None
    if backend == "torch":
        with torch.no_grad():
            assert torch.equal(_gen(ours, ids, mask), _gen(peft_model, ids, mask, peft=True))


def test_load_peft_reads_peft_cartridges_and_save_peft_writes_them(tmp_path):
    from peft import PeftModel

    base = tiny_model("llama")
    peft_model = peft_cartridge(base, P=5, frozen=1).eval()
    peft_model.save_pretrained(str(tmp_path / "peft"))
    ours = prefixattn.load_peft(copy.deepcopy(base), tmp_path / "peft", backend="torch")
    module = find_prefix(ours)
    assert module.config.cartridge and module.config.num_frozen_tokens == 1
    ids, mask = batch(padding="left")
    with torch.no_grad():
        want = peft_model(input_ids=ids, attention_mask=mask).logits
        assert_close_rel(ours(input_ids=ids, attention_mask=mask).logits, want, TOL, "logits")
        assert torch.equal(_gen(ours, ids, mask), _gen(peft_model, ids, mask, peft=True))

    prefixattn.save_peft(ours, tmp_path / "ours")  # a cartridge is written as CARTRIDGE
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert written == theirs  # the same fields and values as PEFT's own CartridgeConfig writes
    back = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    assert type(back.prompt_encoder["default"]).__name__ == "CartridgeEncoder"
    enc, theirs_enc = back.prompt_encoder["default"], peft_model.prompt_encoder["default"]
    assert torch.equal(enc.frozen_embedding, theirs_enc.frozen_embedding)
    assert torch.equal(enc.trainable_embedding, theirs_enc.trainable_embedding)
    with torch.no_grad():
        assert_close_rel(back(input_ids=ids, attention_mask=mask).logits, want, TOL, "PEFT logits of save_peft")


def test_save_peft_type_follows_the_prefix_kind_or_the_argument(tmp_path):
    from peft import PeftModel

    base = tiny_model("llama")
    cart = prefixattn.patch(copy.deepcopy(base), num_prefix_tokens=4, cartridge=True, backend="torch")
    plain = prefixattn.patch(copy.deepcopy(base), num_prefix_tokens=4, backend="torch")
    prefixattn.save_peft(cart, tmp_path / "a")
    prefixattn.save_peft(cart, tmp_path / "b", peft_type="PREFIX_TUNING")
    prefixattn.save_peft(plain, tmp_path / "c")
    prefixattn.save_peft(plain, tmp_path / "d", peft_type="CARTRIDGE")
    kinds = {name: json.loads((tmp_path / name / "adapter_config.json").read_text()) for name in "abcd"}
    assert [kinds[n]["peft_type"] for n in "abcd"] == ["CARTRIDGE", "PREFIX_TUNING", "PREFIX_TUNING", "CARTRIDGE"]
    assert kinds["a"]["num_frozen_tokens"] == 1 and kinds["d"]["num_frozen_tokens"] == 0
    ids, mask = batch(padding="right")
    for name, model in (("a", cart), ("b", cart), ("c", plain), ("d", plain)):
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / name)).eval()
        with torch.no_grad():
            assert_close_rel(peft_model(input_ids=ids, attention_mask=mask).logits,
                             model(input_ids=ids, attention_mask=mask).logits, TOL, name)
    with pytest.raises(ValueError, match="peft_type must be one of"):
        prefixattn.save_peft(plain, tmp_path / "e", peft_type="LORA")
    # a CARTRIDGE adapter loaded into a patched model keeps its frozen count, or is refused
    other = prefixattn.patch(copy.deepcopy(base), num_prefix_tokens=4, cartridge=True, num_frozen_tokens=2,
                             backend="torch")
    with pytest.raises(ValueError, match="num_frozen_tokens: adapter has 1, model has 2"):
        prefixattn.load_peft(other, tmp_path / "a")
    prefixattn.load_peft(other, tmp_path / "b")  # PREFIX_TUNING values fill any prefix of the shape
    assert torch.equal(whole_prefix(other), whole_prefix(cart))


def test_patch_refuses_bad_cartridge_options():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="num_frozen_tokens is a cartridge option"):
        prefixattn.patch(model, num_prefix_tokens=4, num_frozen_tokens=1)
    # every token frozen (or more) would leave a zero-size trainable parameter: refused, naming both numbers
    for frozen in (4, 5):
        with pytest.raises(ValueError, match=f"num_frozen_tokens={frozen} leaves nothing to train with "
                                             "num_prefix_tokens=4"):
            prefixattn.patch(model, num_prefix_tokens=4, cartridge=True, num_frozen_tokens=frozen)
    with pytest.raises(ValueError, match="num_frozen_tokens must be >= 0, got -1"):
        prefixattn.patch(model, num_prefix_tokens=4, cartridge=True, num_frozen_tokens=-1)
    with pytest.raises(ValueError, match="cannot be MLP-reparameterized"):
        prefixattn.patch(model, num_prefix_tokens=4, cartridge=True, prefix_projection=True)
    with pytest.raises(TypeError, match="cartridge must be a bool"):
        prefixattn.patch(model, num_prefix_tokens=4, cartridge="yes")
    assert not prefixattn.is_patched(model)
    with pytest.raises(ValueError, match="CartridgeConfig"):
        prefixattn.patch(peft_cartridge(model), num_frozen_tokens=1)


def _frozen_model(seed=0, frozen=3):
    model = tiny_model("llama")
    torch.manual_seed(seed)  # the prefix's initial values
    return prefixattn.patch(model, num_prefix_tokens=8, cartridge=True, num_frozen_tokens=frozen, backend="torch")


def test_frozen_tokens_never_move_under_adamw_with_weight_decay():
    model = _frozen_model().train()
    module = find_prefix(model)
    frozen, trained = module.frozen_kv.clone(), module.kv.detach().clone()
    model.requires_grad_(True)  # what PEFT's modules_to_save does to its copy: the frozen tokens stay frozen
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    ids, mask = batch(padding="left")
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels_for(ids, mask)).loss.backward()
        opt.step()
    assert torch.equal(module.frozen_kv, frozen)
    assert not torch.equal(module.kv.detach(), trained)
    assert all(b is not module.frozen_kv for b in model.parameters())
    with torch.no_grad():  # and the model reads them
        logits = model(input_ids=ids, attention_mask=mask).logits
        module.frozen_kv.mul_(2)
        assert not torch.allclose(model(input_ids=ids, attention_mask=mask).logits, logits)


def test_frozen_tokens_through_the_trainer_checkpoints_and_resume(tmp_path):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    class Data(torch.utils.data.Dataset):
        ids = torch.randint(3, VOCAB, (8, 6), generator=torch.Generator().manual_seed(0))

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "attention_mask": torch.ones(6, dtype=torch.long),
                    "labels": self.ids[i].clone()}

    model = _frozen_model()
    module = find_prefix(model)
    frozen, trained = module.frozen_kv.clone(), module.kv.detach().clone()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=5e-2, weight_decay=0.3, save_strategy="steps", save_steps=3,
                             report_to=[], use_cpu=True, logging_steps=1, dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=Data()).train()
    assert torch.equal(module.frozen_kv, frozen) and not torch.equal(module.kv.detach(), trained)

    ckpt = tmp_path / "checkpoint-3"
    fresh = _frozen_model(seed=7)  # other initial values, frozen tokens included
    assert not torch.equal(find_prefix(fresh).frozen_kv, frozen)
    Trainer(model=fresh, args=copy.deepcopy(args), train_dataset=Data())._load_from_checkpoint(str(ckpt))
    assert torch.equal(find_prefix(fresh).frozen_kv, frozen)
    assert torch.equal(find_prefix(fresh).kv, module.kv)

    loaded = AutoModelForCausalLM.from_pretrained(str(ckpt), base_model=_base_dir(tmp_path))
    again = find_prefix(loaded)
    assert again.config.cartridge and again.config.num_frozen_tokens == 3
    assert torch.equal(again.frozen_kv, frozen) and torch.equal(again.kv, module.kv)


def _base_dir(tmp_path):
    path = tmp_path / "base"
    tiny_model("llama").save_pretrained(str(path))
    return str(path)


def test_init_from_text_equals_peft(tmp_path):
    """PEFT's initialize_kv_prefix_from_text (ByT5 has no chat template: PEFT tokenizes the plain text)
    and patch(init="text"): the frozen model's keys/values of the text's first P tokens."""
    from peft.tuners.cartridge.utils import initialize_kv_prefix_from_text
    from transformers import ByT5Tokenizer

    tok = ByT5Tokenizer()
    text = "Cartridges: a KV cache trained offline on a corpus, loaded at inference like a prompt."
    base = tiny_model("llama", vocab_size=BYTES)
    peft_model = peft_cartridge(base, P=16, frozen=1)
    initialize_kv_prefix_from_text(peft_model, tok, text=text)
    ours = prefixattn.patch(copy.deepcopy(base), num_prefix_tokens=16, cartridge=True, init="text",
                            init_text=text, tokenizer=tok, backend="torch")
    assert_close_rel(whole_prefix(ours), as_kv(peft_model.prompt_encoder["default"].weight.detach(), peft_model),
                     1e-6, "prefix")
    ids, mask = batch(padding="left")
    with torch.no_grad():
        assert_close_rel(ours(input_ids=ids, attention_mask=mask).logits,
                         peft_model(input_ids=ids, attention_mask=mask).logits, TOL, "logits")


def test_init_from_cache_equals_peft():
    from peft.tuners.cartridge.utils import initialize_kv_prefix_from_past_key_values

    base = tiny_model("qwen2")
    document = torch.randint(3, VOCAB, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache = copy.deepcopy(base)(input_ids=document, use_cache=True).past_key_values
    peft_model = peft_cartridge(base, P=12, frozen=1)
    initialize_kv_prefix_from_past_key_values(peft_model, past_key_values=cache)
    ours = prefixattn.patch(copy.deepcopy(base), num_prefix_tokens=12, cartridge=True, backend="torch")
    prefixattn.init_prefix_from_cache(ours, cache)
    assert torch.equal(whole_prefix(ours), as_kv(peft_model.prompt_encoder["default"].weight.detach(), peft_model))
    ids, mask = batch(padding="right")
    with torch.no_grad():
        assert_close_rel(ours(input_ids=ids, attention_mask=mask).logits,
                         peft_model(input_ids=ids, attention_mask=mask).logits, TOL, "logits")
    # init from text is the same thing for a document of at least P tokens
    by_text = prefixattn.patch(copy.deepcopy(base), num_prefix_tokens=12, cartridge=True, init="text",
                               init_text=document[0], backend="torch")
    assert_close_rel(whole_prefix(by_text), whole_prefix(ours), 1e-6, "init='text'")

    before = whole_prefix(ours).clone()
    with pytest.raises(ValueError, match="holds 5 tokens; the prefix needs at least 12"):
        with torch.no_grad():
            short = copy.deepcopy(base)(input_ids=document[:, :5], use_cache=True).past_key_values
        prefixattn.init_prefix_from_cache(ours, short)
    with pytest.raises(ValueError, match="batch-1 prefill"):
        with torch.no_grad():
            two = copy.deepcopy(base)(input_ids=document.repeat(2, 1), use_cache=True).past_key_values
        prefixattn.init_prefix_from_cache(ours, two)
    with pytest.raises(TypeError, match="transformers Cache"):
        prefixattn.init_prefix_from_cache(ours, torch.zeros(3))
    assert torch.equal(whole_prefix(ours), before)


def test_compose_equals_peft_compose_cartridge_adapters(tmp_path):
    from peft import PeftModel
    from peft.tuners.cartridge.utils import compose_cartridge_adapters

    base = tiny_model("llama")
    for name, P, seed in (("a", 3, 1), ("b", 5, 2)):
        peft_cartridge(base, P=P, frozen=1, seed=seed).save_pretrained(str(tmp_path / name))
    compose_cartridge_adapters([tmp_path / "a", tmp_path / "b"], output_path=tmp_path / "peft_ab")
    prefixattn.compose_cartridges([tmp_path / "a", tmp_path / "b"], tmp_path / "ours_ab")
    from safetensors.torch import load_file

    theirs = load_file(str(tmp_path / "peft_ab" / "adapter_model.safetensors"))["prompt_embeddings"]
    mine = load_file(str(tmp_path / "ours_ab" / "adapter_model.safetensors"))["prompt_embeddings"]
    assert torch.equal(mine, theirs)
    cfg_t = json.loads((tmp_path / "peft_ab" / "adapter_config.json").read_text())
    cfg_m = json.loads((tmp_path / "ours_ab" / "adapter_config.json").read_text())
    assert cfg_m == cfg_t and (cfg_m["num_virtual_tokens"], cfg_m["num_frozen_tokens"]) == (8, 1)

    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft_ab")).eval()
    ours = prefixattn.load_peft(copy.deepcopy(base), tmp_path / "ours_ab", backend="torch")
    ids, mask = batch(padding="left")
    with torch.no_grad():
        want = peft_model(input_ids=ids, attention_mask=mask).logits
        assert_close_rel(ours(input_ids=ids, attention_mask=mask).logits, want, TOL, "logits")

    # prefixattn's own files compose the same way
    for name in "ab":
        prefixattn.save_prefix(prefixattn.load_peft(copy.deepcopy(base), tmp_path / name), tmp_path / f"{name}.st")
    prefixattn.compose_cartridges([tmp_path / "a.st", tmp_path / "b.st"], tmp_path / "ab.st")
    from prefixattn.hf import load_prefix_into

    native = load_prefix_into(copy.deepcopy(base), tmp_path / "ab.st", backend="torch")
    assert find_prefix(native).config.num_frozen_tokens == 1 and find_prefix(native).config.num_tokens == 8
    assert torch.equal(whole_prefix(native), whole_prefix(ours))

    with pytest.raises(ValueError, match="not a mix"):
        prefixattn.compose_cartridges([tmp_path / "a", tmp_path / "b.st"], tmp_path / "x")
    peft_cartridge(tiny_model("gpt2"), P=2).save_pretrained(str(tmp_path / "gpt2"))
    with pytest.raises(ValueError, match="token_dim is 64, not 32"):
        prefixattn.compose_cartridges([tmp_path / "a", tmp_path / "gpt2"], tmp_path / "y")
    assert not (tmp_path / "y").exists()


def test_sft_trainer_trains_a_cartridge_bf16_checkpointed(tmp_path):
    """TRL's SFTTrainer with its memory-lean defaults (bf16 autocast, gradient checkpointing, which PEFT
    refuses for CARTRIDGE) on a cartridge initialised from a document: the loss falls, the trainable
    tokens move, the frozen ones and the base model do not."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import ByT5Tokenizer

    tok = ByT5Tokenizer()
    corpus = "The cartridge holds a corpus as keys and values. " * 3
    model = prefixattn.patch(tiny_model("llama", vocab_size=BYTES), num_prefix_tokens=40, cartridge=True,
                             init="text", init_text=corpus, tokenizer=tok, backend="torch")
    module = find_prefix(model)
    frozen, trained = module.frozen_kv.clone(), module.kv.detach().clone()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    questions = [f"Q{i}: what does the cartridge hold? A: keys and values." for i in range(8)]
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, report_to=[],
                         use_cpu=True, bf16=True, gradient_checkpointing=True, logging_steps=1,
                         learning_rate=3e-2, save_strategy="no", dataloader_num_workers=0, weight_decay=0.1)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": questions}),
                             processing_class=tok)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    assert torch.equal(module.frozen_kv, frozen)
    assert not torch.equal(module.kv.detach(), trained)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)


def test_a_cartridge_of_a_model_that_is_not_a_causal_lm_is_refused_at_patch(tmp_path):
    """An encoder-decoder's or an encoder's cartridge trained and then could not be saved (save_peft
    refused it, PEFT's own seq2seq CARTRIDGE model cannot be saved either): patch() refuses it, with the
    way out; as a prefix the same model patches, and save_peft can write it as PREFIX_TUNING, but not as
    CARTRIDGE."""
    from tiny_encdec import tiny_bart, tiny_encoder

    for model, task in ((tiny_bart(), "SEQ_2_SEQ_LM"), (tiny_encoder(), "SEQ_CLS")):
        with pytest.raises(ValueError, match=f"cartridge=True is for causal LMs; .* is a {task} model"):
            prefixattn.patch(model, num_prefix_tokens=4, cartridge=True, backend="torch")
        assert not prefixattn.is_patched(model)
    bart = prefixattn.patch(tiny_bart(), num_prefix_tokens=4, backend="torch")
    with pytest.raises(ValueError, match="cannot be written as a CARTRIDGE adapter"):
        prefixattn.save_peft(bart, tmp_path / "c", peft_type="CARTRIDGE")
    prefixattn.save_peft(bart, tmp_path / "p")
    assert (tmp_path / "p" / "adapter_config.json").is_file()
