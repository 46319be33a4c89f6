"""The fused head under FSDP2 (gloo, 2 CPU ranks): sharded lm-head weight, same loss and gradients."""

from __future__ import annotations

import pytest
import torch

import medgrpo
from medgrpo.testing.distributed import GLOO, run_gloo

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


def worker(rank: int, expected: dict) -> dict[str, float]:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    model = TinyPolicyHead()
    fully_shard(model)
    model(*make_data()).backward()  # every rank holds the same batch: averaged grads = one-process grads
    errors = {name: float((p.grad.full_tensor() - expected[name]).abs().max()) for name, p in model.named_parameters()}
    # Outside forward the weight is a DTensor shard: the op gathers it, with autograd.
    weight = model.lm_head.weight
    assert isinstance(weight, DTensor)
    hidden, targets, mask, advantages, old = make_data(1)
    loss = medgrpo.fused_linear_policy_loss(hidden, weight, targets, mask, advantages, old_logp=old).loss
    errors["outside_forward_loss_finite"] = 0.0 if torch.isfinite(loss).item() else 1.0
    return errors


@pytest.mark.slow
@pytest.mark.skipif(not GLOO, reason="needs torch.distributed gloo")
def test_fsdp2_sharded_lm_head_matches_single_process():
    results = run_gloo(worker, single_process_gradients(), world_size=WORLD_SIZE)
    for rank in range(WORLD_SIZE):
        for name, error in results[rank].items():
            assert error < 1e-5, f"rank {rank}: {name} differs by {error}"
