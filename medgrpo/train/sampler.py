"""A sampler balanced across (data_source, qa_type), sharded by rank, that never draws an unusable record, resumable.

MedVidBench's keys differ in size by orders of magnitude; drawing records uniformly would let
the largest dataset dominate every batch. :class:`BalancedSampler` draws each record with
probability proportional to its key's weight divided by its key's size, so keys with equal
weight are seen equally often (weights come from the config: ``"data_source/qa_type"``,
``"data_source"`` or ``"qa_type"``, default 1).

Records found unusable before training (key None: not JSON, malformed, over a length cap) have
probability 0 and do not count in their key's size. A record found unusable later (its video does
not decode, its tokens exceed the cap) is :meth:`~BalancedSampler.exclude` d: counted once by
kind, and never yielded again. Exclusion filters the fixed draw sequence without changing it, so
the draws of an epoch do not depend on when a failure was seen, and every rank keeps the same
global sequence.

Every rank draws the same global sequence from ``(seed, epoch)`` and keeps every
``world_size``-th draw from its rank on, so ranks never repeat each other's prompts within a
draw and a prompt's G completions stay on the rank that drew it. The consumer says how many of
the yielded draws it used (:meth:`~BalancedSampler.advance`; a loader prefetches ahead of use),
and the position after the last one used is the state (:meth:`state_dict`), with the excluded
records and the skip counts, so a resumed run continues with the next prompt, not the epoch's first.
"""

from __future__ import annotations

from collections import Counter, deque
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
    """Indices drawn with replacement, balanced by key, ``samples_per_epoch`` per rank, unusable ones never yielded.

    Args:
        keys: the key of every record (:func:`medgrpo.data.task_key.format_task_key`), None for a record
            that is never to be drawn (found unusable before training).
        weights: relative weight per key, data source or task type (see :func:`key_weight`).
        samples_per_epoch: draws per rank per epoch (default: usable records / world size).
        rank, world_size: this rank's share of each epoch's draws.
        seed: with the epoch, fixes the draws (identical on every rank).
        skipped: records already skipped by kind (those with key None), the start of :attr:`skipped`.

    Raises:
        ValueError: no usable record, weights that are negative or all zero, a bad rank.
    """

    def __init__(
        self,
        keys: Sequence[str | None],
        weights: Mapping[str, float] | None = None,
        *,
        samples_per_epoch: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        skipped: Mapping[str, int] | None = None,
    ):
        sizes = Counter(k for k in keys if k is not None)
        if not sizes:
            raise ValueError("BalancedSampler needs at least one usable record")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got {rank} of {world_size}")
        probability = [0.0 if k is None else key_weight(k, weights or {}) / sizes[k] for k in keys]
        if min(probability) < 0 or sum(probability) <= 0:
            raise ValueError(f"sampler weights must be >= 0 with at least one positive, got {dict(weights or {})}")
        self.probability = torch.tensor(probability, dtype=torch.float64)
        self.samples_per_epoch = samples_per_epoch or max(sum(sizes.values()) // world_size, 1)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch = 0
        self.position = 0  # where the next iteration starts in this epoch's draws
        self.consumed = (0, 0)  # (epoch, position) after the last draw used: the state
        self.excluded: set[int] = set()
        self.skipped: Counter[str] = Counter(skipped or {})
        self._drawable = int((self.probability > 0).sum())  # records with probability > 0, not excluded
        self._yielded: deque[tuple[int, int]] = deque()  # (epoch, position) of draws yielded, not yet used

    def __len__(self) -> int:
        return self.samples_per_epoch - self.position

    @property
    def exhausted(self) -> bool:
        """Whether every record that can be drawn is excluded: nothing will be yielded again."""
        return self._drawable == 0

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` (from its first draw, unless :meth:`load_state_dict` set a position for it)."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def draws(self) -> list[int]:
        """This rank's draws of the current epoch, from its first, excluded records included."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        total = self.samples_per_epoch * self.world_size
        drawn = torch.multinomial(self.probability, total, replacement=True, generator=generator)
        return drawn[self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch
        for position, index in enumerate(self.draws()[self.position :], self.position):
            if index not in self.excluded:
                self._yielded.append((epoch, position))
                yield index

    def advance(self, count: int) -> None:
        """Record that the next ``count`` yielded draws were used (the loader prefetches ahead of use)."""
        if count > len(self._yielded):
            raise ValueError(f"advance({count}): only {len(self._yielded)} draws were yielded and not used")
        for _ in range(count):
            epoch, position = self._yielded.popleft()
            self.consumed = (epoch, position + 1)

    def exclude(self, index: int, kind: str) -> bool:
        """Never yield record ``index`` again, counting it under ``kind`` the first time; whether it was new."""
        if index in self.excluded:
            return False
        self.excluded.add(index)
        self.skipped[kind] += 1
        self._drawable -= bool(self.probability[index] > 0)
        return True

    def state_dict(self) -> dict[str, Any]:
        epoch, position = self.consumed
        return {
            "epoch": epoch,
            "position": position,
            "seed": self.seed,
            "excluded": sorted(self.excluded),
            "skipped": dict(self.skipped),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])
        self.consumed = (self.epoch, self.position)
        self._yielded.clear()
        self.excluded = {int(index) for index in state.get("excluded", ())}  # absent from older checkpoints
        self._drawable = int((self.probability > 0).sum()) - sum(bool(self.probability[i] > 0) for i in self.excluded)
        self.skipped = Counter({str(k): int(v) for k, v in state.get("skipped", {}).items()})


__all__ = ["BalancedSampler", "key_weight"]
