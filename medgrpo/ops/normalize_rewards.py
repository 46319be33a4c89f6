"""normalize_rewards: the paper's cross-dataset reward normalization, as a torch custom op."""

from __future__ import annotations

import torch
from torch import Tensor

from medgrpo.ops import _checks, _library, reference


@_library.register_fake("normalize_rewards")
def _fake(rewards: Tensor, keys: Tensor, stats: Tensor, k: float) -> Tensor:
    return rewards.new_empty(rewards.shape, dtype=reference.accumulation_dtype(rewards.dtype))


def _reference_kernel(rewards: Tensor, keys: Tensor, stats: Tensor, k: float) -> Tensor:
    return reference.normalize_rewards(rewards, keys, stats, k=k)


def _cuda_kernel(rewards: Tensor, keys: Tensor, stats: Tensor, k: float) -> Tensor:
    if rewards.dtype == torch.float64:
        return _reference_kernel(rewards, keys, stats, k)
    from medgrpo.kernels.normalize_rewards import normalize_rewards as launch

    return launch(rewards, keys, stats, k)


_library.register_cpu_fallback("normalize_rewards", _reference_kernel)
_library.register_cuda("normalize_rewards", _cuda_kernel)


def check_normalization_inputs(rewards: Tensor, keys: Tensor, stats: Tensor) -> None:
    """Shapes, dtypes, devices and (where free) key ranges of normalization inputs."""
    _checks.check_floating("rewards", rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    _checks.check_integer("keys", keys)
    _checks.check_shape("keys", keys, rewards.shape, "one key per reward")
    _checks.check_stats(stats)
    _checks.check_same_device("rewards", rewards, keys=keys, stats=stats)
    _checks.check_index_range("keys", keys, stats.shape[0], "rows of stats")


def normalize_rewards(rewards: Tensor, keys: Tensor, stats: Tensor, *, k: float = 3.0) -> Tensor:
    """Map raw rewards of heterogeneous tasks onto one scale (MedGRPO's normalization).

    ``r_norm = sigmoid(k * (r - p50) / (p75 - p25))`` with the statistics of each
    reward's (data_source, qa_type) key, measured once on rollouts of the SFT model.
    Every key's median maps to 0.5.

    Args:
        rewards: (N,) float raw rewards. NaN marks an unscorable answer and stays NaN.
        keys: (N,) integer row of ``stats`` for each reward.
        stats: (K, 3) float rows (p25, p50, p75).
        k: slope of the sigmoid (the paper uses 3).

    Returns:
        (N,) fp32 normalized rewards in [0, 1] (fp64 for fp64 rewards), NaN where the
        reward is NaN. A key whose IQR is 0 takes the IQR -> 0+ limit: 1 above its
        median, 0 below, 0.5 at it; finite, never inf/NaN. On CUDA a key outside
        [0, K) gives NaN (on CPU it raises ValueError).
    """
    check_normalization_inputs(rewards, keys, stats)
    return torch.ops.medgrpo.normalize_rewards(rewards, keys, stats, float(k))
