"""A run's rewards: the reward function and the normalization statistics it is scored against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from medgrpo.rewards.norm_stats import NormStats, load_norm_stats
from medgrpo.rewards.task_rewards import RewardBatch, RewardConfig, RewardFunction


@dataclass
class Rewarder:
    """The run's reward function and normalization statistics (``table``: their (K, 3) tensor on the device)."""

    fn: RewardFunction
    stats: NormStats | None = None
    table: torch.Tensor | None = None

    def score(
        self, texts: list[str], records: list[Any], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None, RewardBatch]:
        """Raw rewards on ``device``, their key rows (None without statistics) and the reward batch (counts)."""
        batch = self.fn(texts, records)
        rewards = batch.rewards.to(device)
        if self.stats is None:
            return rewards, None, batch
        sources, qa_types = [r.data_source for r in records], [r.qa_type for r in records]
        return rewards, self.stats.indices(sources, qa_types, unknown="nan", device=device), batch


def build_rewarder(config: RewardConfig, norm_stats: str = "", device: torch.device | str | None = None) -> Rewarder:
    """The reward function of ``config`` and the statistics file ``norm_stats`` (empty: raw rewards),
    their table on ``device`` (None: no table)."""
    stats = load_norm_stats(norm_stats) if norm_stats else None
    table = None if stats is None or device is None else stats.tensor(device)
    return Rewarder(RewardFunction(config), stats, table)


__all__ = ["Rewarder", "build_rewarder"]
