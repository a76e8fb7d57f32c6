"""The benchmark harness (bench/): an end-to-end CPU run of every suite (JSON schema, markdown, PNG
figures, CPU labels, providers agreeing), FLOP counting against a brute-force count, the schema
validator, and the providers' agreement with an independent float64 reference (kernels through the
Triton interpreter on CPU)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import concat_reference, rel_err

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # bench/ is a checkout directory, not an installed package
    sys.path.insert(0, str(ROOT))

import prefixattn  # noqa: E402
from bench import bank, micro, report, run_all  # noqa: E402
from bench.flops import attention_flops, causal_pairs  # noqa: E402
from bench.grid import ALL_PROVIDERS  # noqa: E402
from bench.providers import PROVIDERS, make_inputs, prefixattn_provider  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RECORD_KEYS = {"provider": str, "mode": str, "B": int, "H": int, "Hkv": int, "S": int, "P": int, "D": int,
               "dtype": str}


def brute_pairs(Sq: int, Sk: int, P: int, causal: bool = True) -> int:
    """Visible (query, key) pairs by enumeration: every prefix slot, and sequence key j when
    j <= i + Sk - Sq (bottom-right causal)."""
    n = 0
    for i in range(Sq):
        for j in range(P + Sk):
            if j < P or not causal or (j - P) <= i + (Sk - Sq):
                n += 1
    return n


# ---------------------------------------------------------------------------------------------
# end to end: python -m bench.run_all --quick --suites micro,train,bank on the CPU
# ---------------------------------------------------------------------------------------------


def test_run_all_end_to_end_on_cpu(tmp_path, capsys):
    rc = run_all.main(["--quick", "--suites", "micro,train,bank", "--device", "cpu", "--backend", "torch",
                       "--out", str(tmp_path)])
    assert rc == 0
    printed = capsys.readouterr().out
    jsons = list(tmp_path.glob("*.json"))
    assert len(jsons) == 1, jsons
    doc = json.loads(jsons[0].read_text())

    _check_schema(doc)
    report.validate(doc)  # the harness's own validator agrees
    _check_cpu_labels(doc, printed)
    _check_providers_and_agreement(doc)
    _check_flops(doc)
    _check_files(jsons[0])


def _check_schema(doc: dict) -> None:
    for key in ("device", "torch", "triton", "cuda", "records"):
        assert key in doc, key
    assert doc["torch"] == torch.__version__
    assert doc["cuda"] == torch.version.cuda
    recs = doc["records"]
    assert recs and {r["suite"] for r in recs} == {"micro", "train", "bank"}
    for r in recs:
        for key, typ in RECORD_KEYS.items():
            assert isinstance(r[key], typ) and not isinstance(r[key], bool), (key, r)
        for key in ("ms", "tflops", "peak_mem_mb"):
            assert key in r and (r[key] is None or isinstance(r[key], (int, float))), (key, r)
        assert r["status"] in ("ok", "skipped", "error", "oom"), r
        # ms is a number exactly when the provider ran
        assert (r["ms"] is None) == (r["status"] != "ok"), r
        if r["status"] == "ok":
            assert r["ms"] > 0, r
        else:
            assert r["reason"], r
    for r in recs:
        if r["suite"] == "bank":
            assert isinstance(r["N"], int) and r["N"] >= 2, r
            assert r["mode"] in ("fwd", "fwd_bwd")
        if r["suite"] == "train":
            assert r["mode"] in ("train_step", "train_step_packed") and r.get("model"), r
            # tokens/s counts real tokens: every token of a full batch, the documents' lengths when packed
            tokens = r["B"] * r["S"] if r["mode"] == "train_step" else sum(r["lengths"])
            if r["mode"] == "train_step_packed":
                assert r["tokens"] == tokens < r["padded_tokens"] == r["B"] * r["S"], r
            if r["status"] == "ok":
                assert r["tokens_per_s"] == pytest.approx(tokens / (r["ms"] * 1e-3))


def _check_cpu_labels(doc: dict, printed: str) -> None:
    assert doc["cpu_only"] is True
    assert doc["device"].startswith("CPU")
    assert "not kernel speed" in doc["note"]
    assert "[CPU: NOT KERNEL SPEED]" in printed
    for r in doc["records"]:
        assert r["device_type"] == "cpu", r
        # memory is not measured on a CPU: null and said so, never a made-up number
        assert r["peak_mem_mb"] is None, r
        if r["status"] == "ok":
            assert r["peak_mem_note"] == "not measured on CPU", r
    kernels = {r.get("kernel") for r in doc["records"] if r["provider"] == "prefixattn" and r["suite"] == "micro"}
    assert kernels == {"torch"}  # the backend that actually ran, not "auto"


def _check_providers_and_agreement(doc: dict) -> None:
    recs = doc["records"]
    by_suite = {s: [r for r in recs if r["suite"] == s] for s in ("micro", "train", "bank")}
    packed = [r for r in by_suite["train"] if r["mode"] == "train_step_packed"]
    by_suite["train"] = [r for r in by_suite["train"] if r["mode"] == "train_step"]
    assert [r["provider"] for r in packed] == ["peft_sdpa_padded", "prefixattn_padded", "prefixattn_packed"]
    for r in packed[:2]:  # the padded layouts agree today; the packed one: test_packed_train_step_agrees
        assert r["status"] == "ok" and r["agree"] is True and r["loss0_rel_err"] < 1e-4, r
    assert {r["provider"] for r in by_suite["micro"]} == set(ALL_PROVIDERS)
    assert {r["provider"] for r in by_suite["bank"]} == {"prefixattn_bank", "sequential", "concat_gather"}
    assert {r["provider"] for r in by_suite["train"]} == {"peft_sdpa", "peft_eager", "prefixattn"}
    assert {r["mode"] for r in by_suite["micro"]} >= {"fwd", "fwd_bwd", "layer0_fwd_bwd", "infer"}
    for r in by_suite["micro"] + by_suite["bank"]:
        if r["provider"] == "concat_flex" and r["mode"] != "infer":
            # FlexAttention has no CPU backward: an honest skip, not an error
            assert r["status"] == "skipped" and "CPU" in r["reason"], r
            continue
        assert r["status"] == "ok", r
        assert r["rel_err"] < 1e-5, r
        if r["mode"] != "infer":
            assert r["rel_err_grad"] < 1e-5, r
        assert r["agree"] is True, r
    ref = {r["ref"] for r in by_suite["bank"]}
    assert ref == {"prefixattn_bank"}
    train = {r["provider"]: r for r in by_suite["train"]}
    for r in train.values():
        assert r["status"] == "ok", r
        assert r["agree"] is True and r["logits0_rel_err"] < 1e-4, r
        assert r["loss0"] == pytest.approx(train["peft_sdpa"]["loss0"], rel=1e-5)
        assert r["trainable_params"] > 0


def _check_flops(doc: dict) -> None:
    for r in doc["records"]:
        if r["suite"] == "train":
            continue
        fwd = 4 * r["D"] * brute_pairs(r["Sq"], r["Sk"], r["P"]) * r["B"] * r["H"]
        factor = {"fwd": 1.0, "infer": 1.0, "fwd_bwd": 3.5}.get(r["mode"])
        if factor is not None:
            assert r["flops"] == pytest.approx(factor * fwd), r
        if r["status"] == "ok":
            assert r["tflops"] == pytest.approx(r["flops"] / (r["ms"] * 1e-3) / 1e12), r


def _check_files(json_path: Path) -> None:
    md = json_path.with_suffix(".md").read_text()
    for section in ("## Attention microbenchmarks", "## Training step", "## Packed training step", "## Mixed-task batch",
                    "### agreement with prefixattn_bank", "## Skipped or failed"):
        assert section in md, section
    assert "CPU run" in md and "not kernel speed" in md.lower()
    assert "| prefixattn_bank | sequential | concat_gather |" in md
    assert "not measured" in md  # peak memory on a CPU
    for suffix in ("-micro.png", "-e2e.png"):
        png = json_path.with_name(json_path.stem + suffix)
        data = png.read_bytes()
        assert data[:8] == PNG_MAGIC, png
        import matplotlib.image

        img = matplotlib.image.imread(str(png))
        assert img.shape[0] > 100 and img.shape[1] > 100


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------


def test_flops_causal_with_prefix_by_hand():
    # S = 4, P = 2: each of the 4 queries sees the 2 prefix slots (8 pairs) and 1, 2, 3, 4 sequence
    # keys (10 pairs): 18 pairs, 2 matmuls of D multiply-adds each per pair, per (row, head)
    B, H, D = 2, 3, 8
    assert brute_pairs(4, 4, 2) == 18
    fwd = 4 * D * 18 * B * H
    assert fwd == 3456
    assert attention_flops("fwd", B=B, H=H, Sq=4, Sk=4, P=2, D=D) == fwd
    assert attention_flops("infer", B=B, H=H, Sq=4, Sk=4, P=2, D=D) == fwd
    assert attention_flops("bwd", B=B, H=H, Sq=4, Sk=4, P=2, D=D) == 2.5 * fwd
    assert attention_flops("fwd_bwd", B=B, H=H, Sq=4, Sk=4, P=2, D=D) == 3.5 * fwd
    # layer 0: the backward is the prefix part only (4 queries x 2 slots)
    assert attention_flops("layer0_fwd_bwd", B=B, H=H, Sq=4, Sk=4, P=2, D=D) == fwd + 2.5 * 4 * D * 8 * B * H
    with pytest.raises(ValueError, match="unknown mode"):
        attention_flops("sideways", B=1, H=1, Sq=1, Sk=1, P=0, D=8)


@pytest.mark.parametrize("Sq,Sk,P", [(1, 1, 0), (7, 7, 3), (1, 9, 4), (3, 10, 2), (10, 10, 0), (6, 4, 1),
                                     (5, 17, 5), (16, 16, 16)])
def test_flops_match_brute_force(Sq, Sk, P):
    D, B, H = 16, 3, 5
    for causal in (True, False):
        pairs = brute_pairs(Sq, Sk, P, causal)
        assert causal_pairs(Sq, Sk, causal) + Sq * P == pairs
        assert attention_flops("fwd", B=B, H=H, Sq=Sq, Sk=Sk, P=P, D=D, causal=causal) == 4 * D * pairs * B * H
    # S (S + 1) / 2 causal pairs for a square block: neither S^2 / 2 nor S^2
    assert causal_pairs(Sk, Sk) == Sk * (Sk + 1) // 2


# ---------------------------------------------------------------------------------------------
# schema validator
# ---------------------------------------------------------------------------------------------


def _record(**kw):
    r = {"suite": "micro", "provider": "prefixattn", "mode": "fwd", "B": 1, "H": 2, "Hkv": 1, "S": 8, "P": 2,
         "D": 16, "dtype": "float32", "ms": 1.0, "tflops": 0.1, "peak_mem_mb": None, "status": "ok",
         "reason": None}
    r.update(kw)
    return r


def _doc(*records):
    return {"device": "CPU (x)", "torch": "t", "triton": None, "cuda": None, "records": list(records)}


@pytest.mark.parametrize("bad,match", [
    ({"B": "1"}, "'B' must be int"),
    ({"S": True}, "'S' must be int"),
    ({"ms": None}, "ms is None but status is 'ok'"),
    ({"status": "error", "reason": "x"}, "ms is 1.0 but status is 'error'"),
    ({"status": "weird", "ms": None}, "status must be one of"),
    ({"tflops": "fast"}, "'tflops' must be a number"),
    ({"suite": "bank"}, "bank size 'N'"),
])
def test_validate_rejects_malformed_records(bad, match):
    report.validate(_doc(_record()))
    report.validate(_doc(_record(suite="bank", N=4)))
    with pytest.raises(ValueError, match=match):
        report.validate(_doc(_record(**bad)))
    record = _record()
    del record["peak_mem_mb"]
    with pytest.raises(ValueError, match="peak_mem_mb"):
        report.validate(_doc(record))
    with pytest.raises(ValueError, match="lacks 'triton'"):
        report.validate({"device": "d", "torch": "t", "cuda": None, "records": []})


# ---------------------------------------------------------------------------------------------
# providers against an independent reference (the fused kernels when triton can run here)
# ---------------------------------------------------------------------------------------------


def _backend(device: torch.device) -> str:
    return "triton" if prefixattn.ops.resolve_backend("auto", torch.empty(1, device=device)) == "triton" else "torch"


def test_bank_providers_agree_with_float64_reference(device):
    shape = bank.BankShape(B=5, H=4, Hkv=2, S=12, P=3, D=16, N=3, dtype="float32")
    x = bank.make_bank_inputs(shape, device, seed=int(torch.randint(0, 2**20, ()).item()))
    idx = x.prefix_index.tolist()
    assert sorted(set(idx)) == [0, 1, 2], idx  # every bank entry has a row
    backend = _backend(device)
    dout = torch.randn(x.q.shape, device=device)
    ref = concat_reference(x.q, x.k, x.v, x.pk, x.pv, prefix_index=x.prefix_index)
    ref_grads = torch.autograd.grad(ref, x.tensors(), dout.double())
    for name in bank.PROVIDERS:
        fn, label = bank.build(name, x, backend)
        out = fn()
        assert rel_err(out, ref) < 2e-5, (name, label)
        grads = torch.autograd.grad(out, x.tensors(), dout)
        for g, r, what in zip(grads, ref_grads, ("q", "k", "v", "bank_k", "bank_v"), strict=True):
            assert rel_err(g, r) < 5e-5, (name, what)
        # every bank entry used by a row gets a gradient
        assert (grads[3].flatten(1).norm(dim=1) > 0).all(), name


def test_micro_providers_agree_and_a_broken_one_is_flagged(device):
    x = make_inputs(B=2, H=4, Hkv=2, Sq=9, Sk=9, P=3, D=16, dtype=torch.float32, device=device,
                    seed=int(torch.randint(0, 2**20, ()).item()))
    dout = torch.randn(x.q.shape, device=device)
    fns = {"prefixattn": prefixattn_provider(x, _backend(device))[0]}
    for name in ("concat_sdpa_mask", "concat_sdpa_causal", "eager"):
        fns[name] = PROVIDERS[name](x)[0]
    # a provider that forgets the prefix must be caught by the agreement check
    fns["no_prefix"] = lambda: prefixattn.prefix_attention(x.q, x.k, x.v, None, None, backend="torch")
    res = micro.check(fns, x, dout, "prefixattn", backward=True)
    ref = concat_reference(x.q, x.k, x.v, x.pk, x.pv)
    assert rel_err(fns["prefixattn"](), ref) < 2e-5
    for name in ("concat_sdpa_mask", "concat_sdpa_causal", "eager"):
        assert res[name]["ref"] == "prefixattn"
        assert micro.agrees(res[name]["rel_err"], res[name]["rel_err_grad"], "float32"), (name, res[name])
    assert res["no_prefix"]["rel_err"] > 1e-2
    assert micro.agrees(res["no_prefix"]["rel_err"], res["no_prefix"]["rel_err_grad"], "float32") is False


def test_train_bench_prefix_moves_the_logits():
    """The train suite's agreement check (first logits within 1e-3 of peft_sdpa) is only meaningful if
    the prefix visibly changes the tiny CPU model's logits: another prefix must be far outside it."""
    import peft
    from transformers import LlamaForCausalLM

    from bench.train_step import AGREE_TOL, CPU_MODEL, _batch

    torch.manual_seed(0)
    base = LlamaForCausalLM(CPU_MODEL.config())
    model = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8))
    batch = _batch(CPU_MODEL, 2, 16, torch.device("cpu"))
    emb = model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        a = model(**batch).logits
        emb.copy_(torch.randn_like(emb))
        b = model(**batch).logits
    assert rel_err(b, a) > 100 * AGREE_TOL[torch.float32]


def test_packed_batches_hold_the_same_documents():
    """The packed row is the padded batch's documents end to end, positions restart per document, and
    both layouts put a label on the same tokens (so their mean losses are comparable)."""
    from bench.train_packed import doc_lengths, make_batches
    from bench.train_step import CPU_MODEL

    lengths = doc_lengths(40, median=10, sigma=1.0, lo=2, hi=60, seed=int(torch.randint(0, 2**20, ()).item()))
    assert all(2 <= n <= 60 for n in lengths) and len(set(lengths)) > 5  # mixed lengths
    padded, packed = make_batches(CPU_MODEL, lengths, torch.device("cpu"))
    real = padded["attention_mask"].bool()
    assert packed["input_ids"].shape == (1, sum(lengths))
    assert torch.equal(packed["input_ids"][0], padded["input_ids"][real])
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0)[:-1].tolist()])
    pos = packed["position_ids"][0]
    assert torch.equal((pos == 0).nonzero().flatten(), starts)
    assert torch.equal(pos[1:][pos[1:] != 0], (pos[:-1] + 1)[pos[1:] != 0])
    # labels: every token but each document's first; the model's shift drops the padded rows' first
    n_padded = int((padded["labels"][:, 1:] != -100).sum())
    n_packed = int((packed["labels"][0, 1:] != -100).sum())
    assert n_padded == n_packed == sum(lengths) - len(lengths)
    assert (packed["labels"][0, starts] == -100).all()


def test_packed_train_step_agrees_and_is_timed():
    from bench.train_packed import run_packed_bench

    recs = run_packed_bench(torch.device("cpu"), backend="torch", log=lambda *a: None)
    for r in recs:
        assert r["status"] == "ok" and r["agree"] is True and r["loss0_rel_err"] < 1e-4, r
        assert r["ms"] > 0 and r["tokens_per_s"] > 0


def test_a_failing_suite_keeps_the_others_results(tmp_path, monkeypatch, capsys):
    from bench import train_step

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(train_step, "run_train_bench", boom)
    rc = run_all.main(["--quick", "--suites", "micro,train", "--providers", "prefixattn,concat_sdpa_mask",
                       "--device", "cpu", "--backend", "torch", "--out", str(tmp_path)])
    assert rc == 1
    assert "suite train failed: RuntimeError: boom" in capsys.readouterr().out
    (path,) = tmp_path.glob("*.json")
    doc = json.loads(path.read_text())
    report.validate(doc)
    assert doc["suite_errors"] == {"train": "RuntimeError: boom"}
    assert {r["suite"] for r in doc["records"]} == {"micro"} and doc["records"]
    assert "Suite train failed" in path.with_suffix(".md").read_text()


# ---------------------------------------------------------------------------------------------
# python -m bench: the commands and their argument errors
# ---------------------------------------------------------------------------------------------


def test_python_m_bench_micro_writes_json(tmp_path, capsys):
    from bench.__main__ import main

    rc = main(["micro", "--quick", "--providers", "prefixattn,concat_sdpa_mask", "--backend", "torch",
               "--device", "cpu", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    (path,) = tmp_path.glob("*.json")
    doc = json.loads(path.read_text())
    assert doc["cpu_only"] is True and doc["device"].startswith("CPU")
    assert {r["suite"] for r in doc["records"]} == {"micro"}
    assert {r["provider"] for r in doc["records"]} == {"prefixattn", "concat_sdpa_mask"}
    assert all(r["status"] == "ok" and r["agree"] for r in doc["records"])
    assert "NOT KERNEL SPEED" in out
    assert path.with_suffix(".md").is_file()


def test_python_m_bench_as_a_subprocess(tmp_path):
    """``python -m bench bank`` run the documented way: from the checkout, the project installed."""
    import os
    import subprocess

    out_dir = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "bench", "bank", "--quick", "--backend", "torch",
                           "--device", "cpu", "--out", str(out_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = out_dir.glob("*.json")
    doc = json.loads(path.read_text())
    assert {r["provider"] for r in doc["records"]} == {"prefixattn_bank", "sequential", "concat_gather"}
    assert all(r["suite"] == "bank" and r["N"] >= 2 and r["agree"] for r in doc["records"])
    assert "[CPU: NOT KERNEL SPEED]" in proc.stdout


@pytest.mark.parametrize("argv,message", [
    (["--suites", "micro,sideways"], "unknown suite(s) ['sideways']"),
    (["--providers", "prefixattn,magic"], "unknown provider(s) ['magic']"),
    (["micro", "--suites", "bank"], "--suites is implied by the command"),
    (["sideways"], "unknown command 'sideways'"),
])
def test_python_m_bench_bad_arguments(argv, message, tmp_path, capsys):
    from bench.__main__ import main

    assert main([*argv, "--out", str(tmp_path / "b")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_python_m_bench_refuses_cuda_without_a_gpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    from bench.__main__ import main

    assert main(["--device", "cuda", "--out", str(tmp_path / "b")]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_python_m_bench_argparse_errors(capsys):
    from bench.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["--backend", "cuda"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
