"""A sampler balanced across (data_source, qa_type), sharded by rank, resumable.

MedVidBench's keys differ in size by orders of magnitude; drawing records uniformly would let
the largest dataset dominate every batch. :class:`BalancedSampler` draws each record with
probability proportional to its key's weight divided by its key's size, so keys with equal
weight are seen equally often (weights come from the config: ``"data_source/qa_type"``,
``"data_source"`` or ``"qa_type"``, default 1).

Every rank draws the same global sequence from ``(seed, epoch)`` and keeps every
``world_size``-th draw from its rank on, so ranks never repeat each other's prompts within a
draw and a prompt's G completions stay on the rank that drew it. The position inside the
epoch is part of the state (:meth:`state_dict`), so a resumed run continues with the next
prompt, not the epoch's first.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler

from medgrpo.data.task_key import TaskKey


def key_weight(key: str, weights: Mapping[str, float]) -> float:
    """A key's weight: its own entry, else its data source's, else its task type's, else 1."""
    source, qa_type = TaskKey.parse(key)
    for name in (key, source, qa_type):
        if name in weights:
            return float(weights[name])
    return 1.0


class BalancedSampler(Sampler[int]):
    """Indices drawn with replacement, balanced by key, ``samples_per_epoch`` per rank.

    Args:
        keys: the key of every record (:func:`medgrpo.data.task_key.format_task_key`).
        weights: relative weight per key, data source or task type (see :func:`key_weight`).
        samples_per_epoch: draws per rank per epoch (default: dataset size / world size).
        rank, world_size: this rank's share of each epoch's draws.
        seed: with the epoch, fixes the draws (identical on every rank).
    """

    def __init__(
        self,
        keys: Sequence[str],
        weights: Mapping[str, float] | None = None,
        *,
        samples_per_epoch: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ):
        if not keys:
            raise ValueError("BalancedSampler needs at least one record")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got {rank} of {world_size}")
        sizes = Counter(keys)
        probability = [key_weight(k, weights or {}) / sizes[k] for k in keys]
        if min(probability) < 0 or sum(probability) <= 0:
            raise ValueError(f"sampler weights must be >= 0 with at least one positive, got {dict(weights or {})}")
        self.probability = torch.tensor(probability, dtype=torch.float64)
        self.samples_per_epoch = samples_per_epoch or max(len(keys) // world_size, 1)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch = 0
        self.position = 0  # draws of this rank already consumed in this epoch

    def __len__(self) -> int:
        return self.samples_per_epoch - self.position

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` (from its first draw, unless :meth:`load_state_dict` set a position for it)."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def draws(self) -> list[int]:
        """This rank's draws of the current epoch, from its first."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        total = self.samples_per_epoch * self.world_size
        drawn = torch.multinomial(self.probability, total, replacement=True, generator=generator)
        return drawn[self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.draws()[self.position :])

    def advance(self, count: int) -> None:
        """Record that ``count`` more draws were consumed (the loader prefetches ahead of use)."""
        self.position += count

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])


__all__ = ["BalancedSampler", "key_weight"]
