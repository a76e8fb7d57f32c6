"""Reading the adapters to serve and checking them against the model, before vLLM starts (main
environment, no vLLM): every adapter kind gives the prefix prefixattn's own loaders give, and every
problem is a ValueError naming the adapter and the reason."""

from __future__ import annotations

import json
import shutil

import pytest
import tiny_serving
import torch

import prefixattn
from prefixattn.prefix import find_prefix
from prefixattn.serve.adapters import parse_prefix_arg, read_all, read_prefixes
from prefixattn.serve.model_layout import layout_problems, served_model
from prefixattn.serve.table import PrefixTable, digest

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(serve_fixture):
    return served_model(serve_fixture.model_dir)


def loaded_kv(serve_fixture, name):
    """What prefixattn's own loaders put into a patched model, as (L, 2, Hkv, P, D)."""
    kind, path, kw, entry = serve_fixture.loaders[name]
    base = tiny_serving.base_model(serve_fixture.model_dir)
    if kind == "peft":
        m = prefixattn.load_peft(base, path, backend="torch")
    else:
        m = prefixattn.patch(base, backend="torch", init="zeros", **kw)
        prefixattn.load_prefix(m, path)
    with torch.no_grad():
        return find_prefix(m).compute()[:, :, entry or 0].float()


def test_every_adapter_kind_reads_as_prefixattn_loads_it(serve_fixture, model):
    prefixes = read_all(serve_fixture.prefix_args, model, "base")
    assert [p.name for p in prefixes] == ["peft37", "file37", "same37", "bank8/0", "bank8/1", "proj5"]
    for p in prefixes:
        torch.testing.assert_close(p.kv, loaded_kv(serve_fixture, p.name), rtol=0, atol=1e-6)
    assert model.num_layers == 2 and model.num_kv_heads == 2 and model.head_dim == 32


def test_train_output_directory_is_read(serve_fixture, model, tmp_path):
    shutil.copy(serve_fixture.root / "file37.safetensors", tmp_path / "prefix.safetensors")
    (p,) = read_prefixes("run", tmp_path, model)
    torch.testing.assert_close(p.kv, loaded_kv(serve_fixture, "file37"), rtol=0, atol=0)


def test_table_salts_follow_content(serve_fixture, model, tmp_path):
    prefixes = read_all(serve_fixture.prefix_args, model, "base")
    table = PrefixTable.write(tmp_path / "run", model, "base", prefixes)
    salts = {e.name: e.salt for e in table.entries.values()}
    assert salts["file37"] == salts["same37"]  # same content: sharing cached blocks is right
    assert len(set(salts.values())) == len(salts) - 1
    again = PrefixTable.read(tmp_path / "run")
    assert again == table
    kv = again.load_kv()
    assert all(digest(kv[e.name]) == e.digest for e in again.entries.values())
    assert table.entries["peft37"].cache_salt("u") == salts["peft37"] + ":u"
    assert table.entries["peft37"].owns_salt(salts["peft37"] + ":u")
    assert not table.entries["peft37"].owns_salt(salts["peft37"] + "u")


def test_tampered_run_directory_is_refused(serve_fixture, model, tmp_path):
    prefixes = read_all(serve_fixture.prefix_args[:1], model, "base")
    table = PrefixTable.write(tmp_path, model, "base", prefixes)
    kv = prefixes[0].kv.clone()
    kv[0, 0, 0, 0, 0] += 1
    import safetensors.torch

    safetensors.torch.save_file({"prefix.0": kv}, str(tmp_path / "prefixes.safetensors"))
    with pytest.raises(ValueError, match="does not hold what the manifest says"):
        table.load_kv()


def other_model(tmp_path, **overrides):
    from transformers import LlamaForCausalLM

    cfg = tiny_serving.model_config()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "other")
    return served_model(tmp_path / "other")


@pytest.mark.parametrize("spec, message", [
    ("x", "expected NAME=PATH"),
    ("=a", "expected NAME=PATH"),
    ("bad name=a", "prefix name"),
    ("n={root}/missing", "no such file or directory"),
    ("n={root}/model", "neither a PEFT adapter"),
    ("n={root}/model/model.safetensors", "not a prefixattn prefix file"),
])
def test_bad_adapter_paths(serve_fixture, model, spec, message):
    with pytest.raises(ValueError, match=message):
        read_all([spec.format(root=serve_fixture.root)], model, "base")


def test_adapter_of_another_model_is_refused(serve_fixture, tmp_path):
    other = other_model(tmp_path, num_hidden_layers=3)
    with pytest.raises(ValueError, match="num_layers: adapter has 2, model has 3"):
        read_prefixes("p", serve_fixture.root / "peft37", other)
    with pytest.raises(ValueError, match="made for a model of 2 layers"):
        read_prefixes("p", serve_fixture.root / "file37.safetensors", other)
    heads = other_model(tmp_path, num_key_value_heads=4)
    with pytest.raises(ValueError, match="KV heads x head dim"):
        read_prefixes("p", serve_fixture.root / "peft37", heads)


def test_prefix_on_some_layers_is_refused(serve_fixture, model, tmp_path):
    patched = prefixattn.patch(tiny_serving.base_model(serve_fixture.model_dir), num_prefix_tokens=4, layers=[1],
                               backend="torch")
    prefixattn.save_prefix(patched, tmp_path / "l1.safetensors")
    with pytest.raises(ValueError, match="covers layers \\[1\\] only"):
        read_prefixes("p", tmp_path / "l1.safetensors", model)


def test_non_finite_and_pickled_adapters_are_refused(serve_fixture, model, tmp_path):
    shutil.copytree(serve_fixture.root / "peft37", tmp_path / "nan")
    import safetensors.torch

    rows = safetensors.torch.load_file(str(tmp_path / "nan" / "adapter_model.safetensors"))["prompt_embeddings"]
    rows[3, 5] = float("nan")
    safetensors.torch.save_file({"prompt_embeddings": rows}, str(tmp_path / "nan" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="finite"):
        read_prefixes("p", tmp_path / "nan", model)
    shutil.copytree(serve_fixture.root / "peft37", tmp_path / "pickle")
    (tmp_path / "pickle" / "adapter_model.safetensors").rename(tmp_path / "pickle" / "adapter_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        read_prefixes("p", tmp_path / "pickle", model)


def test_names_must_be_unique_and_not_the_base(serve_fixture, model):
    peft = f"a={serve_fixture.root / 'peft37'}"
    with pytest.raises(ValueError, match="given twice"):
        read_all([peft, peft], model, "base")
    with pytest.raises(ValueError, match="base model's served name"):
        read_all([f"base={serve_fixture.root / 'peft37'}"], model, "base")
    with pytest.raises(ValueError, match="at least one --prefix"):
        read_all([], model, "base")
    assert parse_prefix_arg("org/name:v1=/x=y") == ("org/name:v1", "/x=y")


@pytest.mark.parametrize("config, reason", [
    ({"kv_lora_rank": 512}, "multi-head latent attention"),
    ({"sliding_window": 128, "max_position_embeddings": 4096}, "sliding window of 128"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "not every layer is full attention"),
    ({"layer_types": ["full_attention", "linear_attention"]}, "not every layer is full attention"),
    ({"num_kv_shared_layers": 2}, "reuse another layer's cache"),
    ({"global_head_dim": 512}, "differ in head dim"),
    ({"is_encoder_decoder": True}, "encoder-decoder"),
])
def test_layouts_vllm_cannot_hold_are_refused(config, reason, tmp_path):
    assert any(reason in p for p in layout_problems(config))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({
        "model_type": "x", "num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 64, **config}))
    (tmp_path / "m" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="cannot be served with a prefix"):
        served_model(tmp_path / "m")


def test_layouts_that_fit(tmp_path):
    assert layout_problems({"sliding_window": 4096, "max_position_embeddings": 4096}) == []
    assert layout_problems({"sliding_window": 4096, "max_position_embeddings": 32768}, max_model_len=4000) == []
    assert layout_problems({"sliding_window": 4096, "use_sliding_window": False}) == []
    assert layout_problems({"layer_types": ["full_attention"] * 4}) == []


def test_model_directory_problems(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        served_model(tmp_path / "none")
    (tmp_path / "m").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        served_model(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no weights"):
        served_model(tmp_path / "m")


@pytest.mark.parametrize("projection", [False, True])
def test_adapters_peft_itself_wrote(serve_fixture, model, tmp_path, projection):
    """PEFT's own save_pretrained (with its MLP reparameterization baked into the saved rows too) reads as
    prefixattn.load_peft loads it."""
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    torch.manual_seed(5)
    cfg = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=6, prefix_projection=projection,
                             encoder_hidden_size=24)
    peft_model = get_peft_model(tiny_serving.base_model(serve_fixture.model_dir), cfg)
    with torch.no_grad():
        for p in peft_model.prompt_encoder.parameters():
            p.normal_()
    peft_model.save_pretrained(tmp_path / "adapter")
    (served,) = read_prefixes("p", tmp_path / "adapter", model)
    loaded = prefixattn.load_peft(tiny_serving.base_model(serve_fixture.model_dir), tmp_path / "adapter",
                                  backend="torch")
    with torch.no_grad():
        expected = find_prefix(loaded).compute()[:, :, 0].float()
    assert served.num_tokens == 6
    torch.testing.assert_close(served.kv, expected, rtol=0, atol=1e-6)
