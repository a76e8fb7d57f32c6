"""What a user of the built wheel does first, run from outside the checkout (scripts/test_wheel.sh):
the op against a float64 computation written out here, the Triton kernels shipped inside the wheel
(in the interpreter on a CPU), patch + one training step + generate on a tiny Llama, unpatch.
Imports only the installed package: nothing from the checkout's tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels on a CPU; before triton is imported

import torch  # noqa: E402
import transformers  # noqa: E402

import prefixattn  # noqa: E402

checkout = Path(sys.argv[1]).resolve()
where = Path(prefixattn.__file__).resolve()
assert checkout not in where.parents, f"prefixattn imported from the checkout ({where}), not the wheel"
print(f"prefixattn {prefixattn.__version__} from {where.parent}; transformers {transformers.__version__}")


def float64_prefix_attention(q, k, v, pk, pv):
    """softmax(q [pk; k]^T / sqrt(D) + causal mask over the sequence part) [pv; v], GQA by repeat."""
    q, k, v, pk, pv = (t.double() for t in (q, k, v, pk, pv))
    B, Hq, S, D = q.shape
    g = Hq // k.shape[1]
    keys = torch.cat([pk.expand(B, -1, -1, -1), k], 2).repeat_interleave(g, 1)
    vals = torch.cat([pv.expand(B, -1, -1, -1), v], 2).repeat_interleave(g, 1)
    P = pk.shape[-2]
    s = q @ keys.transpose(-1, -2) / D**0.5
    hidden = torch.ones(S, S, dtype=torch.bool).triu(1)
    s[..., P:] = s[..., P:].masked_fill(hidden, float("-inf"))
    return torch.softmax(s, -1) @ vals


g = torch.Generator().manual_seed(0)
B, Hq, Hkv, S, P, D = 2, 4, 2, 37, 5, 80  # odd sizes on purpose
q = torch.randn(B, Hq, S, D, generator=g)
k, v = (torch.randn(B, Hkv, S, D, generator=g) for _ in range(2))
pk, pv = (torch.randn(Hkv, P, D, generator=g) for _ in range(2))
want = float64_prefix_attention(q, k, v, pk, pv)
for backend in ("torch", "triton"):
    got = prefixattn.prefix_attention(q, k, v, pk, pv, backend=backend)
    err = (got.double() - want).abs().max().item()
    assert err < 1e-4, f"{backend}: max error {err}"
    print(f"op ({backend} backend): max error {err:.1e} against float64")

config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(config).eval()
ids = torch.randint(3, 97, (2, 12), generator=g)
before = model(ids).logits.detach()
frozen = {n: p.detach().clone() for n, p in model.named_parameters()}

model = prefixattn.patch(model, num_prefix_tokens=8)
trainable = [p for p in model.parameters() if p.requires_grad]
assert trainable and all(p.requires_grad is False for n, p in model.named_parameters() if n in frozen)
optimizer = torch.optim.AdamW(trainable, lr=1e-2)
model.train()
loss = model(ids, labels=ids).loss
loss.backward()
optimizer.step()
assert torch.isfinite(loss) and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen), "base changed"
n_trainable = sum(p.numel() for p in trainable)
print(f"patch + a training step: loss {loss.item():.3f}, {n_trainable} trainable values")

model.eval()
with torch.no_grad():
    out = model.generate(ids[:1, :6], max_new_tokens=5, do_sample=False)
    # greedy decoding equals the argmax of full forwards over the growing sequence
    seq = ids[:1, :6]
    for _ in range(5):
        seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], 1)
assert torch.equal(out, seq), (out, seq)
print(f"generate: {out[0, 6:].tolist()} (equal to step-by-step full forwards)")

model = prefixattn.unpatch(model)
assert torch.equal(model(ids).logits, before), "unpatch did not give the base model back"
print("unpatch: the base model's logits are back, bit for bit")
