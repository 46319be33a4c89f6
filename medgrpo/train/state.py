"""What a run trains and resumes: model, optimizer, schedule, data position, sampling RNG, counters."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medgrpo.train import checkpoint as ckpt
from medgrpo.train.distributed import all_ranks, rank, world_size
from medgrpo.train.sampler import BalancedSampler

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    """The resumable state of a run.

    The model and optimizer are saved with torch.distributed.checkpoint and the scheduler by rank 0
    (:func:`medgrpo.train.checkpoint.save_checkpoint`); :meth:`state_dict` is the rest: the step and
    the skipped-step count, and each rank's own sampler (position, excluded records, skip counts by
    kind) and rollout generator, gathered on rank 0 (ranks draw and skip differently). ``params``
    are the trainable parameters, the optimizer's.
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
        """The step, the counters, and every rank's sampler and generator; every rank calls it (a gather)."""
        own = {"sampler": self.sampler.state_dict(), "generator": self.generator.get_state()}
        return {"step": self.step, "skipped_steps": self.skipped_steps, "ranks": all_ranks(own)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ranks = state.get("ranks") or [state]  # checkpoints of older runs hold rank 0's sampler and generator only
        if len(ranks) != world_size():
            logger.warning(
                "the checkpoint holds the data position of %d rank(s), this run has %d: ranks without their own "
                "take rank 0's, and the draws differ from an uninterrupted run",
                len(ranks),
                world_size(),
            )
        own = ranks[rank()] if rank() < len(ranks) else ranks[0]
        self.sampler.load_state_dict(own["sampler"])
        self.generator.set_state(own["generator"])
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))  # absent from checkpoints of older runs

    @property
    def skipped_records(self) -> dict[str, int]:
        """Records skipped in the run so far (this rank's), by kind: before training and while drawing."""
        return dict(self.sampler.skipped)

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
        """Load the newest checkpoint under ``directory`` that verifies; False (logged) when there is none.

        Newer checkpoints that fail verification (a file changed, truncated or missing against the
        manifest written with it) are reported file by file and passed over.

        Raises:
            medgrpo.train.checkpoint.CheckpointError: there are checkpoints but none verifies.
        """
        # The one call site choosing the checkpoint to resume from.
        latest, problems = ckpt.latest_valid_checkpoint(directory)
        for problem in problems:
            logger.error("--resume: passing over a checkpoint that fails verification: %s", problem)
        if latest is None and problems:
            raise ckpt.CheckpointError(
                f"--resume: no checkpoint under {directory} verifies ({len(problems)} bad file(s), listed above); "
                "move the bad ones away to start from step 0"
            )
        if latest is None:
            logger.warning("--resume: no complete checkpoint under %s; starting from step 0", directory)
            return False
        extra = ckpt.load_checkpoint(
            latest, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, verify=False
        )
        self.load_state_dict(extra)
        logger.info("resumed from %s (step %d)", latest, self.step)
        return True


__all__ = ["TrainState"]
