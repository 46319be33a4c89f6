"""medgrpo.nn.GRPOLoss is policy_loss with its options fixed at construction."""

from __future__ import annotations

import pytest
import torch

import medgrpo
from medgrpo.nn import GRPOLoss


def test_module_equals_functional():
    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(4, 10, generator=gen)
    old, ref = logp + 0.3 * torch.randn(4, 10, generator=gen), logp + 0.1 * torch.randn(4, 10, generator=gen)
    adv, mask = torch.randn(4, generator=gen), torch.rand(4, 10, generator=gen) > 0.2
    module = GRPOLoss(loss_type="grpo", epsilon_high=0.28, beta=0.04, dual_clip=3.0)
    got = module(logp, adv, mask, old_logp=old, ref_logp=ref)
    want = medgrpo.policy_loss(
        logp, adv, mask, old_logp=old, ref_logp=ref, loss_type="grpo", epsilon_high=0.28, beta=0.04, dual_clip=3.0
    )
    for a, b in zip(got, want):
        if a is not None:
            torch.testing.assert_close(a, b)
    assert "epsilon_high=0.28" in repr(module)


def test_module_defaults_are_medgrpo_paper_settings():
    config = GRPOLoss().config
    assert (config.loss_type, config.epsilon_low, config.epsilon_high, config.beta) == ("dapo", 0.2, 0.3, 0.0)


def test_module_rejects_bad_options_at_construction():
    with pytest.raises(ValueError, match="loss_type"):
        GRPOLoss(loss_type="reinforce")
