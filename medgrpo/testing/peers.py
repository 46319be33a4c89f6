"""How the peer libraries compute the same quantities, written the way they write them.

These are oracles and baselines, not references: tests check medgrpo against them
("same numbers as TRL / verl"), and benchmarks time them as "the peers' way". Each
function follows its peer's formulation step by step (TRL's GRPOTrainer for the loss
and advantages, verl's core_algos for the dual clip, KL estimators and the per-sample
advantage loop), so a disagreement with medgrpo.ops.reference is a real finding.
Liger-Kernel is used directly (it is importable) in the tests that compare against it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch
from torch import Tensor


def trl_group_advantages(rewards: Tensor, num_generations: int, scale_rewards: str = "group") -> Tensor:
    """TRL GRPOTrainer's eager advantage code: view, mean/std, repeat_interleave, divide."""
    grouped = rewards.view(-1, num_generations)
    mean_grouped_rewards = grouped.mean(dim=1).repeat_interleave(num_generations, dim=0)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards == "group":
        std_rewards = grouped.std(dim=1).repeat_interleave(num_generations, dim=0)
    elif scale_rewards == "batch":
        std_rewards = rewards.std().expand_as(rewards)
    else:
        return advantages
    return advantages / (std_rewards + 1e-4)


def verl_group_advantages(rewards: Tensor, index: list, epsilon: float = 1e-6, norm_by_std: bool = True) -> Tensor:
    """verl's compute_grpo_outcome_advantage: a Python loop over samples and groups.

    verl uses epsilon=1e-6 and returns 0-mean/1-std for singleton groups; pass
    ``epsilon=1e-4`` to compare numbers with TRL's / medgrpo's default.
    """
    scores = rewards.clone()
    id2score = defaultdict(list)
    id2mean, id2std = {}, {}
    with torch.no_grad():
        for i in range(scores.shape[0]):
            id2score[index[i]].append(scores[i])
        for idx, group in id2score.items():
            if len(group) == 1:
                id2mean[idx], id2std[idx] = torch.tensor(0.0), torch.tensor(1.0)
            else:
                stacked = torch.stack(group)
                id2mean[idx], id2std[idx] = torch.mean(stacked), torch.std(stacked)
        for i in range(scores.shape[0]):
            centered = scores[i] - id2mean[index[i]]
            scores[i] = centered / (id2std[index[i]] + epsilon) if norm_by_std else centered
    return scores


def verl_kl_penalty(logprob: Tensor, ref_logprob: Tensor, kind: str) -> Tensor:
    """verl's kl_penalty for "kl" (k1), "mse" (k2) and "low_var_kl" (k3, without its clamp)."""
    if kind == "k1":
        return logprob - ref_logprob
    if kind == "k2":
        return 0.5 * (logprob - ref_logprob).square()
    kl = ref_logprob - logprob
    return torch.exp(kl) - kl - 1


def trl_grpo_loss(
    per_token_logps: Tensor,
    advantages: Tensor,
    completion_mask: Tensor,
    *,
    old_per_token_logps: Optional[Tensor] = None,
    ref_per_token_logps: Optional[Tensor] = None,
    loss_type: str = "dapo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    importance_sampling_level: str = "token",
    max_completion_length: Optional[int] = None,
    num_items_in_batch: Optional[float] = None,
    kl_estimator: str = "k3",
    clip_ratio_c: Optional[float] = None,
) -> Tensor:
    """TRL GRPOTrainer._compute_loss (single process, no grad accumulation).

    ``kl_estimator`` other than k3 and ``clip_ratio_c`` (dual clip) are verl's
    extensions, spliced in where verl applies them.
    """
    if old_per_token_logps is None:
        old_per_token_logps = per_token_logps.detach()
    log_ratio = per_token_logps - old_per_token_logps
    if importance_sampling_level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = (log_ratio * completion_mask).sum(-1) / completion_mask.sum(-1).clamp(min=1.0)
        log_importance_weights = log_importance_weights.unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    per_token_loss1 = coef_1 * advantages
    per_token_loss2 = coef_2 * advantages
    per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    if clip_ratio_c is not None:  # verl: dual-clip of negative advantages
        pg_losses3 = -advantages * clip_ratio_c
        per_token_loss = torch.where(advantages < 0, torch.min(pg_losses3, per_token_loss), per_token_loss)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * verl_kl_penalty(per_token_logps, ref_per_token_logps, kl_estimator)
    mask = completion_mask
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    normalizer = mask.sum() if num_items_in_batch is None else torch.as_tensor(float(num_items_in_batch))
    return (per_token_loss * mask).sum() / normalizer.clamp(min=1.0)
