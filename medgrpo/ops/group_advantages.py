"""group_advantages: normalization + group-relative advantages, one launch, as a custom op."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from medgrpo.ops import _checks, _library, reference
from medgrpo.ops.normalize_rewards import check_normalization_inputs
from medgrpo.ops.reference import GroupAdvantagesOutput

SCALE_CODES = {"group": 0, "batch": 1, "none": 2}


@_library.register_fake("group_advantages")
def _fake(rewards, group_ids, group_size, keys, stats, k, scale, eps):
    n = rewards.shape[0]
    num_groups = n // group_size if group_size > 0 else n
    dtype = reference.accumulation_dtype(rewards.dtype)
    per_member = rewards.new_empty(n, dtype=dtype)
    per_group = rewards.new_empty(num_groups, dtype=dtype)
    return (
        per_member,
        per_member.clone(),
        per_group,
        per_group.clone(),
        rewards.new_empty(num_groups, dtype=torch.int32),
        rewards.new_empty(2, dtype=dtype),
    )


def _reference_kernel(rewards, group_ids, group_size, keys, stats, k, scale, eps):
    scale_name = {code: name for name, code in SCALE_CODES.items()}[scale]
    out = reference.group_advantages(
        rewards,
        group_size=group_size if group_size > 0 else None,
        group_ids=group_ids,
        keys=keys,
        stats=stats,
        k=k,
        scale=scale_name,
        eps=eps,
    )
    summary = torch.stack([out.zero_std_fraction, out.nan_fraction])
    return out.advantages, out.rewards, out.group_mean, out.group_std, out.group_count, summary


def _cuda_kernel(rewards, group_ids, group_size, keys, stats, k, scale, eps):
    if rewards.dtype == torch.float64:
        return _reference_kernel(rewards, group_ids, group_size, keys, stats, k, scale, eps)
    from medgrpo.kernels.group_advantages import group_advantages as launch

    return launch(rewards, group_ids, group_size, keys, stats, k, scale, eps, reference.ZERO_STD_ATOL)


_library.register_cpu_fallback("group_advantages", _reference_kernel)
_library.register_cuda("group_advantages", _cuda_kernel)


def _check_grouping(rewards: Tensor, group_size: Optional[int], group_ids: Optional[Tensor]) -> int:
    n = rewards.shape[0]
    if (group_size is None) == (group_ids is None):
        raise ValueError("pass exactly one of group_size (contiguous groups) or group_ids")
    if group_ids is not None:
        _checks.check_integer("group_ids", group_ids)
        _checks.check_shape("group_ids", group_ids, (n,), "one group id per reward")
        _checks.check_same_device("rewards", rewards, group_ids=group_ids)
        _checks.check_index_range("group_ids", group_ids, n, "one id per group, at most N groups")
        return 0
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if n % group_size:
        raise ValueError(f"group_size={group_size} does not divide the number of rewards N={n}")
    return group_size


def _launch(rewards, group_size, group_ids, keys, stats, k, scale, eps) -> tuple[Tensor, ...]:
    """Check the arguments and run the op: its 6 output tensors."""
    _checks.check_floating("rewards", rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    size_code = _check_grouping(rewards, group_size, group_ids)
    if (keys is None) != (stats is None):
        raise ValueError("keys and stats must be given together (or neither)")
    if keys is not None:
        check_normalization_inputs(rewards, keys, stats)
    _checks.check_choice("scale", scale, reference.ADVANTAGE_SCALES)
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return torch.ops.medgrpo.group_advantages(
        rewards, group_ids, size_code, keys, stats, float(k), SCALE_CODES[scale], float(eps)
    )


def group_advantages(
    rewards: Tensor,
    *,
    group_size: Optional[int] = None,
    group_ids: Optional[Tensor] = None,
    keys: Optional[Tensor] = None,
    stats: Optional[Tensor] = None,
    k: float = 3.0,
    scale: str = "group",
    eps: float = 1e-4,
) -> Tensor:
    """Group-relative advantages of G completions per prompt, optionally normalizing first.

    ``A_i = (r_i - mean_g) / (std_g + eps)`` over the completions of one prompt, as TRL's
    GRPOTrainer and verl compute it (std with Bessel's correction). With ``keys`` and
    ``stats``, rewards are first normalized per (data_source, qa_type) key exactly as
    :func:`medgrpo.normalize_rewards`; on CUDA both steps run in ONE Triton launch and
    nothing is synchronized with the host.

    Args:
        rewards: (N,) float raw rewards; NaN = unscorable (left out of every statistic,
            advantage 0).
        group_size: G, for contiguous groups (member i belongs to group i // G). N must
            be a multiple of G.
        group_ids: (N,) integer group of each member instead, ids in [0, N) (e.g. the
            prompt index; map arbitrary ids with ``torch.unique(ids, return_inverse=True)``).
        keys, stats: (N,) key rows into (K, 3) (p25, p50, p75) stats; both or neither.
        k: normalization slope.
        scale: "group" divides by the group std, "batch" by the std of all rewards,
            "none" does not divide (Dr. GRPO).
        eps: added to the std before dividing (TRL uses 1e-4).

    Returns:
        (N,) fp32 advantages (fp64 for fp64 input), finite everywhere: groups of one,
        groups of equal rewards and NaN members give 0. :func:`group_advantages_with_stats`
        also returns the per-group statistics.
    """
    return _launch(rewards, group_size, group_ids, keys, stats, k, scale, eps)[0]


def group_advantages_with_stats(
    rewards: Tensor,
    *,
    group_size: Optional[int] = None,
    group_ids: Optional[Tensor] = None,
    keys: Optional[Tensor] = None,
    stats: Optional[Tensor] = None,
    k: float = 3.0,
    scale: str = "group",
    eps: float = 1e-4,
) -> GroupAdvantagesOutput:
    """:func:`group_advantages` (same arguments, same launch) with per-group statistics for logging.

    Returns:
        A :class:`GroupAdvantagesOutput`: the advantages, the rewards used (normalized when
        ``keys``/``stats`` are given), per-group mean / std / count and the device-side
        scalars ``zero_std_fraction`` (share of non-empty groups whose std is ~0, i.e. no
        learning signal) and ``nan_fraction``.
    """
    advantages, used, mean, std, count, summary = _launch(rewards, group_size, group_ids, keys, stats, k, scale, eps)
    return GroupAdvantagesOutput(advantages, used, mean, std, count, summary[0], summary[1])
