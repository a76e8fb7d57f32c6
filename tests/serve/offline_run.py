"""Run by ``test_serve_offline.py`` with the vLLM environment's Python: ``vllm.LLM`` with the prefix connector
(``prefixattn.serve.offline``), good requests and requests built wrong on purpose (past the helper's
checks), written as JSON for the test (which runs in the main environment) to compare.

    python offline_run.py FIXTURE_ROOT RUN_DIR OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(fixture_root: str, run_dir: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams

    from prefixattn.serve.engine_requests import prefix_params
    from prefixattn.serve.offline import OfflinePrefixes

    root = Path(fixture_root)
    prefixes = OfflinePrefixes.prepare(str(root / "model"), {"peft37": str(root / "peft37"),
                                                             "bank8": str(root / "bank8.safetensors")}, run_dir)
    llm = LLM(str(root / "model"), kv_transfer_config=prefixes.kv_transfer_config(), enforce_eager=True,
              dtype="float32", max_model_len=256, block_size=32, kv_cache_memory_bytes=16 * 32 * 1024,
              max_num_seqs=8)
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompt = [7, 70, 170, 17, 77, 177, 27]
    names = [None, "peft37", "bank8/1"]

    def good() -> dict:
        outs = llm.generate([prefixes.prompt(n, prompt) for n in names],
                            [prefixes.sampling_params(n, greedy) for n in names], use_tqdm=False)
        return {str(n): list(o.outputs[0].token_ids) for n, o in zip(names, outs, strict=True)}

    entry = prefixes.table.entries["peft37"]
    placeholders = [prefixes.table.placeholder_token_id] * entry.num_tokens
    params = {"kv_transfer_params": prefix_params("peft37", entry)}
    named = SamplingParams(max_tokens=4, temperature=0, extra_args=params)
    wrong = {
        "unknown name": ({"prompt_token_ids": placeholders + prompt, "cache_salt": entry.salt},
                         SamplingParams(max_tokens=4, extra_args={"kv_transfer_params": {
                             "prefixattn": {"name": "nope", "digest": "x"}}})),
        "no placeholders": ({"prompt_token_ids": prompt, "cache_salt": entry.salt}, named),
        "wrong salt": ({"prompt_token_ids": placeholders + prompt}, named),
        "prompt logprobs": ({"prompt_token_ids": placeholders + prompt, "cache_salt": entry.salt},
                            SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=1, extra_args=params)),
        "reserved salt on the base": ({"prompt_token_ids": prompt, "cache_salt": entry.salt},
                                      SamplingParams(max_tokens=4)),
    }
    results: dict = {"before": good(), "wrong": {}}
    for what, (p, params) in wrong.items():
        try:
            out = llm.generate([p], [params], use_tqdm=False)[0]
            results["wrong"][what] = {"finish_reason": out.outputs[0].finish_reason,
                                      "token_ids": list(out.outputs[0].token_ids)}
        except Exception as e:  # what vLLM raises for a request that finished with an error
            results["wrong"][what] = {"error": f"{type(e).__name__}: {e}"}
    results["after"] = good()
    Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:4])
