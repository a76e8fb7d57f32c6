"""Every fenced code block of README.md runs as written (tests/readme_blocks.py says how a block is
classified): python blocks in a fresh interpreter of this environment, bash blocks through bash with
this environment's bin/ first on PATH, each in an empty working directory holding tiny stand-ins for the
files and models the block names as placeholders. CPU, tiny models built from configs, no network."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from readme_blocks import PROSE, README, RUNNABLE, Block, chain, parse, program, readme_blocks

# one worker runs them all: they share the session's stand-ins, and each starts its own processes
pytestmark = pytest.mark.xdist_group("readme")

BLOCKS = readme_blocks()
RUN_BLOCKS = [b for b in BLOCKS if b.lang not in PROSE]
# Blocks that cannot run on a CI CPU say why in the README; keep them few.
MAX_SKIPPED = 3
TIMEOUT_S = 480  # the CLI block trains 5 runs; a loaded 2-core CI box takes minutes
REPO = README.parent
VENV_BIN = Path(sys.executable).parent

# placeholder name -> the stand-in the harness puts there (built once per session)
STAND_INS = {
    "path/to/llama": "causal_lm",
    "DIR": "causal_lm",
    "path/to/classifier": "classifier",
    "path/to/seq2seq": "seq2seq",
    "train.jsonl": "text_jsonl",
    "qa.jsonl": "qa_jsonl",
    "corpus.txt": "corpus",
}


def _byte_tokenizer():
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer(extra_ids=0)  # pad 0, eos 1, unk 2; 259 ids; saves its own files


def _save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _causal_lm(path: Path) -> Path:
    from tiny_models import tiny_model

    tok = _byte_tokenizer()
    # room for a 2048-token cartridge in front of the sequence (RoPE: no position table to grow)
    model = tiny_model("llama", vocab_size=len(tok), max_position_embeddings=4096, pad_token_id=0,
                       bos_token_id=None, eos_token_id=1)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 1
    model.generation_config.bos_token_id = None
    return _save(model, tok, path)


# The encoder and the encoder-decoder keep their families' default dropout (0.1, attention included), as
# the real checkpoints a reader loads do.
def _classifier(path: Path) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    tok = _byte_tokenizer()
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=32, max_position_embeddings=128, pad_token_id=0, num_labels=3)
    torch.manual_seed(0)
    return _save(BertForSequenceClassification(config).eval(), tok, path)


def _seq2seq(path: Path) -> Path:
    from transformers import T5Config, T5ForConditionalGeneration

    tok = _byte_tokenizer()  # ByT5's own tokenizer on a T5: pad 0 (also the decoder start), eos 1
    config = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2,
                      num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(0)
    return _save(T5ForConditionalGeneration(config).eval(), tok, path)


_WORDS = "the prefix learns a task while the model stays frozen and small models train fast".split()


def _text_jsonl(path: Path) -> Path:
    lines = [{"text": " ".join(_WORDS[(i + j) % len(_WORDS)] for j in range(6))} for i in range(40)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _qa_jsonl(path: Path) -> Path:
    lines = [{"prompt": f"What comes after {w}? ", "completion": _WORDS[(i + 1) % len(_WORDS)]}
             for i, w in enumerate(_WORDS * 3)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _corpus(path: Path) -> Path:
    path.write_text(" ".join(_WORDS * 40) + "\n")  # > 2048 byte tokens: a 2048-token cartridge's prefill
    return path


BUILDERS = {"causal_lm": _causal_lm, "classifier": _classifier, "seq2seq": _seq2seq,
            "text_jsonl": _text_jsonl, "qa_jsonl": _qa_jsonl, "corpus": _corpus}


@pytest.fixture(scope="session")
def stand_ins(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("readme-stand-ins")
    suffix = {"text_jsonl": ".jsonl", "qa_jsonl": ".jsonl", "corpus": ".txt"}
    return {kind: build(root / (kind + suffix.get(kind, ""))) for kind, build in BUILDERS.items()}


def _place(block: Block, stand_ins: dict[str, Path], cwd: Path) -> None:
    for name in block.placeholders:
        target = cwd / name
        target.parent.mkdir(parents=True, exist_ok=True)
        source = stand_ins[STAND_INS[name]]
        if source.is_dir():
            target.symlink_to(source, target_is_directory=True)  # read-only use: blocks never write there
        else:
            shutil.copyfile(source, target)


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k != "TRITON_INTERPRET" and not k.startswith(("PREFIXATTN_", "PYTEST_", "PYTHONPATH"))}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_HOME=str(home), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", MPLBACKEND="Agg")
    return env


def _run(lang: str, code: str, cwd: Path) -> tuple[int, str, str]:
    """Run a block's code in ``cwd``: python in a fresh interpreter, bash with -euo pipefail (a failing
    command anywhere in the block fails it)."""
    script = cwd / ("block.py" if lang == "python" else "block.sh")
    script.write_text(code if lang == "python" else "set -euo pipefail\n" + code)
    cmd = [sys.executable, str(script)] if lang == "python" else ["bash", str(script)]
    # a session of its own, so that a timeout also ends the processes it started (torchrun's workers)
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(cwd / ".hf-home"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{script.name} ran past {TIMEOUT_S} s\n--- code\n{code}\n{stdout[-4000:]}\n{stderr[-8000:]}")
    return proc.returncode, stdout, stderr


def test_every_block_is_classified():
    problems = [f"README.md:{b.line} ({b.id}): {p}" for b in BLOCKS for p in b.problems()]
    for b in BLOCKS:
        unknown = sorted(set(b.placeholders) - set(STAND_INS))
        if unknown:
            problems.append(f"README.md:{b.line} ({b.id}): placeholders without a stand-in in "
                            f"tests/test_readme_blocks.py STAND_INS: {unknown}")
    assert not problems, "\n".join(problems)
    # the blocks that are not run still parse (a SyntaxError shows in a skipped block too)
    for b in RUN_BLOCKS:
        if b.lang == "python":
            compile(program(chain(BLOCKS, b)), f"README.md:{b.line} ({b.id})", "exec")
        else:
            check = subprocess.run(["bash", "-n"], input=b.code, capture_output=True, text=True)
            assert check.returncode == 0, f"README.md:{b.line} ({b.id}): {check.stderr}"
    assert len({b.id for b in BLOCKS}) == len(BLOCKS)
    skipped = [b for b in RUN_BLOCKS if b.skip_reason]
    assert len(skipped) <= MAX_SKIPPED, [f"{b.id}: {b.skip_reason}" for b in skipped]
    assert len(RUN_BLOCKS) - len(skipped) >= 10, "the README's runnable examples went missing"


def test_the_parser_refuses_what_it_cannot_classify():
    text = ("# T\n```\nx\n```\n```py\nx\n```\n<!-- readme-test: skip: -->\n```bash\nx\n```\n"
            "<!-- readme-test: replace: y => z -->\n```bash\nx\n```\n<!-- readme-test: nope -->\n```python\nx\n```\n"
            "<!-- readme-test: skip: needs a GPU -->\n\n```python\nx\n```\n")
    blocks = parse(text)
    assert [b.id for b in blocks] == ["t-1", "t-2", "t-3", "t-4", "t-5", "t-6"]
    assert all(b.problems() for b in blocks[:5]), [b.problems() for b in blocks]
    assert not blocks[5].problems() and blocks[5].skip_reason == "needs a GPU"
    # bash: a comment after a line continuation ends the command, also in a block that is not run
    broken = parse("<!-- readme-test: skip: a server -->\n```bash\nserve x \\   # the model\n    --port 1\n```\n")
    assert any("ends the command" in p for p in broken[0].problems()), broken[0].problems()


def test_the_runner_fails_a_block_that_fails_anywhere(tmp_path):
    assert _run("bash", "true\nfalse\necho after\n", tmp_path)[0] != 0
    assert _run("bash", "false | cat\n", tmp_path)[0] != 0
    assert _run("bash", "echo $UNSET_NAME\n", tmp_path)[0] != 0
    assert _run("python", "import sys\nsys.exit(3)\n", tmp_path)[0] == 3
    # what a user's shell has: this environment's commands first, no test-only settings
    rc, out, _ = _run("python", "import os, shutil\nprint(shutil.which('prefixattn'), os.environ.get('TRITON_INTERPRET'))\n",
                      tmp_path)
    assert rc == 0 and out.split() == [str(VENV_BIN / "prefixattn"), "None"], out


def test_the_ci_commands_at_the_top_are_what_ci_runs():
    top = BLOCKS[0]
    assert top.ci_reason, "the README's first block is the set-up and test commands CI runs"
    # .ci/run finds the test command with its own grep: run that line here
    grep = next(line for line in (REPO / ".ci/run").read_text().splitlines() if line.startswith("cmd=$("))
    found = subprocess.run(["bash", "-c", f'{grep}\nprintf %s "$cmd"'], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout
    assert found and found in top.code, (found, top.code)
    for part in ("bash scripts/setup.sh", "pytest -q -n 2 --dist loadgroup", "bash scripts/test_oldest.sh",
                 "bash scripts/test_wheel.sh"):
        assert part in found, part
    assert "bash scripts/setup.sh && .venv/bin/prefixattn train" in top.code  # the main job
    for script in re.findall(r"scripts/[\w.]+\.sh", top.code):
        assert (REPO / script).is_file(), script


@pytest.mark.parametrize("block", RUN_BLOCKS, ids=[b.id for b in RUN_BLOCKS])
def test_readme_block_runs(block: Block, request, tmp_path):
    assert block.lang in RUNNABLE and not block.problems(), block.problems()
    if block.ci_reason:
        pytest.skip(f"CI runs it: {block.ci_reason} (test_the_ci_commands_at_the_top_are_what_ci_runs)")
    if block.skip_reason:
        pytest.skip(block.skip_reason)
    stand_ins = request.getfixturevalue("stand_ins")  # built only once a block runs
    blocks = chain(BLOCKS, block)
    code = program(blocks)
    for b in blocks:
        _place(b, stand_ins, tmp_path)
    rc, stdout, stderr = _run(block.lang, code, tmp_path)
    assert rc == 0, (f"README.md:{block.line} ({block.id}) failed (rc {rc}):\n"
                     f"--- code\n{code}\n--- stdout\n{stdout[-4000:]}\n--- stderr\n{stderr[-8000:]}")
