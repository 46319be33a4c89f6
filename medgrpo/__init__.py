"""medgrpo: fused kernels and training for multi-task RL of video VLMs on medical video.

The functional API (keyword-only options, tensors on any device; CUDA runs Triton,
CPU runs the C++ kernels of csrc/, or the PyTorch reference without them)::

    medgrpo.normalize_rewards(rewards, keys, stats, k=3.0)
    medgrpo.group_advantages(rewards, group_size=8, keys=keys, stats=stats)
    medgrpo.group_advantages_with_stats(rewards, group_size=8)   # + per-group statistics
    medgrpo.policy_loss(logp, advantages, mask, old_logp=..., loss_type="dapo")
    medgrpo.linear_logprob(hidden, weight, targets, return_entropy=True)
    medgrpo.fused_linear_policy_loss(hidden, weight, targets, mask, advantages, old_logp=...)
"""

from medgrpo.ops import (
    GroupAdvantagesOutput,
    PolicyLossConfig,
    PolicyLossOutput,
    fused_linear_policy_loss,
    group_advantages,
    group_advantages_with_stats,
    linear_logprob,
    normalize_rewards,
    policy_loss,
)
from medgrpo.ops._library import has_native_cpu_kernels

__version__ = "0.1.0"

__all__ = [
    "GroupAdvantagesOutput",
    "PolicyLossConfig",
    "PolicyLossOutput",
    "fused_linear_policy_loss",
    "group_advantages",
    "group_advantages_with_stats",
    "has_native_cpu_kernels",
    "linear_logprob",
    "normalize_rewards",
    "policy_loss",
]
