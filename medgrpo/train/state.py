"""What a run trains and resumes: model, optimizer, schedule, data position, sampling RNG, counters."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medgrpo.train import checkpoint as ckpt
from medgrpo.train.sampler import BalancedSampler

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    """The resumable state of a run.

    The model and optimizer are saved with torch.distributed.checkpoint and the scheduler by rank 0
    (:func:`medgrpo.train.checkpoint.save_checkpoint`); :meth:`state_dict` is the rest: the sampler's
    position, the rollout generator, the step and the counters. ``params`` are the trainable
    parameters, the optimizer's.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: BalancedSampler
    generator: torch.Generator
    step: int = 0
    skipped_steps: int = 0
    params: list[nn.Parameter] = field(init=False)

    def __post_init__(self) -> None:
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]

    def state_dict(self) -> dict[str, Any]:
        """The sampler, the generator, the step and the counters (Python values and tensors)."""
        return {
            "sampler": self.sampler.state_dict(),
            "generator": self.generator.get_state(),
            "step": self.step,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.generator.set_state(state["generator"])
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))  # absent from checkpoints of older runs

    def save(self, directory: Path, keep: int) -> Path:
        """Checkpoint the state at its step under ``directory``, keeping the newest ``keep``; every rank calls it."""
        return ckpt.save_checkpoint(
            directory,
            self.step,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            extra_state=self.state_dict(),
            keep=keep,
        )

    def resume(self, directory: Path) -> bool:
        """Load the newest complete checkpoint under ``directory``; False (logged) when there is none."""
        latest = ckpt.latest_checkpoint(directory)
        if latest is None:
            logger.warning("--resume: no complete checkpoint under %s; starting from step 0", directory)
            return False
        extra = ckpt.load_checkpoint(latest, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
        self.load_state_dict(extra)
        logger.info("resumed from %s (step %d)", latest, self.step)
        return True


__all__ = ["TrainState"]
