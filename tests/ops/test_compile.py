"""torch.compile(fullgraph=True) with the default (Inductor) backend through all the ops."""

from __future__ import annotations

import pytest
import torch

import medgrpo


def grpo_step(logp, mask, old_logp, rewards, keys, stats):
    advantages = medgrpo.group_advantages(rewards, group_size=4, keys=keys, stats=stats)
    out = medgrpo.policy_loss(logp, advantages, mask, old_logp=old_logp, epsilon_high=0.3)
    return out.loss * 2.0, out.clip_fraction


@pytest.mark.slow
def test_inductor_fullgraph_matches_eager_with_gradients():
    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(8, 16, generator=gen)
    args = (
        torch.rand(8, 16, generator=gen) > 0.2,
        logp + 0.3 * torch.randn(8, 16, generator=gen),
        torch.rand(8, generator=gen),
        torch.randint(0, 2, (8,), generator=gen),
        torch.tensor([[0.2, 0.5, 0.8], [0.1, 0.1, 0.1]]),
    )
    compiled = torch.compile(grpo_step, fullgraph=True)
    results = []
    for fn in (grpo_step, compiled):
        x = logp.clone().requires_grad_(True)
        loss, clip_fraction = fn(x, *args)
        loss.backward()
        results.append((loss.detach(), clip_fraction, x.grad))
    for eager, graph in zip(*results):
        torch.testing.assert_close(graph, eager)
