"""One MedGRPO step: rollout → rewards → group advantages → ``num_iterations`` policy updates.

The rollout (:mod:`medgrpo.train.rollout`) encodes each video once and samples G completions from one
prefill; the rewarder (:mod:`medgrpo.rewards.rewarder`) scores them; :func:`medgrpo.group_advantages`
normalizes them with the run's statistics; the update (:mod:`medgrpo.train.update`) runs the fused
policy loss. Old log-probs are taken before the first update when ``num_iterations > 1``, reference
log-probs when ``beta > 0``. Everything the step reports stays on the device until it is logged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from medgrpo.data.collate import VideoBatch, eos_ids
from medgrpo.data.task_key import format_task_key
from medgrpo.ops.group_advantages import group_advantages_with_stats
from medgrpo.ops.policy_loss import MEDGRPO_LOSS, PolicyLossConfig
from medgrpo.rewards.rewarder import Rewarder
from medgrpo.train.distributed import gathered
from medgrpo.train.metrics import StepResult
from medgrpo.train.optim import optimizer_step
from medgrpo.train.rollout import RolloutConfig, decode_text, generate
from medgrpo.train.shared_prefix import shared_prefix_inputs
from medgrpo.train.state import TrainState
from medgrpo.train.update import (
    LossOptions,
    RolloutInputs,
    UpdateMetrics,
    backward_policy_loss,
    policy_inputs,
    sequence_logprobs,
)


@dataclass
class GRPOConfig:
    """MedGRPO's policy-gradient step (defaults: the paper's settings, see configs/).

    Attributes:
        prompts_per_step: prompts per rank per step; each gets rollout.group_size completions.
        num_iterations: policy updates per rollout (old log-probs are taken before the first when > 1).
        micro_batch_size: sequences per forward/backward in the log-prob and update passes; with shared_prefix,
            whole groups: max(1, micro_batch_size // group_size) groups, packed into one row, per forward.
        shared_prefix: run each prompt and its video once per group in the log-prob and update passes, its G
            completions packed after it (same loss and gradients as the dense prompt + completion rows).
        scale: how advantages are scaled: "group" (by the group's std), "batch" (the batch's) or "none" (Dr. GRPO).
        k: steepness of the sigmoid of the cross-dataset reward normalization.
        norm_stats: the statistics file of medgrpo fit-norm (p25/p50/p75 per key); empty: raw rewards.
        rollout: how completions are sampled.
        loss: the policy loss.
    """

    prompts_per_step: int = 8
    num_iterations: int = 1
    micro_batch_size: int = 8
    shared_prefix: bool = True
    scale: str = "group"
    k: float = 3.0
    norm_stats: str = ""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: PolicyLossConfig = MEDGRPO_LOSS

    def __post_init__(self) -> None:
        self.loss.validate(has_ref=True)  # beta > 0 loads a reference model
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {self.num_iterations}")


@dataclass(frozen=True)
class GRPOSetup:
    """What every GRPO step of a run uses, built once (:meth:`build`): the config, the update's options,
    the tokenizer and its stop tokens, the clipping norm, and the frozen reference model (beta > 0)."""

    config: GRPOConfig
    loss: LossOptions
    tokenizer: Any
    eos_token_ids: tuple[int, ...]
    max_grad_norm: float
    reference: nn.Module | None = None

    @classmethod
    def build(
        cls, config: GRPOConfig, tokenizer, *, max_grad_norm: float, reference: nn.Module | None = None
    ) -> GRPOSetup:
        temperature = config.rollout.temperature
        loss = LossOptions(
            loss=config.loss,
            temperature=temperature if temperature > 0 else 1.0,
            micro_batch_size=config.micro_batch_size,
        )
        return cls(config, loss, tokenizer, tuple(eos_ids(tokenizer)), max_grad_norm, reference)


def grpo_step(state: TrainState, batch: VideoBatch, rewarder: Rewarder, setup: GRPOSetup) -> StepResult:
    """One MedGRPO step on a batch of prompts (see the module docstring)."""
    model, g = state.model, setup.config
    device = batch.input_ids.device
    start = time.perf_counter()
    with gathered(model), torch.no_grad():
        rollout = generate(
            model,
            batch,
            g.rollout,
            eos_token_ids=setup.eos_token_ids,
            pad_token_id=setup.tokenizer.pad_token_id,
            generator=state.generator,
        )
    t_rollout = time.perf_counter()
    texts = decode_text(setup.tokenizer, rollout)
    records = [r for r in batch.records for _ in range(g.rollout.group_size)]
    rewards, keys, reward_batch = rewarder.score(texts, records, device)
    advantage = group_advantages_with_stats(
        rewards,
        group_size=g.rollout.group_size,
        keys=keys,
        stats=rewarder.table,
        k=g.k,
        scale=g.scale,
    )
    normalized = advantage.rewards  # the rewards the advantages came from: normalized when stats are given
    t_reward = time.perf_counter()
    build_inputs = shared_prefix_inputs if g.shared_prefix else policy_inputs
    inputs = build_inputs(model, rollout, batch.video_grid_thw, batch.second_per_grid_ts, batch.pixel_values_videos)
    logp = {"temperature": setup.loss.temperature, "micro_batch_size": setup.loss.micro_batch_size}
    ref_logp = sequence_logprobs(setup.reference, inputs, **logp) if setup.reference is not None else None
    old_logp = sequence_logprobs(model, inputs, **logp) if g.num_iterations > 1 else None
    t_logp = time.perf_counter()
    update, grad_norm, stepped, skipped = _updates(state, setup, inputs, advantage.advantages, old_logp, ref_logp)
    end = time.perf_counter()
    tokens = int(rollout.completion_tokens)
    metrics = {
        **_update_metrics(update),
        "grad_norm": grad_norm,
        "reward_raw": torch.nanmean(rewards),
        "reward_norm": torch.nanmean(normalized),
        "reward_missing": torch.isnan(rewards).float().mean(),
        "advantage_std": advantage.advantages.std(),
        "zero_std_group_fraction": advantage.zero_std_fraction,
        "completion_tokens": tokens,
        "nonfinite_skipped": skipped,
        "time_rollout_s": t_rollout - start,
        "time_reward_s": t_reward - t_rollout,
        "time_logprob_s": t_logp - t_reward,
        "time_update_s": end - t_logp,
        "tokens_per_s": tokens / max(end - start, 1e-9),
        "samples_per_s": len(texts) / max(end - start, 1e-9),
        **{f"reward_count/{k}": v for k, v in reward_batch.counts.items()},
    }
    rows = ([format_task_key(r.data_source, r.qa_type) for r in records], rewards, normalized)
    return StepResult(metrics, stepped, rows)


def _updates(
    state: TrainState,
    setup: GRPOSetup,
    inputs: RolloutInputs,
    advantages: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
) -> tuple[UpdateMetrics, torch.Tensor, bool, int]:
    """``num_iterations`` guarded updates; the last one's metrics and gradient norm, whether all stepped, skips."""
    state.model.train()
    stepped_all, skipped = True, 0
    for _ in range(setup.config.num_iterations):
        update = backward_policy_loss(state.model, inputs, advantages, setup.loss, old_logp=old_logp, ref_logp=ref_logp)
        stepped, grad_norm = optimizer_step(
            state.params, state.optimizer, state.scheduler, loss=update.loss, max_grad_norm=setup.max_grad_norm
        )
        stepped_all &= stepped
        skipped += not stepped
    return update, grad_norm, stepped_all, skipped


def _update_metrics(update: UpdateMetrics) -> dict[str, torch.Tensor]:
    return {
        "loss": update.loss,
        "kl": update.kl,
        "clip_fraction": update.clip_fraction,
        "clip_fraction_low": update.clip_fraction_low,
        "clip_fraction_high": update.clip_fraction_high,
        "entropy": update.entropy,
    }


__all__ = ["GRPOConfig", "GRPOSetup", "grpo_step"]
