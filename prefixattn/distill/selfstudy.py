"""Self-study data (Cartridges, Eyuboglu et al. 2025, section 4): synthetic conversations about a corpus.

The corpus's token ids are cut into chunks. For each conversation a seed prompt of one kind
(structuring, summarisation, a question, a use case, a creative task: the paper's five) goes to the
asker, the model with the chunk in its context, which writes the user's message; the answerer, the model
with the same chunk in its context, answers it, and the teacher's top-k log-probabilities for every
answer token are recorded (the teacher is the answerer: the frozen model with the chunk in front).

In process, each chunk is prefilled once and both agents generate over its kept keys and values
(``reading_context``: HF ``generate`` with the chunk as a frozen prefix). With an OpenAI-compatible
endpoint (``prefixattn serve``, vLLM: ``EndpointGenerator``) the endpoint writes the messages and answers
from token prompts [chunk; turn] and the teacher's top-k come from one forward over the kept K/V here.

Seeded (conversation i's chunk and kind, and each group's sampling, follow from the seed), written as
JSONL as it goes (one flushed line per conversation), resumable (a rerun skips the conversations the file
holds and drops a line a killed run left half-written), deduplicated (a conversation equal to one already
written is not written again), with a progress line and ETA on stderr.

Split over processes (``shard=(rank, size)``, under torchrun): the groups are dealt round-robin, each
process writes its own file next to ``out`` (``selfstudy.rank1-of-2.jsonl``), and ``merge_shards`` then
appends them to ``out`` in the order one process writes (by chunk, then index): the same file as a
one-process run, whatever the number of processes.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..hf.context import ContextKV, check_fits, prefill_context, reading_context, teacher_logits
from .objective import DEFAULT_TOP_K, topk_of
from .records import conversation_key, digest_ids, tokenizer_digest

KINDS = ("structuring", "summarization", "question", "use_case", "creative")
SEED_PROMPTS = {
    "structuring": "Write one message asking an assistant to organise a part of the document above into a "
                   "structured form (a list, a table, JSON or YAML). Write only the message.",
    "summarization": "Write one message asking an assistant to summarise a part of the document above. "
                     "Write only the message.",
    "question": "Write one question about a specific detail of the document above that can be answered from "
                "the document alone. Write only the question.",
    "use_case": "Think of a task someone could do with the information in the document above, and write the "
                "message they would send an assistant to get help with it. Write only the message.",
    "creative": "Write one message asking an assistant for something creative (a poem, a story, an analogy) "
                "grounded in the document above. Write only the message.",
}


@dataclass(frozen=True)
class SelfStudyConfig:
    conversations: int = 64
    chunk_tokens: int = 512
    question_tokens: int = 32
    answer_tokens: int = 64
    temperature: float = 0.7
    top_k: int = DEFAULT_TOP_K
    batch_size: int = 8
    seed: int = 0

    def check(self) -> None:
        for name in ("conversations", "chunk_tokens", "question_tokens", "answer_tokens", "top_k",
                     "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


def chunk_spans(length: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """[start, end) of the chunks of a corpus of ``length`` tokens: as few as hold at most ``chunk_tokens``
    each, of equal sizes (to a token; no short tail chunk that would teach with almost no context)."""
    n = -(-length // chunk_tokens)
    bounds = [round(i * length / n) for i in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def user_turn(tokenizer: Any, text: str) -> list[int]:
    """The ids of a user turn waiting for the assistant's answer: the chat template when the tokenizer has
    one, else plain ``User: ...\\nAssistant:`` text."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return list(tokenizer(f"\nUser: {text}\nAssistant:", add_special_tokens=False)["input_ids"])


def plan(cfg: SelfStudyConfig, chunks: int) -> list[tuple[int, int, str]]:
    """(index, chunk, kind) of every conversation: chunks round-robin, the kind drawn from the seed."""
    out = []
    for i in range(cfg.conversations):
        kind = KINDS[random.Random(f"{cfg.seed}:{i}").randrange(len(KINDS))]
        out.append((i, i % chunks, kind))
    return out


class InProcessGenerator:
    """Both agents are the frozen model reading the chunk's kept K/V (``reading_context``), HF generate."""

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer

    @torch.no_grad()
    def generate(self, context: ContextKV, prompts: list[list[int]], max_new: int, temperature: float,
                 seed: int) -> list[list[int]]:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        S = max(len(p) for p in prompts)
        check_fits(self.model, context, S + max_new)
        device = next(self.model.parameters()).device
        ids = torch.full((len(prompts), S), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, p in enumerate(prompts):  # left padding: generate continues every row at the end
            ids[b, S - len(p):] = torch.tensor(p)
            mask[b, S - len(p):] = 1
        torch.manual_seed(seed)
        sample = temperature > 0
        was_training = self.model.training
        self.model.eval()
        try:
            with reading_context(self.model, context):
                out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                          max_new_tokens=max_new, do_sample=sample,
                                          temperature=temperature if sample else None, top_p=None,
                                          top_k=None, pad_token_id=pad, eos_token_id=tok.eos_token_id)
        finally:
            self.model.train(was_training)
        return [_until_eos(row.tolist(), tok.eos_token_id, pad) for row in out[:, S:]]


def _until_eos(ids: list[int], eos: int | None, pad: int) -> list[int]:
    """The generated ids up to and including the first end-of-sequence token."""
    if eos is not None and eos in ids:
        return ids[:ids.index(eos) + 1]
    while ids and ids[-1] == pad and pad != eos:
        ids = ids[:-1]
    return ids


class EndpointGenerator:
    """Both agents on an OpenAI-compatible completions endpoint (``prefixattn serve``, vLLM): token prompts
    [chunk; turn], the answers' text tokenized here. ``model_name`` defaults to the first served model."""

    def __init__(self, url: str, tokenizer: Any, model_name: str | None = None,
                 timeout: float = 600.0) -> None:
        self.url = url.rstrip("/")
        if self.url.endswith("/v1"):
            self.url = self.url[:-3]
        self.tokenizer, self.timeout = tokenizer, timeout
        self.model_name = model_name or self._first_model()

    def _request(self, path: str, payload: dict[str, Any] | None = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.load(response)
        except OSError as e:
            raise ValueError(f"--generator-url {self.url}: {path} failed ({e})") from None

    def _first_model(self) -> str:
        models = self._request("/v1/models").get("data") or []
        if not models:
            raise ValueError(f"--generator-url {self.url}: /v1/models lists no model")
        return models[0]["id"]

    def generate(self, context: ContextKV, prompts: list[list[int]], max_new: int, temperature: float,
                 seed: int) -> list[list[int]]:
        chunk = context.input_ids.tolist()
        reply = self._request("/v1/completions", {
            "model": self.model_name, "prompt": [chunk + p for p in prompts], "max_tokens": max_new,
            "temperature": temperature, "seed": seed})
        texts = [""] * len(prompts)
        for choice in reply.get("choices", []):
            texts[int(choice.get("index", 0))] = choice.get("text", "")
        ids = [list(self.tokenizer(t, add_special_tokens=False)["input_ids"])[:max_new] for t in texts]
        eos = self.tokenizer.eos_token_id
        return [row + [eos] if eos is not None and len(row) < max_new and reply_finished(reply, b) else row
                for b, row in enumerate(ids)]


def reply_finished(reply: dict[str, Any], index: int) -> bool:
    """Whether the endpoint's choice ``index`` ended on its own (``finish_reason`` "stop")."""
    for choice in reply.get("choices", []):
        if int(choice.get("index", 0)) == index:
            return choice.get("finish_reason") == "stop"
    return False


@torch.no_grad()
def answer_topk(model: nn.Module, context: ContextKV, prompts: list[list[int]], answers: list[list[int]],
                k: int) -> list[tuple[list[list[int]], list[list[float]]]]:
    """The teacher's top-k for each answer token: one forward over [turn; answer] reading the chunk's K/V."""
    rows = [p + a for p, a in zip(prompts, answers, strict=True)]
    S = max(len(r) for r in rows)
    device = next(model.parameters()).device
    ids = torch.zeros((len(rows), S), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r)
        mask[b, :len(r)] = 1
    was_training = model.training
    model.eval()
    try:
        logits = teacher_logits(model, context, ids.to(device), mask.to(device))
    finally:
        model.train(was_training)
    out = []
    for b, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        top = topk_of(logits[b, len(p) - 1:len(p) - 1 + len(a)], k)
        out.append((top.ids.tolist(), [[round(x, 5) for x in row] for row in top.logprobs.tolist()]))
    return out


class Progress:
    """One line on stderr: done / total, rate, ETA."""

    def __init__(self, total: int, done: int, enabled: bool = True, label: str = "self-study") -> None:
        self.total, self.done, self.start_done = total, done, done
        self.enabled, self.label, self.t0 = enabled, label, time.monotonic()

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.t0
        made = self.done - self.start_done
        rate = made / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta == eta else "?"
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        sys.stderr.write(f"\r{self.label}: [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                         f"conversations, {rate:.2f}/s, ETA {eta_text}{note}   ")
        if self.done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _complete_records(path: Path) -> list[dict[str, Any]]:
    """The records of ``path``; a last line a killed run left half-written is dropped (the file is cut
    back to its last complete line)."""
    if not path.is_file():
        return []
    raw = path.read_bytes()
    keep = raw if raw.endswith(b"\n") or not raw else raw[:raw.rfind(b"\n") + 1]
    if keep != raw:
        path.write_bytes(keep)
    # split at newlines only: str.splitlines also splits at U+2028, U+0085 and other separators, which
    # json.dumps(ensure_ascii=False) leaves raw inside the strings of a generated text
    return [json.loads(line) for line in keep.decode("utf-8").split("\n") if line.strip()]


def _existing(*paths: Path) -> tuple[set[int], set[str]]:
    """Indices and conversation keys already in the files (``_complete_records``)."""
    records = [r for path in paths for r in _complete_records(path)]
    return {int(r["index"]) for r in records}, {conversation_key(r) for r in records}


def shard_path(path: Path, rank: int, size: int) -> Path:
    """The file process ``rank`` of ``size`` writes its conversations to before ``merge_shards``."""
    return path.with_name(f"{path.stem}.rank{rank}-of-{size}{path.suffix}")


def shard_files(path: Path) -> list[Path]:
    """Every process's file next to ``path`` (from any number of processes: a run resumed with another)."""
    return sorted(path.parent.glob(f"{path.stem}.rank*-of-*{path.suffix}"))


def merge_shards(path: str | Path) -> int:
    """Append the conversations of the processes' files (``shard_files``) to ``path`` and delete those
    files; returns how many were appended. Order and deduplication are a one-process run's: by chunk,
    then index, a conversation equal to one before it dropped. Run by one process while the others wait."""
    path = Path(path)
    shards = shard_files(path)
    if not shards:
        return 0
    done, keys = _existing(path)
    found = sorted((r for shard in shards for r in _complete_records(shard)),
                   key=lambda r: (int(r["chunk"]), int(r["index"])))
    added = 0
    with path.open("a", encoding="utf-8") as f:
        for record in found:
            key = conversation_key(record)
            if int(record["index"]) in done or key in keys:
                continue
            done.add(int(record["index"]))
            keys.add(key)
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            added += 1
        f.flush()
        os.fsync(f.fileno())
    for shard in shards:  # only once their conversations are safely in ``path``
        shard.unlink()
    return added


def generate_selfstudy(model: nn.Module, tokenizer: Any, corpus_ids: Any, out: str | Path,
                       cfg: SelfStudyConfig = SelfStudyConfig(), *, generator: Any = None,
                       progress: bool = True, context_digest: str | None = None,
                       log: Callable[[str], None] | None = None,
                       shard: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """Write ``cfg.conversations`` self-study conversations about ``corpus_ids`` to the JSONL file ``out``
    (resuming it). ``model``: the patched frozen model (the teacher); ``generator``: who writes the
    turns (default: ``InProcessGenerator``). ``shard=(rank, size)``: this process writes every size-th
    group, to ``shard_path(out, rank, size)``; ``merge_shards(out)`` once all have finished. Returns
    counts (written, skipped as done, duplicates, empty) of this process's share."""
    cfg.check()
    corpus = torch.as_tensor(corpus_ids, dtype=torch.long).flatten()
    if corpus.numel() == 0:
        raise ValueError("the corpus is empty (no tokens)")
    rank, size = shard
    if not 0 <= rank < size:
        raise ValueError(f"shard {shard}: want (rank, size) with 0 <= rank < size")
    generator = generator or InProcessGenerator(model, tokenizer)
    main = Path(out)
    path = main if size == 1 else shard_path(main, rank, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    done, keys = _existing(main, path) if size > 1 else _existing(main)
    spans = chunk_spans(corpus.numel(), cfg.chunk_tokens)
    everything = plan(cfg, len(spans))
    # groups are fixed by the plan (not by what is left or by the processes), so a resumed run, or one
    # split over processes, samples what an uninterrupted one-process run would have: a group with any
    # conversation missing is generated again, only the missing written
    by_chunk: dict[int, list[tuple[int, int, str]]] = {}
    for item in everything:
        by_chunk.setdefault(item[1], []).append(item)
    mine: dict[int, list[list[tuple[int, int, str]]]] = {}
    number = 0
    for chunk, items in sorted(by_chunk.items()):
        for g in range(0, len(items), cfg.batch_size):
            if number % size == rank:
                mine.setdefault(chunk, []).append(items[g:g + cfg.batch_size])
            number += 1
    share = [i for groups in mine.values() for group in groups for i, _, _ in group]
    digest = context_digest or digest_ids(corpus)
    tok_digest = tokenizer_digest(tokenizer)
    counts = {"written": 0, "already": sum(i in done for i in share), "duplicates": 0, "empty": 0}
    bar = Progress(len(share), counts["already"], enabled=progress,
                   label="self-study" if size == 1 else f"self-study (process {rank + 1} of {size})")
    with path.open("a", encoding="utf-8") as f:
        for chunk, groups in sorted(mine.items()):
            groups = [group for group in groups if any(i not in done for i, _, _ in group)]
            if not groups:
                continue
            start, end = spans[chunk]
            context = prefill_context(model, corpus[start:end])  # once per chunk
            for group in groups:
                seed = cfg.seed * 1_000_003 + group[0][0]
                asks = [user_turn(tokenizer, SEED_PROMPTS[kind]) for _, _, kind in group]
                questions = generator.generate(context, asks, cfg.question_tokens, cfg.temperature, seed)
                texts = [tokenizer.decode(q, skip_special_tokens=True).strip() for q in questions]
                prompts = [user_turn(tokenizer, t) for t in texts]
                answers = generator.generate(context, prompts, cfg.answer_tokens, cfg.temperature, seed + 1)
                keep = [b for b, a in enumerate(answers) if a]
                tops = answer_topk(model, context, [prompts[b] for b in keep], [answers[b] for b in keep],
                                   cfg.top_k) if keep else []
                for b, (index, _, kind) in enumerate(group):
                    if index in done:
                        continue
                    if b not in keep:
                        counts["empty"] += 1
                        bar.update(note=" (an empty answer skipped)")
                        continue
                    top_ids, top_lp = tops[keep.index(b)]
                    record = {"index": index, "chunk": chunk, "kind": kind, "context": digest,
                              "tokenizer": tok_digest, "prompt": texts[b],
                              "response": tokenizer.decode(answers[b], skip_special_tokens=True),
                              "prompt_ids": prompts[b], "response_ids": answers[b], "topk_ids": top_ids,
                              "topk_logprobs": top_lp}
                    key = conversation_key(record)
                    if key in keys:
                        counts["duplicates"] += 1
                    else:
                        keys.add(key)
                        f.write(json.dumps(record, ensure_ascii=False) + "\n")
                        f.flush()
                        counts["written"] += 1
                    bar.update()
    if log is not None:
        log(f"self-study: {counts['written']} conversations written to {path} ({counts['already']} already "
            f"there, {counts['duplicates']} duplicates and {counts['empty']} empty answers skipped)")
    return counts
