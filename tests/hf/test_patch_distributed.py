"""DistributedDataParallel (and an FSDP2 smoke test) with 2 gloo processes on CPU: after one optimizer step
the prefix equals a single-process run over the whole batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
LR = 0.1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_and_batch():
    from tiny_models import batch, labels_for, tiny_model

    import prefixattn

    model = prefixattn.patch(tiny_model("llama"), num_prefix_tokens=4, backend="torch", init="random")
    model.train()
    ids, mask = batch(batch_size=4, padding="right")
    return model, ids, mask, labels_for(ids, mask)


def _loss(model, ids, mask, labels):
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def _worker(rank: int, port: int, mode: str, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model, ids, mask, labels = _model_and_batch()
        rows = slice(rank * 2, rank * 2 + 2)
        if mode == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard

            for layer in model.model.layers:
                fully_shard(layer)
            wrapped = fully_shard(model)
        opt = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=LR)
        _loss(wrapped, ids[rows], mask[rows], labels[rows]).backward()
        opt.step()
        kv = model.prefixattn_prefix.kv
        if mode == "fsdp":
            kv = kv.full_tensor()
        if rank == 0:
            torch.save(kv.detach().clone(), out_path)
    finally:
        # both ranks leave gloo together: a rank tearing down while its peer still has a pending
        # operation aborts the peer ("terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()


def _single_process_reference():
    torch.manual_seed(0)
    model, ids, mask, labels = _model_and_batch()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    # DDP averages the per-rank gradients: the reference loss is the mean of the two halves' losses
    loss = (_loss(model, ids[:2], mask[:2], labels[:2]) + _loss(model, ids[2:], mask[2:], labels[2:])) / 2
    loss.backward()
    opt.step()
    return model.prefixattn_prefix.kv.detach()


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_gloo_processes_match_a_single_process_step(tmp_path, mode):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if mode == "fsdp":
        try:
            from torch.distributed.fsdp import fully_shard  # noqa: F401
        except ImportError:
            pytest.skip("FSDP2 (fully_shard) is not available in this torch")
    out = str(tmp_path / "kv.pt")
    mp.spawn(_worker, args=(_free_port(), mode, out), nprocs=WORLD, join=True)
    got = torch.load(out, weights_only=True)
    expected = _single_process_reference()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    initial = _model_and_batch()[0].prefixattn_prefix.kv.detach()
    assert not torch.allclose(got, initial)  # the step did move the prefix
