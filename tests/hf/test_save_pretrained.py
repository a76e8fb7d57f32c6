"""A patched model's ``save_pretrained`` directory loads back as the trained model, or not at all.

The directory holds the prefix (model.safetensors keeps the Trainer's resume working), and config.json says
it is a prefixattn checkpoint: ``AutoModelForCausalLM.from_pretrained(dir)`` returns the patched base model
with the trained prefix, in this process (prefixattn imported) or a fresh one (``trust_remote_code=True``),
and refuses with a message that says how to load it where it cannot. Before, it loaded the base model with
random weights and no error.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import assert_close_rel
from tiny_models import batch, labels_for, tiny_model
from transformers import AutoModelForCausalLM

import prefixattn

TOL = 1e-6


@pytest.fixture
def base_dir(tmp_path):
    path = tmp_path / "base"
    tiny_model("llama").save_pretrained(path)
    return path


def _trained(base_path, **patch_kwargs):
    model = prefixattn.patch(AutoModelForCausalLM.from_pretrained(base_path), num_prefix_tokens=3,
                             backend="torch", **patch_kwargs)
    with torch.no_grad():
        for p in model.prefixattn_prefix.parameters():
            p.mul_(0.5).add_(0.1)  # not the initial values
    return model


def _logits(model, **kw):
    ids, mask = batch(padding="left")
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits


def test_from_pretrained_loads_the_trained_model(tmp_path, base_dir):
    model = _trained(base_dir)
    model.save_pretrained(tmp_path / "out")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert prefixattn.is_patched(back)
    assert_close_rel(_logits(back), _logits(model), TOL, "logits")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "prefixattn" and config["base_model_name_or_path"] == str(base_dir)
    # the base alone is another model: the comparison can fail
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    assert (_logits(base) - _logits(model)).abs().max() > 1e-2


def test_a_fresh_process_refuses_without_remote_code_and_loads_with_it(tmp_path, base_dir):
    model = _trained(base_dir)
    model.save_pretrained(tmp_path / "out")
    torch.save(_logits(model), tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(tmp_path.parent)!r})
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(tmp_path / "out")!r})
        except ValueError as e:
            assert "trust_remote_code=True" in str(e), e
        else:
            raise AssertionError("loaded without prefixattn")
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "out")!r}, trust_remote_code=True)
        ids = torch.tensor({batch(padding="left")[0].tolist()})
        mask = torch.tensor({batch(padding="left")[1].tolist()})
        with torch.no_grad():
            got = model(input_ids=ids, attention_mask=mask).logits
        err = (got - torch.load({str(tmp_path / "expected.pt")!r})).abs().max().item()
        assert err < 1e-5, err
        print("ok", type(model).__name__)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ok LlamaForCausalLM" in out.stdout


def test_without_a_base_path_the_load_says_how(tmp_path, base_dir):
    built = prefixattn.patch(tiny_model("llama"), num_prefix_tokens=3, backend="torch")  # from a config
    built.save_pretrained(tmp_path / "out")
    with pytest.raises(ValueError, match=r"built from a config.*base_model="):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", base_model=str(base_dir))
    # tiny_model("llama") is seeded: the saved base equals the model built from the config
    assert_close_rel(_logits(back), _logits(built), TOL, "logits")


def test_a_base_model_of_another_kind_is_refused(tmp_path, base_dir):
    _trained(base_dir).save_pretrained(tmp_path / "out")
    tiny_model("gpt2").save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="trained on a 'llama' model"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out", base_model=str(tmp_path / "gpt2"))
    (tmp_path / "moved").mkdir()
    with pytest.raises(ValueError, match="cannot be loaded"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out", base_model=str(tmp_path / "moved"))


def test_bank_and_projection_round_trip(tmp_path, base_dir):
    bank = _trained(base_dir, num_prefixes=3)
    bank.save_pretrained(tmp_path / "bank")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "bank")
    ids = torch.tensor([2, 0, 1])
    assert_close_rel(_logits(back, prefix_ids=ids), _logits(bank, prefix_ids=ids), TOL, "bank logits")
    mlp = _trained(base_dir, prefix_projection=True)
    mlp.save_pretrained(tmp_path / "mlp")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "mlp")
    assert back.prefixattn_prefix.config.projection
    assert_close_rel(_logits(back), _logits(mlp), TOL, "projection logits")


def test_trainer_checkpoint_loads_and_resumes(tmp_path, base_dir):
    from transformers import Trainer, TrainingArguments

    ids, mask = batch(batch_size=4, padding="left")

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"input_ids": ids[i], "attention_mask": mask[i], "labels": labels_for(ids, mask)[i]}

    model = _trained(base_dir)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-2, save_strategy="steps", save_steps=1, report_to=[],
                             use_cpu=True, logging_steps=1)
    Trainer(model=model, args=args, train_dataset=Data()).train()
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoint-2")
    assert_close_rel(_logits(back), _logits(model), TOL, "checkpoint logits")
    # the Trainer's own resume reads the same directory into a patched model
    fresh = _trained(base_dir)
    args2 = copy.deepcopy(args)
    args2.max_steps = 2
    Trainer(model=fresh, args=args2, train_dataset=Data()).train(
        resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
    assert_close_rel(_logits(fresh), _logits(model), 1e-5, "resumed run")


def test_unpatch_restores_save_pretrained(tmp_path, base_dir):
    model = prefixattn.unpatch(_trained(base_dir))
    model.save_pretrained(tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert not (tmp_path / "plain" / "prefix.safetensors").exists()
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    assert_close_rel(_logits(back), _logits(AutoModelForCausalLM.from_pretrained(base_dir)), TOL, "logits")
