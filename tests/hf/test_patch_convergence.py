"""Convergence: a tiny frozen model learns a small synthetic task through the prefix alone, with the
same loss curve as PEFT prefix tuning trained on the same batches from the same prefix."""

from __future__ import annotations

import pytest
import torch
from tiny_models import patched_twin, peft_twin, tiny_model

from prefixattn.tasks import SuccessorTask

STEPS = 30


def _train(model, task: SuccessorTask, steps: int = STEPS, batch_size: int = 8) -> torch.Tensor:
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for step in range(steps):
        batch = task.batch(step, batch_size=batch_size)
        loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses)


# the interpreter is slow (its cost grows with the kernels' grid, so with the batch): the kernels run a
# shorter curve on smaller batches (the parity tests cover them too)
@pytest.mark.parametrize("backend,steps,batch_size", [("torch", STEPS, 8), ("triton", 8, 2)])
def test_prefix_alone_learns_the_task_like_peft(backend, steps, batch_size):
    # next letter under a fixed permutation: the frozen model cannot know it, the prefix can learn it
    task = SuccessorTask(seed=0, seq_len=12, bos_token_id=1, first_token=3)
    peft_model = peft_twin(tiny_model("llama", initializer_range=0.15), num_virtual_tokens=16)
    ours = patched_twin(peft_model, backend=backend)
    peft_losses = _train(peft_model, task, steps, batch_size)
    our_losses = _train(ours, task, steps, batch_size)
    if steps == STEPS:
        assert our_losses[-5:].mean() < 0.5 * our_losses[:3].mean(), our_losses  # it learns
    else:
        assert our_losses[-1] < our_losses[0], our_losses
    rel = ((our_losses - peft_losses).abs() / peft_losses.abs()).max().item()
    assert rel < 1e-3, f"loss curves differ by up to {rel:.2e}\nours {our_losses}\npeft {peft_losses}"
