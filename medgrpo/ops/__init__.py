"""Custom ops (autograd, registration, dispatch) and the reference of every op."""

from medgrpo.ops import _library  # noqa: F401  (defines the medgrpo:: op schemas first)
from medgrpo.ops.fused_linear_policy_loss import fused_linear_policy_loss
from medgrpo.ops.group_advantages import group_advantages, group_advantages_with_stats
from medgrpo.ops.linear_logprob import linear_logprob
from medgrpo.ops.normalize_rewards import normalize_rewards
from medgrpo.ops.patchify import patchify
from medgrpo.ops.policy_loss import PolicyLossConfig, policy_loss
from medgrpo.ops.reference import GroupAdvantagesOutput, PolicyLossOutput

__all__ = [
    "GroupAdvantagesOutput",
    "PolicyLossConfig",
    "PolicyLossOutput",
    "fused_linear_policy_loss",
    "group_advantages",
    "group_advantages_with_stats",
    "linear_logprob",
    "normalize_rewards",
    "patchify",
    "policy_loss",
]
