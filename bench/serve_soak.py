"""``python -m bench serve --soak MINUTES``: ``prefixattn serve`` under a steady mixed load for MINUTES (a
benchmark, not a test).

One server (built model and three PEFT prefixes of 32, 8 and 5 tokens, as ``python -m bench serve`` builds
them, or ``--model``/``--prefix``), a fixed set of prompts for every served name (the base included), and
every (name, prompt)'s answer asked alone first (greedy). Then C clients (``--concurrency``) send requests
for MINUTES: a random name and prompt, half of them streamed, and one in ten a bad request (an unknown
model, echo or a reserved cache_salt, a prompt longer than the prefix's context) that must get its 4xx.
Every answer is compared with its solo answer token for token; the report has, per minute, the requests,
output tokens per second, p50 / p95 latency, bad requests answered right, mismatches (must be 0), and the
server's resident memory (every process of ``prefixattn serve``) at the start and the end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from .env import environment
from .serve import Server, build_model, vllm_version

PREFIX_TOKENS = (32, 8, 5)
NUM_PROMPTS = 6  # per served name
BAD_EVERY = 10


def build_prefixes(root: Path) -> tuple[Path, list[str]]:
    """The bench's small Llama and three PEFT prefixes of different lengths."""
    from transformers import LlamaForCausalLM

    import prefixattn

    model_dir, first = build_model(root, PREFIX_TOKENS[0])
    specs = [f"p{PREFIX_TOKENS[0]}={first.split('=', 1)[1]}"]
    for i, p in enumerate(PREFIX_TOKENS[1:], start=1):
        torch.manual_seed(100 + i)
        patched = prefixattn.patch(LlamaForCausalLM.from_pretrained(model_dir), num_prefix_tokens=p,
                                   backend="torch")
        prefixattn.save_peft(patched, root / f"prefix{p}")
        specs.append(f"p{p}={root / f'prefix{p}'}")
    return model_dir, specs


def request(port: int, body: dict[str, Any], stream: bool) -> tuple[int, list[int], float]:
    """(status, generated token ids, seconds)."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", "/v1/completions", json.dumps({**body, "stream": stream}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            resp.read()
            return resp.status, [], time.perf_counter() - start
        ids: list[int] = []
        if not stream:
            for choice in json.loads(resp.read())["choices"]:
                ids += choice.get("token_ids") or []
            return 200, ids, time.perf_counter() - start
        buffer = b""
        while chunk := resp.read1(65536):
            buffer += chunk
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                if event.startswith(b"data: {"):
                    data = json.loads(event[6:])
                    if "error" in data:
                        return 500, ids, time.perf_counter() - start
                    for choice in data.get("choices") or []:
                        ids += choice.get("token_ids") or []
        return 200, ids, time.perf_counter() - start
    finally:
        conn.close()


def resident_mib(pid: int) -> float:
    """Resident memory of a process and all its descendants (Linux /proc), MiB."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
            stack += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except (OSError, StopIteration):
            continue
    return total / 1024


def bad_requests(names: list[str], contexts: dict[str, int]) -> list[tuple[dict[str, Any], int]]:
    prefix = names[1]
    return [({"model": "no-such-model", "prompt": [5, 6]}, 404),
            ({"model": prefix, "prompt": [5, 6], "echo": True}, 400),
            ({"model": "base", "prompt": [5, 6], "cache_salt": "prefixattn:x"}, 400),
            ({"model": prefix, "prompt": [5] * contexts[prefix], "max_tokens": 2}, 400)]


def soak(args: argparse.Namespace, python: str, vllm_args: list[str], out: Path, on_gpu: bool) -> int:
    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="bench-serve-soak-") as tmp:
        if args.model is None:
            model, specs = build_prefixes(Path(tmp))
        else:
            if args.prefix is None:
                print("python -m bench serve --soak: --model needs --prefix NAME=ADAPTER", file=sys.stderr)
                return 2
            model, specs = Path(args.model), [args.prefix]
        server = Server(python, str(model), specs, vllm_args, out / "server.log")
        try:
            doc = _run(args, server, [s.split("=", 1)[0] for s in specs], rng)
        finally:
            server.stop()
    env = environment(torch.device("cuda" if on_gpu else "cpu"))
    env["vllm"] = vllm_version(python)
    doc = {"env": env, **doc}
    stem = out / f"serve-soak-{'gpu' if on_gpu else 'cpu'}-{env['date']}"
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(doc))
    print(markdown(doc))
    return 0 if doc["mismatches"] == 0 and doc["bad_wrong"] == 0 else 1


def _run(args: argparse.Namespace, server: Server, prefixes: list[str], rng: random.Random) -> dict[str, Any]:
    names = ["base", *prefixes]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("GET", "/v1/models")
    contexts = {c["id"]: c["max_model_len"] for c in json.loads(conn.getresponse().read())["data"]}
    T = args.max_tokens
    prompts = [[rng.randrange(3, 259) for _ in range(rng.randrange(4, args.prompt_tokens + 1))]
               for _ in range(NUM_PROMPTS)]
    solo: dict[tuple[str, int], list[int]] = {}
    for name in names:  # every answer alone first: what the loaded server must give
        for i, prompt in enumerate(prompts):
            body = {"model": name, "prompt": prompt, "max_tokens": T, "temperature": 0, "ignore_eos": True,
                    "return_token_ids": True}
            status, ids, _ = request(server.port, body, stream=False)
            if status != 200 or len(ids) != T:
                raise RuntimeError(f"solo request {name} #{i}: HTTP {status}, {len(ids)} tokens")
            solo[name, i] = ids
    bad = bad_requests(names, contexts)
    rss_start = resident_mib(server.proc.pid)
    start = time.monotonic()
    stop_at = start + args.soak * 60
    records: list[dict[str, Any]] = []
    lock = threading.Lock()

    def client(seed: int) -> None:
        local = random.Random(seed)
        n = 0
        while time.monotonic() < stop_at:
            n += 1
            if n % BAD_EVERY == 0:
                body, expected = local.choice(bad)
                status, _, seconds = request(server.port, body, stream=False)
                rec = {"t": time.monotonic() - start, "bad": True, "ok": status == expected, "status": status}
            else:
                name, i = local.choice(names), local.randrange(NUM_PROMPTS)
                body = {"model": name, "prompt": prompts[i], "max_tokens": T, "temperature": 0,
                        "ignore_eos": True, "return_token_ids": True}
                status, ids, seconds = request(server.port, body, stream=local.random() < 0.5)
                rec = {"t": time.monotonic() - start, "bad": False, "status": status, "latency_s": seconds,
                       "tokens": len(ids), "mismatch": status != 200 or ids != solo[name, i]}
            with lock:
                records.append(rec)

    threads = [threading.Thread(target=client, args=(s,)) for s in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    rss_end = resident_mib(server.proc.pid)
    minutes = []
    for m in range(max(1, math.ceil(wall / 60))):  # the last one: the requests finishing after MINUTES
        good = [r for r in records if m * 60 <= r["t"] < (m + 1) * 60 and not r["bad"]]
        bads = [r for r in records if m * 60 <= r["t"] < (m + 1) * 60 and r["bad"]]
        lat = sorted(r["latency_s"] for r in good) or [float("nan")]
        span = min(60.0, wall - m * 60)
        minutes.append({"minute": m + 1, "seconds": round(span, 1), "requests": len(good),
                        "tokens_per_s": sum(r["tokens"] for r in good) / span,
                        "latency_p50_s": statistics.median(lat),
                        "latency_p95_s": lat[int(0.95 * (len(lat) - 1))],
                        "bad_requests": len(bads), "bad_answered_right": sum(r["ok"] for r in bads),
                        "mismatches": sum(r["mismatch"] for r in good)})
    prefix_tokens = {n: contexts["base"] - contexts[n] for n in prefixes}
    return {"shape": {"minutes": args.soak, "names": names, "prefix_tokens": prefix_tokens,
                      "prompts_per_name": NUM_PROMPTS, "max_tokens": T, "concurrency": args.concurrency,
                      "bad_every": BAD_EVERY},
            "minutes_table": minutes, "requests": sum(not r["bad"] for r in records),
            "bad_requests": sum(r["bad"] for r in records),
            "bad_wrong": sum(r["bad"] and not r["ok"] for r in records),
            "mismatches": sum(r.get("mismatch", False) for r in records),
            "rss_mib_start": rss_start, "rss_mib_end": rss_end, "wall_s": wall}


def markdown(doc: dict[str, Any]) -> str:
    env, shape = doc["env"], doc["shape"]
    label = " (CPU: relative costs only, not serving speed)" if env.get("cpu_only") else ""
    lines = [f"# prefixattn serve soak, {shape['minutes']:g} min{label}", "",
             f"{env['device']}, vLLM {env['vllm']}, torch {env['torch']}, {env['date']}. "
             f"Names {shape['names']} (prefix tokens {shape['prefix_tokens']}), "
             f"{shape['prompts_per_name']} prompts each, "
             f"T={shape['max_tokens']}, C={shape['concurrency']}, half streamed, 1 in {shape['bad_every']} a "
             "bad request.", "",
             f"Requests {doc['requests']}, mismatches against their solo answers: **{doc['mismatches']}**; "
             f"bad requests {doc['bad_requests']}, answered with the wrong status: {doc['bad_wrong']}. "
             f"Server resident memory: {doc['rss_mib_start']:.0f} MiB at the start, "
             f"{doc['rss_mib_end']:.0f} MiB at the end.", "",
             "| minute (s) | requests | tokens/s | p50 latency ms | p95 latency ms | bad (right) | "
             "mismatches |",
             "|---|---|---|---|---|---|---|"]
    for m in doc["minutes_table"]:
        lines.append(f"| {m['minute']} ({m['seconds']:g}) | {m['requests']} | {m['tokens_per_s']:.1f} | "
                     f"{m['latency_p50_s'] * 1e3:.0f} | {m['latency_p95_s'] * 1e3:.0f} | "
                     f"{m['bad_requests']} ({m['bad_answered_right']}) | {m['mismatches']} |")
    return "\n".join(lines) + "\n"
