"""policy_loss has TRL's and Liger-Kernel's semantics: same loss, gradients and clip metric."""

from __future__ import annotations

import itertools

import pytest
import torch

import medgrpo
from medgrpo.testing import peers

LIGER_LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]


def lm_head_inputs(batch=3, length=11, hidden=16, vocab=29, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    hidden_states = torch.randn(batch, length, hidden, generator=gen, dtype=dtype)
    weight = torch.randn(vocab, hidden, generator=gen, dtype=dtype) / hidden**0.5
    targets = torch.randint(0, vocab, (batch, length), generator=gen)
    mask = torch.rand(batch, length, generator=gen) > 0.2
    mask[-1, 3:] = False
    advantages = torch.randn(batch, generator=gen, dtype=dtype)
    return hidden_states, weight, targets, mask, advantages, gen


def token_logp(hidden_states, weight, targets, temperature):
    logits = hidden_states @ weight.t() / temperature
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize(
    "loss_type,importance_sampling,beta", list(itertools.product(LIGER_LOSS_TYPES, ["token", "sequence"], [0.0, 0.04]))
)
def test_matches_liger_fused_linear_grpo_loss(loss_type, importance_sampling, beta):
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    temperature = 0.7
    hidden_states, weight, targets, mask, advantages, gen = lm_head_inputs(dtype=torch.float32)
    with torch.no_grad():
        current = token_logp(hidden_states, weight, targets, temperature)
        old = current + 0.4 * torch.randn(current.shape, generator=gen)
        ref = current + 0.2 * torch.randn(current.shape, generator=gen)

    ours_h, ours_w = hidden_states.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logp = token_logp(ours_h, ours_w, targets, temperature)
    ours = medgrpo.policy_loss(
        logp,
        advantages,
        mask,
        old_logp=old,
        ref_logp=ref if beta else None,
        loss_type=loss_type,
        epsilon_low=0.2,
        epsilon_high=0.3,
        beta=beta,
        importance_sampling=importance_sampling,
        max_completion_length=13,
    )
    ours.loss.backward()

    liger_h, liger_w = hidden_states.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    module = liger.LigerFusedLinearGRPOLoss(
        beta=beta,
        compiled=False,
        use_ref_model=beta != 0.0,
        epsilon_low=0.2,
        epsilon_high=0.3,
        loss_type=loss_type,
        max_completion_length=13,
        importance_sampling_level=importance_sampling,
        temperature=temperature,
    )
    liger_loss, liger_metrics = module(
        liger_h, liger_w, targets, mask, advantages, ref_per_token_logps=ref if beta else None, old_per_token_logps=old
    )
    liger_loss.backward()

    torch.testing.assert_close(ours.loss, liger_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_h.grad, liger_h.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours_w.grad, liger_w.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours.clip_fraction, liger_metrics[-1], rtol=1e-5, atol=1e-6)
    if beta:
        torch.testing.assert_close(ours.kl, liger_metrics[0], rtol=1e-5, atol=1e-6)


TRL_GRID = list(
    itertools.product(LIGER_LOSS_TYPES, ["token", "sequence"], ["k1", "k2", "k3"], [None, 3.0], [False, True])
)


@pytest.mark.parametrize("loss_type,importance_sampling,kl_estimator,dual_clip,per_token_advantages", TRL_GRID)
def test_matches_trl_style_computation(loss_type, importance_sampling, kl_estimator, dual_clip, per_token_advantages):
    gen = torch.Generator().manual_seed(1)
    logp = -torch.rand(4, 9, generator=gen, dtype=torch.float64) * 2
    old = logp + 0.8 * torch.randn(4, 9, generator=gen, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(4, 9, generator=gen, dtype=torch.float64)
    mask = (torch.rand(4, 9, generator=gen) > 0.3).to(torch.int64)  # TRL's completion_mask is int
    mask[2] = 0
    shape = (4, 9) if per_token_advantages else (4,)
    advantages = torch.randn(shape, generator=gen, dtype=torch.float64)
    options = dict(
        loss_type=loss_type,
        epsilon_low=0.2,
        epsilon_high=0.3,
        beta=0.04,
        importance_sampling=importance_sampling,
        max_completion_length=12,
        kl_estimator=kl_estimator,
    )

    ours_logp = logp.clone().requires_grad_(True)
    ours = medgrpo.policy_loss(ours_logp, advantages, mask, old_logp=old, ref_logp=ref, dual_clip=dual_clip, **options)
    ours.loss.backward()
    trl_logp = logp.clone().requires_grad_(True)
    trl = peers.trl_grpo_loss(
        trl_logp,
        advantages,
        mask,
        old_per_token_logps=old,
        ref_per_token_logps=ref,
        loss_type=loss_type,
        epsilon_low=0.2,
        epsilon_high=0.3,
        beta=0.04,
        importance_sampling_level=importance_sampling,
        max_completion_length=12,
        kl_estimator=kl_estimator,
        clip_ratio_c=dual_clip,
    )
    trl.backward()
    torch.testing.assert_close(ours.loss, trl)
    torch.testing.assert_close(ours_logp.grad, trl_logp.grad)


def test_on_policy_default_equals_trl_with_detached_old():
    gen = torch.Generator().manual_seed(2)
    logp = -torch.rand(3, 7, generator=gen, dtype=torch.float64)
    mask, advantages = torch.ones(3, 7, dtype=torch.bool), torch.randn(3, generator=gen, dtype=torch.float64)
    ours_logp, trl_logp = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    medgrpo.policy_loss(ours_logp, advantages, mask, loss_type="grpo").loss.backward()
    peers.trl_grpo_loss(trl_logp, advantages, mask.float(), loss_type="grpo").backward()
    torch.testing.assert_close(ours_logp.grad, trl_logp.grad)
