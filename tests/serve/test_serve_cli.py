"""``prefixattn serve`` start-up in the main environment (no vLLM): --check, the refusals with their reasons,
a clear error where vLLM is missing, and the command loading no vLLM for anything else."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from prefixattn.cli import main
from prefixattn.serve.cli import _max_model_len
from prefixattn.serve.versions import untested_reason


def serve(*args):
    return main(["serve", *args])


def test_check_lists_what_would_be_served(serve_fixture, capsys):
    args = [a for p in serve_fixture.prefix_args for a in ("--prefix", p)]
    assert serve(str(serve_fixture.model_dir), *args, "--served-model-name", "base", "--check") == 0
    out, err = capsys.readouterr()
    assert "base model 'base' (2 layers, 2 KV heads x head dim 32, context 4096 tokens)" in out
    for line in ("peft37: 37 prefix tokens", "bank8/1: 8 prefix tokens", "proj5: 5 prefix tokens"):
        assert line in out
    # without --max-model-len: the model's max_position_embeddings (4096), less each prefix's tokens
    assert "context 4096 tokens" in out and "(context 4059 tokens)" in out and "(context 4088 tokens)" in out
    assert "warning" not in err
    assert serve(str(serve_fixture.model_dir), *args, "--max-model-len", "39", "--check") == 0
    assert "peft37: 37 prefix tokens" in capsys.readouterr().out  # 2 positions left: a token in, a token out


def test_adapter_made_for_another_model_is_served_with_a_warning(serve_fixture, tmp_path, capsys):
    """PEFT records the base model it was trained on; one of the same shapes but another name is served
    (the shapes fit), with a warning naming both, at --check as at start-up (both run ``prepare``)."""
    adapter = tmp_path / "adapter"
    shutil.copytree(serve_fixture.root / "peft37", adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(serve_fixture.model_dir)  # what save_peft recorded
    cfg["base_model_name_or_path"] = "someone/another-model"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    model = str(serve_fixture.model_dir)
    assert serve(model, "--prefix", f"odd={adapter}", "--prefix", f"ok={serve_fixture.root / 'peft37'}",
                 "--check") == 0
    err = capsys.readouterr().err
    assert f"warning: prefix 'odd': its adapter was made for 'someone/another-model', served here on {model!r}" in err
    assert "'ok'" not in err
    # a local copy of a hub model: the same last path component is the same model
    cfg["base_model_name_or_path"] = f"org/{serve_fixture.model_dir.name}"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    assert serve(model, "--prefix", f"odd={adapter}", "--check") == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("args, reason", [
    (["--prefix", "p={root}/nowhere"], "--prefix p={root}/nowhere: no such file or directory"),
    (["--prefix", "p={root}/model"], "neither a PEFT adapter"),
    ([], "at least one --prefix"),
    (["--prefix", "p={root}/peft37", "--kv-transfer-config", "{{}}"], "--kv-transfer-config is set by"),
    (["--prefix", "p={root}/peft37", "--pipeline-parallel-size", "2"], "a pipeline stage holds a slice"),
    (["--prefix", "p={root}/peft37", "-dp", "2"], "any replica serves any prefix by name"),
    (["--prefix", "p={root}/peft37", "--api-server-count", "2"], "--api-server-count 2: prefix serving runs one"),
    (["--prefix", "p={root}/peft37", "-asc=4"], "--api-server-count 4: prefix serving runs one"),
    (["--prefix", "p={root}/peft37", "--max-model-len", "38"], "--max-model-len 38 leaves prefix 'p' (37 tokens) 1"),
    (["--prefix", "p={root}/peft37", "--max-model-len=30"], "--max-model-len 30 leaves prefix 'p' (37 tokens) 0"),
    (["--prefix", "p={root}/peft37", "--drain-timeout", "-1"], "--drain-timeout must be >= 0"),
])
def test_bad_start_ups_are_refused_with_the_reason(serve_fixture, capsys, args, reason):
    root = serve_fixture.root
    assert serve(str(serve_fixture.model_dir), *[a.format(root=root) for a in args], "--check") == 2
    assert reason.format(root=root) in capsys.readouterr().err


def test_latent_attention_model_is_refused(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "deepseek_v3", "num_hidden_layers": 2, '
                                          '"num_attention_heads": 2, "hidden_size": 64, "kv_lora_rank": 32}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert serve(str(tmp_path), "--prefix", "p=x", "--check") == 2
    assert "multi-head latent attention" in capsys.readouterr().err


def test_serving_without_vllm_says_how_to_get_it(serve_fixture, capsys):
    if _has_vllm():
        pytest.skip("vLLM is installed in this environment")
    assert serve(str(serve_fixture.model_dir), "--prefix", f"p={serve_fixture.root / 'peft37'}") == 2
    assert "scripts/setup_vllm.sh" in capsys.readouterr().err


def _has_vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def test_the_command_loads_no_vllm_outside_serve():
    code = ("import sys, prefixattn.cli as c; c.build_parser().parse_args(['info']); "
            "import prefixattn.serve.cli, prefixattn.serve.admission, prefixattn.serve.engine_requests; "
            "print('vllm' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "False"
    help_run = subprocess.run([sys.executable, "-m", "prefixattn", "serve", "--help"], capture_output=True,
                              text=True, check=True)
    assert "NAME=ADAPTER" in help_run.stdout and "--check" in help_run.stdout
    assert "--host" in help_run.stdout and "default: 127.0.0.1" in help_run.stdout
    assert "--port" in help_run.stdout and "default: 8000" in help_run.stdout
    assert "--drain-timeout SECONDS" in help_run.stdout


def test_tested_vllm_versions():
    assert untested_reason("0.32.0") is None and untested_reason("0.32.3+cpu") is None
    assert "not a version prefix serving was tested with" in untested_reason("0.33.0")
    assert untested_reason(None) is None
    assert _max_model_len(["--dtype", "float32", "--max-model-len", "4096"]) == 4096
    assert _max_model_len(["--max-model-len=512"]) == 512 and _max_model_len(["--max-model-len", "4k"]) is None
