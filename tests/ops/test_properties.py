"""Properties that hold for any input (hypothesis): finiteness, zero-mean groups, bounds."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import medgrpo

finite_or_nan = st.one_of(st.floats(-1e6, 1e6, allow_nan=False, width=32), st.just(float("nan")))


@settings(max_examples=150, deadline=None)
@given(
    group_size=st.integers(1, 9),
    num_groups=st.integers(1, 6),
    data=st.data(),
    scale=st.sampled_from(["group", "batch", "none"]),
)
def test_group_advantages_are_finite_and_centered(group_size, num_groups, data, scale):
    values = data.draw(st.lists(finite_or_nan, min_size=group_size * num_groups, max_size=group_size * num_groups))
    rewards = torch.tensor(values, dtype=torch.float64)
    out = medgrpo.group_advantages_with_stats(rewards, group_size=group_size, scale=scale)
    assert torch.isfinite(out.advantages).all()
    assert torch.all(out.advantages[torch.isnan(rewards)] == 0)
    per_group = out.advantages.view(num_groups, group_size)
    # Each group's advantages sum to zero: its scorable members are centered on their mean.
    assert torch.all(per_group.sum(1).abs() <= 1e-9 * (1 + per_group.abs().sum(1)))
    assert 0.0 <= float(out.zero_std_fraction) <= 1.0


@settings(max_examples=150, deadline=None)
@given(data=st.data(), k=st.floats(0.1, 10.0))
def test_normalized_rewards_lie_in_unit_interval(data, k):
    n = data.draw(st.integers(1, 20))
    rewards = torch.tensor(data.draw(st.lists(finite_or_nan, min_size=n, max_size=n)), dtype=torch.float64)
    quantiles = sorted(data.draw(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=3, max_size=3)))
    out = medgrpo.normalize_rewards(rewards, torch.zeros(n, dtype=torch.long), torch.tensor([quantiles]), k=k)
    assert torch.equal(torch.isnan(out), torch.isnan(rewards))
    valid = out[~torch.isnan(out)]
    assert torch.all((valid >= 0) & (valid <= 1))


@settings(max_examples=100, deadline=None)
@given(
    batch=st.integers(1, 5),
    length=st.integers(1, 12),
    seed=st.integers(0, 2**16),
    loss_type=st.sampled_from(["grpo", "bnpo", "dr_grpo", "dapo"]),
    importance_sampling=st.sampled_from(["token", "sequence"]),
    scale=st.floats(0.0, 60.0),
)
def test_policy_loss_is_finite_and_bounded_by_clip(batch, length, seed, loss_type, importance_sampling, scale):
    gen = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(batch, length, generator=gen, dtype=torch.float64)).requires_grad_(True)
    old = logp.detach() + scale * torch.randn(batch, length, generator=gen, dtype=torch.float64)
    mask = torch.rand(batch, length, generator=gen) > 0.3
    advantages = torch.randn(batch, generator=gen, dtype=torch.float64)
    out = medgrpo.policy_loss(
        logp,
        advantages,
        mask,
        old_logp=old,
        loss_type=loss_type,
        epsilon_high=0.3,
        importance_sampling=importance_sampling,
        max_completion_length=length,
        dual_clip=3.0,
    )
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(logp.grad).all()
    assert torch.all(logp.grad[~mask] == 0)
    # With dual clip every token's loss lies in [-(1 + eps_high)|A|, 3|A|]; weights sum to <= 1.
    assert float(out.loss.detach()) <= 3.0 * float(advantages.abs().max()) + 1e-9
