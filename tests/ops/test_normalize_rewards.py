"""normalize_rewards: the paper's formula, kernels vs reference, degenerate and bad input."""

from __future__ import annotations

import math

import pytest
import torch

import medgrpo
from medgrpo.ops import reference
from medgrpo.testing.tolerance import assert_within_reference_error


def test_paper_formula_by_hand():
    stats = torch.tensor([[0.2, 0.5, 0.9], [10.0, 20.0, 40.0]])
    rewards = torch.tensor([0.5, 0.9, 0.2, 20.0, 0.0, 100.0])
    keys = torch.tensor([0, 0, 0, 1, 1, 1])
    got = medgrpo.normalize_rewards(rewards, keys, stats, k=3.0)

    def sigmoid(z):
        return 1.0 / (1.0 + math.exp(-z))

    want = [0.5, sigmoid(3 * 0.4 / 0.7), sigmoid(3 * -0.3 / 0.7), 0.5, sigmoid(3 * -20 / 30), sigmoid(3 * 80 / 30)]
    torch.testing.assert_close(got, torch.tensor(want))


def test_zero_iqr_is_a_finite_step_and_nan_stays_nan():
    stats = torch.tensor([[1.0, 1.0, 1.0]])
    rewards = torch.tensor([0.0, 1.0, 2.0, float("nan"), 1.0 + 1e-6])
    got = medgrpo.normalize_rewards(rewards, torch.zeros(5, dtype=torch.long), stats)
    assert got[:3].tolist() == [0.0, 0.5, 1.0] and math.isnan(got[3]) and got[4] == 1.0


def _backend(backend, request):
    if backend == "triton":
        device = request.getfixturevalue("triton_device")
        from medgrpo.kernels.normalize_rewards import normalize_rewards as launch

        return lambda r, key, s: launch(r.to(device), key.to(device), s.to(device), 3.0).cpu()
    request.getfixturevalue("native_cpu")
    return lambda r, key, s: torch.ops.medgrpo.normalize_rewards(r, key, s, 3.0)


@pytest.mark.parametrize("backend", ["triton", "cpp"])
@pytest.mark.parametrize("n", [1, 7, 97, 1025, 4099])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_kernels_match_reference(backend, n, dtype, request):
    run = _backend(backend, request)
    gen = torch.Generator().manual_seed(n)
    rewards = (3 * torch.randn(n, generator=gen, dtype=torch.float64)).to(dtype)
    rewards[n // 2] = float("nan")
    keys = torch.randint(-1, 17, (n,), generator=gen, dtype=torch.int32)  # -1 and 16: out of range -> NaN
    stats = torch.sort(torch.randn(16, 3, generator=gen, dtype=torch.float64), dim=1).values
    stats[3] = 0.5  # degenerate key
    exact = reference.normalize_rewards(rewards.double(), keys, stats)
    same = reference.normalize_rewards(rewards, keys, stats.float())
    assert_within_reference_error(run(rewards, keys, stats), same, exact, name="normalized")


def test_out_of_range_key_raises_on_cpu():
    with pytest.raises(ValueError, match=r"keys must lie in \[0, 2\)"):
        medgrpo.normalize_rewards(torch.zeros(3), torch.tensor([0, 1, 2]), torch.zeros(2, 3))


@pytest.mark.parametrize(
    "args,error,words",
    [
        ((torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), torch.zeros(1, 3)), TypeError, "rewards"),
        ((torch.zeros(3), torch.zeros(3), torch.zeros(1, 3)), TypeError, "keys"),
        ((torch.zeros(3), torch.zeros(4, dtype=torch.long), torch.zeros(1, 3)), ValueError, "keys"),
        ((torch.zeros(3), torch.zeros(3, dtype=torch.long), torch.zeros(3)), ValueError, "stats"),
        ((torch.zeros(3), torch.zeros(3, dtype=torch.long), torch.tensor([[0.0, 2.0, 1.0]])), ValueError, "ordered"),
    ],
)
def test_bad_input_names_the_argument(args, error, words):
    with pytest.raises(error, match=words):
        medgrpo.normalize_rewards(*args)


def test_gradient_free_and_compilable():
    stats = torch.tensor([[0.0, 1.0, 2.0]])
    fn = torch.compile(lambda r, key: medgrpo.normalize_rewards(r, key, stats), fullgraph=True, backend="aot_eager")
    r, key = torch.randn(9), torch.zeros(9, dtype=torch.long)
    torch.testing.assert_close(fn(r, key), reference.normalize_rewards(r, key, stats))


@pytest.mark.gpu
def test_public_op_on_cuda():
    r, key, stats = torch.randn(5000), torch.randint(0, 4, (5000,)), torch.tensor([[0.0, 1.0, 2.0]] * 4)
    got = medgrpo.normalize_rewards(r.cuda(), key.cuda(), stats.cuda())
    torch.testing.assert_close(got.cpu(), reference.normalize_rewards(r, key, stats))
