"""Self-study data: the recorded top-k are the plain model's with the chunk in front, a resumed run
writes what an uninterrupted one writes, duplicates are not written twice, an OpenAI-compatible endpoint
can write the turns, and records that do not belong to the model, tokenizer or context are refused."""

from __future__ import annotations

import copy
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

import prefixattn
from prefixattn.cli.model import byte_tokenizer, tiny_llama_config
from prefixattn.distill.records import digest_ids, read_records, tokenizer_digest
from prefixattn.distill.selfstudy import (
    EndpointGenerator,
    SelfStudyConfig,
    chunk_spans,
    generate_selfstudy,
    merge_shards,
    shard_files,
)

pytestmark = pytest.mark.usefixtures("one_thread")
CFG = SelfStudyConfig(conversations=5, chunk_tokens=40, question_tokens=6, answer_tokens=8, batch_size=2, top_k=5)


@pytest.fixture(scope="module")
def setup():
    from transformers import AutoModelForCausalLM

    tok = byte_tokenizer()
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_llama_config(len(tok))).eval()
    model = prefixattn.patch(copy.deepcopy(base), num_prefix_tokens=4, backend="torch")
    corpus = tok("Ada Lovelace wrote the first program for the Analytical Engine in 1843. " * 2,
                 add_special_tokens=False)["input_ids"]
    return tok, base, model, corpus


def _lines(path):  # JSONL lines: a generated text may hold U+2028 and the like, where splitlines() splits
    return [line for line in path.read_text(encoding="utf-8").split("\n") if line]


def test_records_resume_and_dedup(setup, tmp_path):
    tok, base, model, corpus = setup
    out = tmp_path / "ss.jsonl"
    counts = generate_selfstudy(model, tok, corpus, out, CFG, progress=False)
    assert counts["written"] + counts["empty"] == 5
    records = read_records(out, vocab=len(tok), context=digest_ids(corpus), tokenizer=tokenizer_digest(tok))
    assert {r["kind"] for r in records} <= {"structuring", "summarization", "question", "use_case", "creative"}
    # the recorded top-k are the plain model's with the chunk in front of the conversation
    r = records[0]
    start, end = chunk_spans(len(corpus), 40)[r["chunk"]]  # chunks of equal size, at most 40 tokens
    assert end - start <= 40
    chunk = corpus[start:end]
    with torch.no_grad():
        logits = base(input_ids=torch.tensor([chunk + r["prompt_ids"] + r["response_ids"]])).logits[0]
    first = len(chunk) + len(r["prompt_ids"]) - 1
    want = logits[first:first + len(r["response_ids"])].log_softmax(-1).topk(5)
    assert torch.equal(torch.tensor(r["topk_ids"]), want.indices)
    torch.testing.assert_close(torch.tensor(r["topk_logprobs"]), want.values, atol=1e-4, rtol=0)
    # a run killed mid-line, resumed: the same file as the uninterrupted run
    whole = out.read_text()
    lines = _lines(out)
    out.write_text("\n".join(lines[:2]) + "\n" + lines[2][:17])
    again = generate_selfstudy(model, tok, corpus, out, CFG, progress=False)
    assert again["already"] == 2
    assert sorted(_lines(out)) == sorted(line for line in whole.split("\n") if line)
    # everything there: nothing written twice
    assert generate_selfstudy(model, tok, corpus, out, CFG, progress=False)["written"] == 0
    assert len(_lines(out)) == len(lines)


def test_split_over_processes_merges_into_the_one_process_file(setup, tmp_path):
    """Each process's share (every size-th group) in its own file, merged: the bytes one process writes,
    also when a process was killed mid-line and the run resumed with another number of processes."""
    tok, _, model, corpus = setup
    cfg = SelfStudyConfig(conversations=9, chunk_tokens=40, question_tokens=6, answer_tokens=8, batch_size=2, top_k=5)
    one = tmp_path / "one.jsonl"
    generate_selfstudy(model, tok, corpus, one, cfg, progress=False)
    split = tmp_path / "split" / "ss.jsonl"
    shares = [generate_selfstudy(model, tok, corpus, split, cfg, progress=False, shard=(r, 3)) for r in range(3)]
    files = shard_files(split)
    assert [f.name for f in files] == [f"ss.rank{r}-of-3.jsonl" for r in range(3)]
    assert not split.exists()  # nothing in the merged file before the merge
    # 4 chunks of 36 tokens, conversation i on chunk i % 4; the groups of 2 in order (chunk 0: 0,4 | 8;
    # chunk 1: 1,5; chunk 2: 2,6; chunk 3: 3,7) dealt round-robin over the 3 processes
    assert [{json.loads(x)["index"] for x in _lines(f)} for f in files] == [{0, 4, 2, 6}, {8, 3, 7}, {1, 5}]
    assert sum(c["written"] + c["empty"] for c in shares) == 9
    assert merge_shards(split) == len(_lines(one))
    assert split.read_bytes() == one.read_bytes() and not shard_files(split)
    assert merge_shards(split) == 0  # nothing left to merge
    # generated text holds any character: line and paragraph separators stay inside their record
    first = json.loads(_lines(one)[0])
    odd = {**first, "index": 9, "prompt": "a\u2028b\x85c\u2029d\x1ce", "prompt_ids": first["prompt_ids"] + [97]}
    (tmp_path / "split" / "ss.rank0-of-1.jsonl").write_text(json.dumps(odd, ensure_ascii=False) + "\n")
    assert merge_shards(split) == 1
    assert read_records(split, vocab=len(tok))[-1]["prompt"] == odd["prompt"]
    # killed: process 1 of 2 cut mid-line, process 0 never wrote; resumed by 2 processes, then by 1
    again = tmp_path / "again" / "ss.jsonl"
    generate_selfstudy(model, tok, corpus, again, cfg, progress=False, shard=(1, 2))
    cut = shard_files(again)[0]
    cut.write_text(cut.read_text()[:-9])
    assert generate_selfstudy(model, tok, corpus, again, cfg, progress=False, shard=(0, 3))["already"] == 0
    merge_shards(again)  # what a resumed run's process 0 does first, whatever the processes now
    generate_selfstudy(model, tok, corpus, again, cfg, progress=False)
    assert sorted(_lines(again)) == sorted(_lines(one))


class _Completions(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, doc):
        body = json.dumps(doc).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send({"data": [{"id": "tiny"}]})

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert request["model"] == "tiny" and all(isinstance(p, list) for p in request["prompt"])
        self._send({"choices": [{"index": i, "text": f"ok {i}", "finish_reason": "stop"}
                                for i in range(len(request["prompt"]))]})


def test_an_endpoint_writes_the_turns(setup, tmp_path):
    tok, _, model, corpus = setup
    server = HTTPServer(("127.0.0.1", 0), _Completions)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        gen = EndpointGenerator(f"http://127.0.0.1:{server.server_port}/v1", tok)
        out = tmp_path / "ep.jsonl"
        counts = generate_selfstudy(model, tok, corpus, out, CFG, generator=gen, progress=False)
    finally:
        server.shutdown()
    records = read_records(out, vocab=len(tok))
    assert counts["written"] == len(records) >= 1  # equal answers to equal questions are duplicates
    assert records[0]["response"] == "ok 0"  # + the end of sequence: the endpoint stopped
    assert records[0]["response_ids"][-1] == tok.eos_token_id
    assert len(records[0]["topk_ids"]) == len(records[0]["response_ids"])


def test_bad_records_are_refused(setup, tmp_path):
    tok, _, model, corpus = setup
    out = tmp_path / "ss.jsonl"
    generate_selfstudy(model, tok, corpus, out, SelfStudyConfig(conversations=1, chunk_tokens=40,
                                                                question_tokens=4, answer_tokens=4, top_k=3),
                       progress=False)
    good = json.loads(_lines(out)[0])

    def refused(change, match, **kw):
        bad = {**good, **change}
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=match):
            read_records(path, vocab=len(tok), **kw)

    refused({"tokenizer": "0123456789abcdef"}, "another tokenizer", tokenizer=tokenizer_digest(tok))
    refused({"response_ids": good["response_ids"] + [len(tok) + 5]}, "outside the model's vocabulary")
    refused({"topk_ids": good["topk_ids"][:-1]}, "does not match this conversation")
    refused({"topk_ids": [[len(tok)] * 3] * len(good["response_ids"])}, "top-k ids fall outside")
    refused({}, "made for another context", context="ffffffffffffffff")
    refused({"prompt_ids": []}, "non-empty list")
    with pytest.raises(ValueError, match="corpus is empty"):
        generate_selfstudy(model, tok, [], out, CFG, progress=False)
