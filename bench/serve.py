"""``python -m bench serve``: throughput and latency of ``prefixattn serve`` with prefixes vs the plain base
model, on the same server, in the same run.

    python -m bench serve                                   # a small model and prefix built here, on CPU
    python -m bench serve --model DIR --prefix NAME=ADAPTER --vllm-args "--dtype bfloat16"   # your own
    python -m bench serve --vllm-python venv/bin/python     # a vLLM environment other than .venv-vllm

The server runs in the vLLM environment (``scripts/setup_vllm.sh`` makes ``.venv-vllm``); this harness
runs in the main one and talks HTTP. Modes, interleaved round by round (medians over the rounds):

- ``base``: the base model, prompts of L tokens;
- ``prefix``: the same prompts for the prefix (its P tokens written into the cache by the connector);
- ``mixed``: half base, half prefix, in one batch;
- ``base_text_prefix``: the base model with P more prompt tokens (what a prefix costs as text to prefill).

Each round sends N streamed completions, C at a time, greedy, ``ignore_eos``, T tokens each, fresh random
prompts for every mode (no prefix-cache hits between modes; the prefix's own full blocks of placeholders
are cached after its first request, as in any vLLM deployment with prefix caching): throughput
is output tokens per second of the round, latency the end-to-end time of a request, TTFT the time to its
first streamed token. The ratios are against ``base`` of the same round. A CPU run is labelled CPU: it
shows the relative cost of the connector and the P extra keys, not GPU serving speed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from .env import environment

ROOT = Path(__file__).resolve().parents[1]
MODES = ("base", "prefix", "mixed", "base_text_prefix")
CPU_VLLM_ARGS = "--enforce-eager --dtype float32 --block-size 32 --kv-cache-memory-bytes 268435456"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench serve", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="base model directory (default: a small Llama built here)")
    ap.add_argument("--prefix", default=None, metavar="NAME=ADAPTER",
                    help="the prefix to serve (default: a random one of --prefix-tokens tokens)")
    ap.add_argument("--prefix-tokens", type=int, default=32, help="P of the built prefix (default 32)")
    ap.add_argument("--vllm-python", default=None, help="default: .venv-vllm/bin/python")
    ap.add_argument("--vllm-args", default=None,
                    help=f"options for vLLM (default on CPU: {CPU_VLLM_ARGS!r})")
    ap.add_argument("--requests", type=int, default=16, help="N, requests per round (default 16)")
    ap.add_argument("--concurrency", type=int, default=8, help="C, requests in flight (default 8)")
    ap.add_argument("--prompt-tokens", type=int, default=128, help="L (default 128)")
    ap.add_argument("--max-tokens", type=int, default=32, help="T (default 32)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every mode, interleaved (default 3)")
    ap.add_argument("--soak", type=float, default=None, metavar="MINUTES",
                    help="a soak run instead (bench/serve_soak.py): mixed prefixes, streamed and not, "
                         "bad requests interleaved, for MINUTES; per-minute throughput, latency, memory, "
                         "mismatches")
    ap.add_argument("--out", type=Path, default=None,
                    help="output directory (default: a new temporary directory, printed; never the checkout)")
    return ap.parse_args(argv)


def build_model(root: Path, prefix_tokens: int) -> tuple[Path, str]:
    """A small Llama (4 layers, 8 heads of 32, 4 KV heads) with the byte tokenizer, and a random prefix
    saved as a PEFT adapter."""
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    import prefixattn

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=259, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=1024,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=1, pad_token_id=0)
    model_dir = root / "model"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    ByT5Tokenizer(extra_ids=0).save_pretrained(model_dir)
    patched = prefixattn.patch(LlamaForCausalLM.from_pretrained(model_dir), num_prefix_tokens=prefix_tokens,
                               backend="torch")
    prefixattn.save_peft(patched, root / "prefix")
    return model_dir, f"bench={root / 'prefix'}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, python: str, model: str, prefix: str | list[str], vllm_args: list[str],
                 log: Path) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        prefixes = [prefix] if isinstance(prefix, str) else prefix
        cmd = [python, "-m", "prefixattn", "serve", model, *[a for p in prefixes for a in ("--prefix", p)],
               "--served-model-name", "base", "--host", "127.0.0.1", "--port", str(self.port), *vllm_args]
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        deadline = time.monotonic() + 600
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"prefixattn serve did not start; log tail:\n{log.read_text()[-3000:]}")
            time.sleep(2)

    def healthy(self) -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            conn.request("GET", "/health")
            return conn.getresponse().status == 200
        except OSError:
            return False

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def one_request(port: int, model: str, prompt: list[int], max_tokens: int) -> dict[str, float]:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}})
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"{model}: HTTP {resp.status}: {resp.read()[:500]!r}")
    first, tokens, buffer = None, 0, b""
    while chunk := resp.read1(65536):
        buffer += chunk
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            if not event.startswith(b"data: {"):
                continue
            data = json.loads(event[6:])
            if data.get("choices") and first is None:
                first = time.perf_counter() - start
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
    total = time.perf_counter() - start
    if tokens != max_tokens:
        raise RuntimeError(f"{model}: {tokens} tokens streamed, expected {max_tokens}")
    return {"latency_s": total, "ttft_s": first if first is not None else total, "tokens": tokens}


def run_round(port: int, jobs: list[tuple[str, list[int]]], concurrency: int,
              max_tokens: int) -> dict[str, Any]:
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda job: one_request(port, job[0], job[1], max_tokens), jobs))
    wall = time.perf_counter() - start
    return {"wall_s": wall, "tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "latency_s": statistics.median(r["latency_s"] for r in results),
            "latency_p90_s": sorted(r["latency_s"] for r in results)[int(0.9 * (len(results) - 1))],
            "ttft_s": statistics.median(r["ttft_s"] for r in results)}


def jobs_for(mode: str, prompts: list[list[int]], prefix: str, p: int, rng: random.Random) -> list:
    if mode == "base":
        return [("base", q) for q in prompts]
    if mode == "prefix":
        return [(prefix, q) for q in prompts]
    if mode == "mixed":
        return [(prefix if i % 2 else "base", q) for i, q in enumerate(prompts)]
    return [("base", [rng.randrange(3, 259) for _ in range(p)] + q) for q in prompts]


def vllm_version(python: str) -> str:
    code = "import vllm; print(vllm.__version__)"
    return subprocess.run([python, "-c", code], capture_output=True, text=True).stdout.strip() or "?"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    python = args.vllm_python or str(ROOT / ".venv-vllm" / "bin" / "python")
    if not Path(python).is_file():
        print(f"python -m bench serve: no vLLM environment at {python} (bash scripts/setup_vllm.sh)",
              file=sys.stderr)
        return 2
    on_gpu = torch.cuda.is_available()
    default_args = "" if on_gpu else CPU_VLLM_ARGS
    vllm_args = shlex.split(args.vllm_args if args.vllm_args is not None else default_args)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-serve-out-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"python -m bench serve: writing to {out}", flush=True)
    if args.soak is not None:
        from .serve_soak import soak

        return soak(args, python, vllm_args, out, on_gpu)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        if args.model is None:
            model, prefix_spec = build_model(Path(tmp), args.prefix_tokens)
        else:
            if args.prefix is None:
                print("python -m bench serve: --model needs --prefix NAME=ADAPTER", file=sys.stderr)
                return 2
            model, prefix_spec = Path(args.model), args.prefix
        name = prefix_spec.split("=", 1)[0]
        check = subprocess.run([python, "-m", "prefixattn", "serve", str(model), "--prefix", prefix_spec,
                                "--check"], capture_output=True, text=True)
        if check.returncode != 0:
            print(check.stderr, file=sys.stderr)
            return 2
        p = int(check.stdout.split(f"{name}: ", 1)[1].split(" ", 1)[0])
        rng = random.Random(0)
        server = Server(python, str(model), prefix_spec, vllm_args, out / "server.log")
        try:
            def prompts(n: int) -> list[list[int]]:
                return [[rng.randrange(3, 259) for _ in range(args.prompt_tokens)] for _ in range(n)]

            warm_up = jobs_for("mixed", prompts(args.concurrency), name, p, rng)
            run_round(server.port, warm_up, args.concurrency, args.max_tokens)
            rounds: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
            for r in range(args.rounds):
                # fresh prompts for every mode (no prefix-cache hits across modes), the order rotated
                for mode in MODES[r % len(MODES):] + MODES[:r % len(MODES)]:
                    res = run_round(server.port, jobs_for(mode, prompts(args.requests), name, p, rng),
                                    args.concurrency, args.max_tokens)
                    rounds[mode].append(res)
                    print(f"round {r + 1} {mode:>17}: {res['tokens_per_s']:8.1f} tok/s, latency "
                          f"{res['latency_s'] * 1e3:7.1f} ms, TTFT {res['ttft_s'] * 1e3:7.1f} ms", flush=True)
        finally:
            server.stop()
    doc = report(args, rounds, p, python, on_gpu)
    stem = out / f"serve-{'gpu' if on_gpu else 'cpu'}-{doc['env']['date']}"
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


def report(args: argparse.Namespace, rounds: dict[str, list[dict[str, Any]]], p: int, python: str,
           on_gpu: bool) -> dict[str, Any]:
    env = environment(torch.device("cuda" if on_gpu else "cpu"))
    env["vllm"] = vllm_version(python)
    summary = {}
    for mode in MODES:
        med = {k: statistics.median(r[k] for r in rounds[mode]) for k in rounds[mode][0]}
        # ratio per round against that round's base, then the median: load drifts between rounds
        pairs = list(zip(rounds[mode], rounds["base"], strict=True))
        med["throughput_vs_base"] = statistics.median(a["tokens_per_s"] / b["tokens_per_s"] for a, b in pairs)
        med["latency_vs_base"] = statistics.median(a["latency_s"] / b["latency_s"] for a, b in pairs)
        med["ttft_vs_base"] = statistics.median(a["ttft_s"] / b["ttft_s"] for a, b in pairs)
        for key in ("tokens_per_s", "latency_s"):  # the spread of the rounds, not only their median
            values = [r[key] for r in rounds[mode]]
            med[f"{key}_min"], med[f"{key}_max"] = min(values), max(values)
        summary[mode] = med
    shape = {"model": args.model or "built: Llama 4 layers, hidden 256, 8 heads x 32, 4 KV heads, fp32",
             "prefix_tokens": p, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
             "requests": args.requests, "concurrency": args.concurrency, "rounds": args.rounds}
    return {"env": env, "shape": shape, "summary": summary, "rounds": rounds}


def markdown(doc: dict[str, Any]) -> str:
    env, shape = doc["env"], doc["shape"]
    label = " (CPU: relative costs only, not serving speed)" if env.get("cpu_only") else ""
    lines = [f"# prefixattn serve vs the base model{label}", "",
             f"{env['device']}, vLLM {env['vllm']}, torch {env['torch']}, {env['date']}. "
             f"P={shape['prefix_tokens']}, L={shape['prompt_tokens']}, T={shape['max_tokens']}, "
             f"N={shape['requests']}, C={shape['concurrency']}, medians of {shape['rounds']} interleaved "
             f"rounds (min / median / max over the rounds); model: {shape['model']}.", "",
             "| mode | tokens/s (min / median / max) | x base | latency ms (min / median / max) | x base | "
             "TTFT ms | x base |",
             "|---|---|---|---|---|---|---|"]
    for mode, s in doc["summary"].items():
        lines.append(f"| {mode} | {s['tokens_per_s_min']:.1f} / {s['tokens_per_s']:.1f} / "
                     f"{s['tokens_per_s_max']:.1f} | {s['throughput_vs_base']:.2f} | "
                     f"{s['latency_s_min'] * 1e3:.0f} / {s['latency_s'] * 1e3:.0f} / "
                     f"{s['latency_s_max'] * 1e3:.0f} | {s['latency_vs_base']:.2f} | "
                     f"{s['ttft_s'] * 1e3:.0f} | {s['ttft_vs_base']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
