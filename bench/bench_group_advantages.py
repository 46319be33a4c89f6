"""Reward normalization + group-relative advantages: medgrpo vs the reference and the peers' ways.

N rewards in groups of G = 8 over 16 (data_source, qa_type) keys. The data is a few KiB,
so the floor here is launch / dispatch latency, not bandwidth: no copy_floor provider.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import medgrpo
from medgrpo.ops import reference
from medgrpo.testing import peers

GROUP_SIZE = 8
NUM_KEYS = 16
SIZES = [512, 8192]  # 64 and 1024 prompts x G=8
PROVIDERS = ["medgrpo", "reference", "reference_compiled", "trl", "verl"]
VERL_MAX_N = 4096  # verl's per-sample Python loop is too slow beyond this

_compiled_reference = torch.compile(reference.group_advantages, dynamic=False)


def make_inputs(n: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uniform rewards, keys uniform in [0, 16), and (16, 3) sorted (p25, p50, p75) rows."""
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.rand(n, generator=gen)
    keys = torch.randint(0, NUM_KEYS, (n,), generator=gen)
    stats = torch.rand(NUM_KEYS, 3, generator=gen).sort(dim=-1).values
    return rewards.to(device), keys.to(device), stats.to(device)


def provider_fn(provider: str, rewards: torch.Tensor, keys: torch.Tensor, stats: torch.Tensor) -> Callable[[], object]:
    """The call each provider makes to get advantages from raw rewards."""
    if provider == "medgrpo":
        return lambda: medgrpo.group_advantages(rewards, group_size=GROUP_SIZE, keys=keys, stats=stats)
    if provider == "reference":
        return lambda: reference.group_advantages(rewards, group_size=GROUP_SIZE, keys=keys, stats=stats)
    if provider == "reference_compiled":
        return lambda: _compiled_reference(rewards, group_size=GROUP_SIZE, keys=keys, stats=stats)
    if provider == "trl":
        return lambda: peers.trl_group_advantages(reference.normalize_rewards(rewards, keys, stats), GROUP_SIZE)
    index = (torch.arange(rewards.shape[0]) // GROUP_SIZE).tolist()  # verl's uid list, built outside the timer
    return lambda: peers.verl_group_advantages(reference.normalize_rewards(rewards, keys, stats), index, epsilon=1e-4)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"N{n}")
def bench_group_advantages(measure, device: str, n: int, provider: str) -> None:
    if provider == "verl" and n > VERL_MAX_N:
        pytest.skip(f"verl's Python loop is only timed for N <= {VERL_MAX_N}")
    rewards, keys, stats = make_inputs(n, device)
    params = {
        "op": "group_advantages",
        "n": n,
        "group_size": GROUP_SIZE,
        "num_keys": NUM_KEYS,
        "dtype": "float32",
        "device": device,
    }
    measure(
        provider_fn(provider, rewards, keys, stats),
        group=f"group_advantages N={n} G={GROUP_SIZE} K={NUM_KEYS}",
        provider=provider,
        params=params,
    )
