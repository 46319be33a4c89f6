"""The fused head under FSDP2 (gloo, 2 CPU ranks): sharded lm-head weight, same loss and gradients."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import medgrpo

WORLD_SIZE = 2
VOCAB, HIDDEN = 37, 16


class TinyPolicyHead(torch.nn.Module):
    """A stand-in for the trainer's model: a projection and an lm-head, loss computed in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(HIDDEN, HIDDEN)
        self.lm_head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, hidden, targets, mask, advantages, old_logp):
        # Inside forward FSDP2 has unsharded the weight: the op sees a plain tensor.
        return medgrpo.fused_linear_policy_loss(
            self.proj(hidden), self.lm_head.weight, targets, mask, advantages, old_logp=old_logp, epsilon_high=0.3
        ).loss


def make_data(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(4, 6, HIDDEN, generator=gen)
    targets = torch.randint(0, VOCAB, (4, 6), generator=gen)
    mask = torch.rand(4, 6, generator=gen) > 0.25
    return hidden, targets, mask, torch.randn(4, generator=gen), -3.0 + 0.2 * torch.randn(4, 6, generator=gen)


def single_process_gradients():
    torch.manual_seed(0)
    model = TinyPolicyHead()
    model(*make_data()).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def worker(rank: int, port: int, expected: dict, results) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.manual_seed(0)
        model = TinyPolicyHead()
        fully_shard(model)
        model(*make_data()).backward()  # every rank holds the same batch: averaged grads = one-process grads
        errors = {
            name: float((p.grad.full_tensor() - expected[name]).abs().max()) for name, p in model.named_parameters()
        }
        # Outside forward the weight is a DTensor shard: the op gathers it, with autograd.
        weight = model.lm_head.weight
        assert isinstance(weight, DTensor)
        hidden, targets, mask, advantages, old = make_data(1)
        loss = medgrpo.fused_linear_policy_loss(hidden, weight, targets, mask, advantages, old_logp=old).loss
        errors["outside_forward_loss_finite"] = 0.0 if torch.isfinite(loss).item() else 1.0
        results[rank] = errors
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_fsdp2_sharded_lm_head_matches_single_process():
    expected = single_process_gradients()
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(worker, args=(free_port(), expected, results), nprocs=WORLD_SIZE, join=True)
    for rank in range(WORLD_SIZE):
        for name, error in results[rank].items():
            assert error < 1e-5, f"rank {rank}: {name} differs by {error}"
