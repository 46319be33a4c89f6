"""group_advantages: kernels vs the reference, vs TRL's and verl's code, edge cases, bad input."""

from __future__ import annotations

import pytest
import torch

import medgrpo
from medgrpo.ops import reference
from medgrpo.ops.group_advantages import SCALE_CODES
from medgrpo.testing import peers
from medgrpo.testing.tolerance import assert_within_reference_error

OUTPUT_NAMES = ["advantages", "rewards", "group_mean", "group_std", "group_count", "summary"]


def make_rewards(num_groups: int, group_size: int, *, seed: int = 0, num_keys: int = 5):
    """Rewards with a NaN member, an all-equal group and a group at a key's median."""
    gen = torch.Generator().manual_seed(seed)
    n = num_groups * group_size
    rewards = torch.randn(n, generator=gen, dtype=torch.float64)
    if n > 3:
        rewards[min(3, n - 1)] = float("nan")
    if num_groups > 2:
        rewards[group_size : 2 * group_size] = 0.25
    keys = torch.randint(0, num_keys, (n,), generator=gen)
    stats = torch.sort(torch.randn(num_keys, 3, generator=gen, dtype=torch.float64), dim=1).values
    stats[1] = torch.tensor([0.25, 0.25, 0.25])  # degenerate IQR
    return rewards, keys, stats


def reference_outputs(rewards, group_size, group_ids, keys, stats, scale):
    out = reference.group_advantages(
        rewards, group_size=group_size, group_ids=group_ids, keys=keys, stats=stats, scale=scale
    )
    return [
        out.advantages,
        out.rewards,
        out.group_mean,
        out.group_std,
        out.group_count,
        torch.stack([out.zero_std_fraction, out.nan_fraction]),
    ]


def backend_outputs(backend, rewards, group_size, group_ids, keys, stats, scale, device):
    move = lambda t: None if t is None else t.to(device)
    args = (move(rewards), move(group_ids), group_size or 0, move(keys), move(stats), 3.0, SCALE_CODES[scale], 1e-4)
    if backend == "triton":
        from medgrpo.kernels.group_advantages import group_advantages as launch

        return [t.cpu() for t in launch(*args, reference.ZERO_STD_ATOL)]
    return [t.cpu() for t in torch.ops.medgrpo.group_advantages(*args)]


def _device(backend, request) -> str:
    if backend == "triton":
        return request.getfixturevalue("triton_device")
    request.getfixturevalue("native_cpu")
    return "cpu"


@pytest.mark.parametrize("backend", ["triton", "cpp"])
@pytest.mark.parametrize("scale", reference.ADVANTAGE_SCALES)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("grouping", ["contiguous", "ids"])
@pytest.mark.parametrize("num_groups,group_size", [(1, 1), (7, 1), (1, 8), (3, 2), (97, 8), (13, 7), (5, 16), (129, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_kernels_match_reference(backend, scale, normalize, grouping, num_groups, group_size, dtype, request):
    device = _device(backend, request)
    rewards, keys, stats = make_rewards(num_groups, group_size, seed=num_groups + group_size)
    rewards = rewards.to(dtype)
    if not normalize:
        keys = stats = None
    group_ids, size = None, group_size
    if grouping == "ids":
        gen = torch.Generator().manual_seed(1)
        group_ids = torch.randperm(rewards.shape[0], generator=gen)[torch.arange(rewards.shape[0]) // group_size]
        size = None
    exact = reference_outputs(rewards.double(), size, group_ids, keys, stats, scale)
    same = reference_outputs(rewards, size, group_ids, keys, stats, scale)  # fp32 math on the same inputs
    actual = backend_outputs(backend, rewards, size, group_ids, keys, stats, scale, device)
    for name, a, s, e in zip(OUTPUT_NAMES, actual, same, exact):
        assert_within_reference_error(a, s, e, name=name, atol=2e-6)


def test_matches_trl_eager_advantages():
    rewards = torch.randn(64 * 8, dtype=torch.float64)
    rewards[8:16] = 1.0  # zero-std group: TRL gives 0 / (0 + 1e-4) = 0
    for scale in reference.ADVANTAGE_SCALES:
        ours = medgrpo.group_advantages(rewards, group_size=8, scale=scale)
        torch.testing.assert_close(ours, peers.trl_group_advantages(rewards, 8, scale))


def test_matches_verl_loop_with_arbitrary_ids():
    gen = torch.Generator().manual_seed(3)
    rewards = torch.randn(40, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, 6, (40,), generator=gen)  # uneven groups, every group has > 1 member
    assert torch.bincount(ids).min() > 1
    ours = medgrpo.group_advantages(rewards, group_ids=ids)
    verl = peers.verl_group_advantages(rewards, ids.tolist(), epsilon=1e-4)
    torch.testing.assert_close(ours, verl)


@pytest.mark.parametrize("device_kind", ["public", "triton"])
def test_degenerate_groups_are_finite_and_counted(device_kind, request):
    rewards = torch.tensor(
        [
            1.0,
            1.0,
            1.0,
            1.0,  # equal rewards
            float("nan"),
            2.0,
            float("nan"),
            float("nan"),  # one scorable member
            float("nan"),
        ]
        * 1
        + [float("nan")] * 3  # all NaN
        + [0.0, 1.0, 2.0, 3.0]
    )  # a normal group
    if device_kind == "public":
        out = medgrpo.group_advantages_with_stats(rewards, group_size=4)
        outputs = [
            out.advantages,
            out.rewards,
            out.group_mean,
            out.group_std,
            out.group_count,
            torch.stack([out.zero_std_fraction, out.nan_fraction]),
        ]
    else:
        outputs = backend_outputs(
            "triton", rewards, 4, None, None, None, "group", request.getfixturevalue("triton_device")
        )
    advantages, _, mean, std, count, summary = outputs
    assert torch.isfinite(advantages).all()
    assert torch.all(advantages[:12] == 0)
    assert count.tolist() == [4, 1, 0, 4]
    assert std[:3].tolist() == [0.0, 0.0, 0.0]
    torch.testing.assert_close(summary, torch.tensor([2 / 3, 7 / 16]))  # 2 of 3 non-empty groups: no signal; 7 NaN
    torch.testing.assert_close(mean, torch.tensor([1.0, 2.0, 0.0, 1.5]))


def test_normalize_then_advantages_in_one_call_equals_two_calls():
    rewards, keys, stats = make_rewards(16, 8, seed=2)
    fused = medgrpo.group_advantages(rewards, group_size=8, keys=keys, stats=stats, k=2.5)
    normalized = medgrpo.normalize_rewards(rewards, keys, stats, k=2.5)
    torch.testing.assert_close(fused, medgrpo.group_advantages(normalized, group_size=8))


def test_torch_compile_fullgraph():
    rewards, keys, stats = make_rewards(8, 8, seed=4)

    def advantages(r, k, s):
        return medgrpo.group_advantages_with_stats(r, group_size=8, keys=k, stats=s)

    compiled = torch.compile(advantages, fullgraph=True, backend="aot_eager")
    for got, want in zip(
        compiled(rewards.float(), keys, stats.float()), advantages(rewards.float(), keys, stats.float())
    ):
        torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize(
    "kwargs,error,words",
    [
        (dict(group_size=3), ValueError, "does not divide"),
        (dict(), ValueError, "exactly one"),
        (dict(group_size=4, group_ids=torch.zeros(8, dtype=torch.long)), ValueError, "exactly one"),
        (dict(group_size=0), ValueError, "group_size"),
        (dict(group_ids=torch.zeros(7, dtype=torch.long)), ValueError, "group_ids"),
        (dict(group_ids=torch.full((8,), 8)), ValueError, "group_ids"),
        (dict(group_ids=torch.zeros(8)), TypeError, "group_ids"),
        (dict(group_size=4, keys=torch.zeros(8, dtype=torch.long)), ValueError, "together"),
        (dict(group_size=4, keys=torch.full((8,), 5), stats=torch.zeros(5, 3)), ValueError, "keys"),
        (dict(group_size=4, keys=torch.zeros(8, dtype=torch.long), stats=torch.zeros(5, 2)), ValueError, "stats"),
        (
            dict(group_size=4, keys=torch.zeros(8, dtype=torch.long), stats=torch.tensor([[1.0, 0.0, 2.0]])),
            ValueError,
            "ordered",
        ),
        (dict(group_size=4, scale="global"), ValueError, "scale"),
        (dict(group_size=4, eps=-1.0), ValueError, "eps"),
    ],
)
def test_bad_input_names_the_argument(kwargs, error, words):
    with pytest.raises(error, match=words):
        medgrpo.group_advantages(torch.randn(8), **kwargs)


def test_rewards_must_be_floating_1d():
    with pytest.raises(TypeError, match="rewards"):
        medgrpo.group_advantages(torch.arange(8), group_size=4)
    with pytest.raises(ValueError, match="rewards"):
        medgrpo.group_advantages(torch.randn(2, 4), group_size=4)


@pytest.mark.gpu
def test_public_op_on_cuda_matches_reference():
    rewards, keys, stats = make_rewards(1024, 8, seed=5, num_keys=16)
    for scale in reference.ADVANTAGE_SCALES:
        got = medgrpo.group_advantages(
            rewards.float().cuda(), group_size=8, keys=keys.cuda(), stats=stats.float().cuda(), scale=scale
        )
        want = reference.group_advantages(rewards, group_size=8, keys=keys, stats=stats, scale=scale).advantages
        torch.testing.assert_close(got.cpu().double(), want, atol=1e-5, rtol=1e-5)
